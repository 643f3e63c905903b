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
@pytest.mark.extended  # make test-extended: DeepSpeed's saved drafts are checked by eagle3 check in the default run
def test_deepspeed_best_models_load_and_speculate_in_vllm(runs, trained_target, tmp_path, vllm_bench):
    """What ZeRO-3 gathered and saved is what vLLM serves: lossless output, drafts made."""
    drafts = [str(runs[stage] / "best_model") for stage in STAGES]
    out = vllm_bench(trained_target, drafts, tmp_path, baseline=True, max_tokens=24)
    for draft in drafts:
        run = out["drafts"][draft]
        assert run["num_drafts"] > 0, draft
        assert run["token_ids"] == out["baseline"]["token_ids"], draft


def _missing_deepspeed_cpu_ops() -> list[str]:
    """The DeepSpeed C++ ops ZeRO-3 offload needs on a CPU machine that are NOT built yet (built at
    install with DS_BUILD_CPU_ADAM=1, or JIT-compiled into TORCH_EXTENSIONS_DIR by `make deepspeed-ops`)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    missing = []
    for op in ("cpu_adam", "deepspeed_shm_comm"):
        prebuilt = installed_ops.get(op)
        if not prebuilt and not (Path(_get_build_directory(op, verbose=False)) / f"{op}.so").exists():
            missing.append(op)
    return missing


def test_zero3_cpu_offload_two_processes(trained_target, tmp_path):
    """ds_configs/zero3_offload.json (optimizer + parameters offloaded, DeepSpeedCPUAdam from its
    `optimizer` block) with the Trainer, 2 processes: trains, saves a vLLM-ready best_model."""
    missing = _missing_deepspeed_cpu_ops()
    if missing:
        pytest.skip(
            f"DeepSpeed ops {missing} are not built (a JIT compile of minutes per op on 2 cores): run "
            "`make deepspeed-ops` once, then this test runs"
        )
    output_dir = tmp_path / "out"
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch",
        "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero3_offload.yaml"),
        "--num_processes", "2", "--main_process_port", str(29700 + os.getpid() % 1000),
        str(REPO / "run_train.py"), "--data-dir", str(cached_store(trained_target)),
        "--base-model", str(trained_target), "--output-dir", str(output_dir), "--max_steps", "2",
        "--batch-size", "4", "--lr", "3e-3", "--eval-ratio", "0", "--save_strategy", "steps", "--save_steps", "2",
        "--draft-vocab-size", "256", "--ttt-steps", "2", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-5000:]
    # The optimizer DeepSpeed built from the config's block: its param groups carry DeepSpeedCPUAdam's
    # `bias_correction` (a torch AdamW's carry `foreach` / `fused` instead).
    import torch

    (states,) = (output_dir / "checkpoint-2").glob("global_step2/zero_pp_rank_0_*optim_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    group = saved["optimizer_state_dict"]["param_groups"][0]
    assert "bias_correction" in group and "foreach" not in group, sorted(group)
    assert check_draft(output_dir / "best_model", trained_target) == []


def test_zero3_ranks_whose_batches_are_shorter_than_the_unroll_stay_in_step(trained_target, tmp_path):
    """ZeRO-3 gathers the draft's parameters per module call, so every rank must make the same calls.
    Samples are 27-45 tokens: with 36 TTT steps and random single-sample batches, one rank's batch is
    often shorter than the unroll while the other's is not. The TTT loop used to stop at a short
    batch's end, and the ranks then waited on each other's gathers (a hang, or a gloo error)."""
    output_dir = tmp_path / "out"
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch",
        "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml"),
        "--num_processes", "2", "--main_process_port", str(29900 + os.getpid() % 97),
        str(REPO / "run_train.py"), "--data-dir", str(cached_store(trained_target)),
        "--base-model", str(trained_target), "--output-dir", str(output_dir), "--max_steps", "6",
        "--batch-size", "1", "--train_sampling_strategy", "random", "--eval-ratio", "0", "--save_strategy", "no",
        "--draft-vocab-size", "256", "--ttt-steps", "36", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert check_draft(output_dir / "best_model", trained_target) == []
