"""Two processes on CPU (gloo) through `accelerate launch` with the shipped ZeRO-2 / ZeRO-3 configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eagle3.export.check import check_draft

try:
    from tests.train_data import cached_store
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from train_data import cached_store

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


STAGES = ("zero2", "zero3")


@pytest.fixture(scope="module")
def runs(trained_target, tmp_path_factory) -> dict[str, Path]:
    """One 2-process run per ZeRO stage; output_dir per stage."""
    return {stage: _launch(stage, trained_target, tmp_path_factory.mktemp(stage) / "out") for stage in STAGES}


def _launch(stage: str, trained_target: Path, output_dir: Path) -> Path:
    data_dir = cached_store(trained_target)
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / f"deepspeed_{stage}.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(29500 + os.getpid() % 1000 + (stage == "zero3")),
        str(REPO / "run_train.py"),
        "--data-dir",
        str(data_dir),
        "--base-model",
        str(trained_target),
        "--output-dir",
        str(output_dir),
        "--max_steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--eval-ratio",
        "0.15",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--draft-vocab-size",
        "256",
        "--ttt-steps",
        "3",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        # ZeRO-3 trains online (the target computes the states in each process, loaded whole next
        # to the partitioned draft): one run covers both, the stored states are simply not read.
        *(["--online"] if stage == "zero3" else []),
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=500, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return output_dir


@pytest.mark.parametrize("stage", STAGES)
def test_two_process_deepspeed_run_saves_a_vllm_ready_best_model(stage, runs, trained_target):
    output_dir = runs[stage]
    best = output_dir / "best_model"
    assert check_draft(best, trained_target) == []
    info = json.loads((best / "eagle3_eval.json").read_text())
    assert info["metrics"]["eval_accept_len"] >= 1.0 and "eval_acc_2" in info["metrics"]
    assert info["data"]["hidden_states"] == ("online" if stage == "zero3" else "bf16")
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    # 2 processes x batch 4: each optimizer step consumed 8 samples
    assert state["train_batch_size"] == 4 and state["global_step"] == 4
    assert any(p.name.startswith("global_step") for p in (output_dir / "checkpoint-4").iterdir())  # DeepSpeed state


@pytest.mark.vllm
def test_deepspeed_best_models_load_and_speculate_in_vllm(runs, trained_target, tmp_path, vllm_bench):
    """What ZeRO-3 gathered and saved is what vLLM serves: lossless output, drafts made."""
    drafts = [str(runs[stage] / "best_model") for stage in STAGES]
    out = vllm_bench(trained_target, drafts, tmp_path, baseline=True, max_tokens=24)
    for draft in drafts:
        run = out["drafts"][draft]
        assert run["num_drafts"] > 0, draft
        assert run["token_ids"] == out["baseline"]["token_ids"], draft
