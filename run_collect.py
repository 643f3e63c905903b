#!/usr/bin/env python
"""Collect target hidden states for EAGLE-3 training (see docs/COLLECT.md).

    python run_collect.py --model Qwen/Qwen3-1.7B --layers 0,13,27 --dataset chats.jsonl \\
        --output-dir ./eagle_data --target-tokens 1000000 --batch-size 8 [--backend hf|vllm]
    python run_collect.py collect.yaml [--flag value ...]   # the same options from a YAML/JSON file

Installed as the ``eagle3-collect`` command too; ``--help`` lists every option.
"""

from eagle3.collect.cli import main

if __name__ == "__main__":
    main()
