"""The device is never a surprise: every command says which it uses, and a GPU machine whose torch
sees no GPU stops before loading anything, saying what to do.

A GPU machine is simulated: a fake `nvidia-smi` on PATH, a stand-in for /dev/nvidia0 or
CUDA_VISIBLE_DEVICES, and torch.cuda / torch.version.cuda monkeypatched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from eagle3 import device as dev
from eagle3.device import DeviceError, resolve_device, select_device

SMI_GPUS = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"
GPU_INSTALL = "make clean && make install EXTRAS=vllm,deepspeed,wandb,plot,dev"


def fake_nvidia_smi(directory: Path, driver: str = "580.65.06", gpus: str = SMI_GPUS) -> None:
    """An nvidia-smi answering `-L` and `--query-gpu=driver_version`, as the real one does."""
    script = directory / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-L" ]; then printf %s "{gpus}"; exit 0; fi\n'
        f'case "$1" in --query-gpu=driver_version) echo "{driver}"; echo "{driver}"; exit 0;; esac\n'
        "exit 9\n"
    )
    script.chmod(0o755)


@pytest.fixture
def cpu_machine(tmp_path, monkeypatch):
    """No GPU anywhere: torch's CPU build, nothing on PATH, no device node, no CUDA_VISIBLE_DEVICES."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(dev, "DEV_NODE", tmp_path / "nvidia0")
    for name in ("CUDA_VISIBLE_DEVICES", dev.ALLOW_CPU_ENV, "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    return bin_dir


@pytest.fixture
def gpu_machine(cpu_machine):
    """Two NVIDIA GPUs that torch (the CPU build, unless a test says otherwise) does not see."""
    fake_nvidia_smi(cpu_machine)
    return cpu_machine


def test_a_cpu_machine_runs_on_cpu_and_says_so(cpu_machine, capsys):
    assert select_device() == torch.device("cpu")
    assert capsys.readouterr().err == f"device: cpu (torch {torch.__version__})\n"


def test_a_gpu_machine_with_the_cpu_torch_stops_with_what_to_do(gpu_machine):
    with pytest.raises(DeviceError) as error:
        resolve_device()
    message = str(error.value)
    assert "nvidia-smi lists 2 GPUs" in message and "CPU build" in message
    assert GPU_INSTALL in message and "--device cpu, or EAGLE3_ALLOW_CPU=1" in message


@pytest.mark.parametrize("signal", ["dev_node", "CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=GPU-5a3e"])
def test_each_gpu_signal_counts_without_nvidia_smi(cpu_machine, tmp_path, monkeypatch, signal):
    if signal == "dev_node":
        (tmp_path / "nvidia0").touch()
        expected = f"{tmp_path / 'nvidia0'} exists"
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", signal.split("=")[1])
        expected = signal
    with pytest.raises(DeviceError, match=expected):
        resolve_device()


@pytest.mark.parametrize("hidden", ["", "-1", "NoDevFiles"])
def test_cuda_visible_devices_that_hide_every_device_is_no_gpu_signal(cpu_machine, monkeypatch, hidden):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert resolve_device() == torch.device("cpu")


def test_cpu_on_a_gpu_machine_when_asked_for(gpu_machine, monkeypatch, capsys):
    assert select_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == f"device: cpu (torch {torch.__version__})\n"
    monkeypatch.setenv(dev.ALLOW_CPU_ENV, "1")
    assert select_device() == torch.device("cpu")
    assert "EAGLE3_ALLOW_CPU=1" in capsys.readouterr().err


def test_asking_for_cuda_where_torch_has_none(cpu_machine):
    with pytest.raises(DeviceError, match=r"--device cuda:1: a CUDA device was asked for: .*CPU build"):
        resolve_device("cuda:1")


def test_a_driver_too_old_for_torchs_cuda_is_named(gpu_machine, monkeypatch):
    fake_nvidia_smi(gpu_machine, driver="550.54.15")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(RuntimeError("driver too old")))
    with pytest.raises(DeviceError) as error:
        resolve_device()
    message = str(error.value)
    assert "built for CUDA 13.0, which needs NVIDIA driver R580 (580.x) or newer" in message
    assert "nvidia-smi reports driver 550.54.15" in message and "make clean" not in message


def test_a_cuda_build_that_cannot_start_for_another_reason_quotes_torch(gpu_machine, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(RuntimeError("CUDA unknown error 999")))
    with pytest.raises(DeviceError, match=r"cannot initialise CUDA \(CUDA unknown error 999\).*580.65.06"):
        resolve_device()


