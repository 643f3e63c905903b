#!/usr/bin/env python
"""Train an EAGLE-3 draft for a Qwen3 target from run_collect.py data.

    python run_train.py --data-dir ./eagle_data --output-dir ./eagle3_qwen3_model \\
        --base-model Qwen/Qwen3-1.7B --target-layers 0,13,27 --epochs 10 --batch-size 64 --lr 1e-4
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml run_train.py ...
    torchrun --nproc_per_node=8 run_train.py ...
    python run_train.py train.yaml            # the same options from a YAML/JSON file

Every transformers TrainingArguments option works too; see docs/TRAIN.md.
"""

import sys

from eagle3.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
