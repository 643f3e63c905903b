"""The loss is a per-token mean over the whole optimizer step (transformers' num_items_in_batch).

One SGD step on two samples of unequal length must move the weights the same whether the two
samples come as one micro-batch or as two accumulated micro-batches (a mean of per-micro-batch
means would weigh the shorter sample's tokens more), through the real Trainer. (~20 s on an idle
2-core machine.)
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from eagle3.train.args import parse_args
from eagle3.train.main import train

try:
    from tests.train_data import cached_store
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from train_data import cached_store


def _one_step(data_dir, target, output_dir, batch_size, accumulation, extra=()):
    args = [
        "--data-dir", str(data_dir), "--output-dir", str(output_dir), "--base-model", str(target),
        "--max_steps", "1", "--batch-size", str(batch_size), "--gradient_accumulation_steps", str(accumulation),
        "--train_sampling_strategy", "sequential", "--optim", "sgd", "--lr", "0.5", "--max_grad_norm", "0",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--eval-ratio", "0", "--ttt-steps", "3",
        "--draft-vocab-size", "256", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", "--save_strategy", "no", *extra,
    ]  # fmt: skip
    train(parse_args(args))
    return load_file(output_dir / "final_model" / "model.safetensors")


def test_accumulated_step_equals_one_batch(trained_target, tmp_path):
    # soft_ce: the default lk_lambda differs by design (its KL weight is each micro-batch's mean acceptance)
    extra = ["--loss", "soft_ce"]
    data_dir = cached_store(trained_target)
    whole = _one_step(data_dir, trained_target, tmp_path / "whole", 2, 1, extra)
    accumulated = _one_step(data_dir, trained_target, tmp_path / "accumulated", 1, 2, extra)
    for name, tensor in whole.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(accumulated[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    # The final norm starts at ones: the step must have moved it, or equality would prove nothing.
    assert not torch.equal(whole["norm.weight"], torch.ones_like(whole["norm.weight"]))