def test_a_visible_gpu_is_this_ranks_and_named(cpu_machine, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"NVIDIA H100 #{index}")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert select_device() == torch.device("cuda", 1)
    assert capsys.readouterr().err == ""  # only local rank 0 speaks
    monkeypatch.setenv("LOCAL_RANK", "0")
    select_device()
    assert capsys.readouterr().err == f"device: cuda:0 (NVIDIA H100 #0, torch {torch.__version__}, CUDA 13.0)\n"
    with pytest.raises(DeviceError, match="--device cuda:5: torch sees 2 GPU"):
        resolve_device("cuda:5")


def test_the_collectors_default_device_is_checked_too(gpu_machine, monkeypatch):
    """HfBackend's default (library use, e.g. demo.py) goes through the same check."""
    from eagle3.collect.hf import default_device

    with pytest.raises(DeviceError, match="CPU build"):
        default_device()
    monkeypatch.setenv(dev.ALLOW_CPU_ENV, "1")
    assert default_device() == "cpu"


# --- every command resolves its device first ---------------------------------------------------


def test_run_collect_stops_before_loading_the_model(gpu_machine, random_target, tmp_path, capsys):
    from eagle3.collect.args import parse_args
    from eagle3.collect.cli import announce_device, main

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "hi"}) + "\n")
    argv = ["--model", str(random_target), "--dataset", str(chats), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert GPU_INSTALL in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # --backend vllm: the servers run the target, this process needs no GPU
    announce_device(parse_args([*argv, "--backend", "vllm", "--server-url", "http://127.0.0.1:9"]))
    assert "device: the vLLM servers run the target" in capsys.readouterr().err


def test_collection_client_leaves_the_cpus_to_the_servers(monkeypatch):
    """The vLLM client's torch threads: a quarter of the CPUs (at least one), or OMP_NUM_THREADS."""
    from eagle3.collect.vllm_client import client_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    for cpus, threads in ((1, 1), (2, 1), (8, 2), (64, 16), (None, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert client_cpu_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # the user's choice stands
    assert client_cpu_threads() == 64


def test_run_train_stops_before_reading_data(gpu_machine, tmp_path, capsys, monkeypatch):
    from eagle3.train.cli import main

    argv = ["--data-dir", str(tmp_path / "no-data"), "--output-dir", str(tmp_path / "out"), "--report_to", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert GPU_INSTALL in err and "--use_cpu, or EAGLE3_ALLOW_CPU=1" in err
    assert main([*argv, "--use_cpu"]) == 2  # the user's CPU run: on to the data, which is missing
    err = capsys.readouterr().err
    assert f"device: cpu (torch {torch.__version__})" in err and GPU_INSTALL not in err


def test_run_eval_stops_before_loading_models(gpu_machine, random_target, tmp_path):
    from eagle3.evaluate.run import EvalInputError, evaluate, parse_args

    (tmp_path / "draft").mkdir()
    (tmp_path / "draft" / "config.json").write_text("{}")  # never read: the device check comes first
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    argv = ["--model", str(random_target), "--draft", str(tmp_path / "draft"), "--dataset", str(prompts)]
    with pytest.raises(EvalInputError, match="make clean && make install"):
        evaluate(parse_args(argv))


def test_the_readme_names_what_a_gpu_user_needs():
    """The README's "Start here" and the messages here give the same requirements."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start_here = readme[readme.index("## Start here") : readme.index("## What EAGLE-3 is")]
    for needed in (
        "eagle3 env",
        f"make install EXTRAS={dev.GPU_EXTRAS}",
        f"R{dev.MIN_DRIVER[13]} ({dev.MIN_DRIVER[13]}.x) or newer",
        "python3.11-venv",
        "PYTHON=python3.11 make install",
        f"{dev.ALLOW_CPU_ENV}=1",
        "make clean && make install",
    ):
        assert needed in start_here, needed


def test_a_cpu_without_native_bf16_computes_a_bf16_target_in_fp32(monkeypatch, capsys):
    """AVX2-only CPUs emulate bf16 matmuls (>50x slower): --dtype auto computes the bf16 target in
    fp32 there and says so; with native bf16, or an explicit --dtype, nothing changes."""
    from eagle3.collect.hf import HfBackend
    from eagle3.data.template import ChatRenderer
    from eagle3.testing import family_target

    target = family_target("qwen3_moe", dtype="bfloat16")
    from transformers import AutoTokenizer

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(target))
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    backend = HfBackend(str(target), renderer, [0], device="cpu")
    assert backend.model.dtype == torch.float32 and "no native bf16" in capsys.readouterr().err
    assert HfBackend(str(target), renderer, [0], device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert HfBackend(str(target), renderer, [0], device="cpu").model.dtype == torch.bfloat16
