"""`make install` honours EXTRAS: the stamp records the extras a venv was built with, and other
extras are refused (pip would keep the CPU torch) instead of silently doing nothing.

Runs make with --dry-run on a copy of the Makefile and its prerequisites, so nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_EXTRAS = "vllm,deepspeed,wandb,plot,dev"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "tools/install.sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


def installed(checkout: Path, extras: str | None) -> None:
    """A venv as `make install` leaves it (newer than its prerequisites); None: an old, empty stamp."""
    (checkout / ".venv").mkdir()
    stamp = checkout / ".venv" / ".installed"
    stamp.write_text("" if extras is None else " ".join(sorted(extras.split(","))) + "\n")
    later = time.time() + 10
    os.utime(stamp, (later, later))


def make(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("EXTRAS", "VENV", "MAKEFLAGS")}
    return subprocess.run(["make", "-n", *args], cwd=checkout, env=env, capture_output=True, text=True)


def test_a_fresh_install_passes_extras_and_records_them(checkout):
    result = make(checkout, "install", f"EXTRAS={GPU_EXTRAS}")
    assert result.returncode == 0, result.stderr
    assert f'EXTRAS="{GPU_EXTRAS}" bash tools/install.sh' in result.stdout
    assert 'echo "deepspeed dev plot vllm wandb" > .venv/.installed' in result.stdout
    assert "sys.version_info < (3, 11)" in result.stdout  # a too-old PYTHON is named before the venv


def test_other_extras_than_the_venvs_are_refused_with_what_to_do(checkout):
    installed(checkout, "cpu,deepspeed,wandb,plot,dev")
    result = make(checkout, "install", f"EXTRAS={GPU_EXTRAS}")
    assert result.returncode != 0
    assert "was built with EXTRAS=cpu,deepspeed,dev,plot,wandb" in result.stderr
    assert f"make clean && make install EXTRAS={GPU_EXTRAS}" in result.stderr
    # ... and `make clean install` is the way through
    assert "rm -rf .venv" in make(checkout, "clean", "install", f"EXTRAS={GPU_EXTRAS}").stdout


def test_the_same_extras_in_another_order_and_later_targets_keep_the_venv(checkout):
    installed(checkout, GPU_EXTRAS)
    assert "Nothing to be done" in make(checkout, "install", "EXTRAS=dev,plot,wandb,deepspeed,vllm").stdout
    # Without EXTRAS, `make test` uses the GPU venv as it is instead of the CPU default.
    result = make(checkout, "test")
    assert result.returncode == 0, result.stderr
    assert "install.sh" not in result.stdout and "pytest" in result.stdout


def test_a_venv_from_before_the_stamp_recorded_extras(checkout):
    installed(checkout, None)
    assert make(checkout, "test").returncode == 0  # nothing asked for: used as it is
    result = make(checkout, "install", f"EXTRAS={GPU_EXTRAS}")
    assert result.returncode != 0 and "before make recorded its extras" in result.stderr
    assert "make clean && make install" in result.stderr
