#!/usr/bin/env python
"""Measure an EAGLE-3 draft's acceptance length, in-process (--backend hf) or in vLLM.

    python run_eval.py --model TARGET --draft DRAFT_DIR --dataset prompts.jsonl \\
        --num-speculative-tokens 3 --backend hf|vllm [--temperature 0] \\
        [--max-new-tokens 256] [--output report.json] [--plot report.png]
    python run_eval.py eval.yaml [--flag value ...]   # the same options from a YAML/JSON file

Installed as the ``eagle3-eval`` command too; ``--help`` lists every option.
"""

import sys

from eagle3.evaluate.cli import main

if __name__ == "__main__":  # vLLM spawns worker processes: keep the guard
    sys.exit(main())
