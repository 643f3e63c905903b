"""Shared fixtures: the tiny Qwen3 targets (built once, cached) and the shared test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def trained_target() -> Path:
    """Tiny Qwen3 (8 layers, H=128, head_dim 64) trained briefly on synthetic chats."""
    from eagle3.testing import tiny_target

    return tiny_target(trained=True)


@pytest.fixture(scope="session")
def random_target() -> Path:
    """Same shapes, random weights: fast to build, for shape/format tests."""
    from eagle3.testing import tiny_target

    return tiny_target(trained=False)


@pytest.fixture(scope="session")
def qwen3_chat_template() -> str:
    """Qwen3's real chat template (public data in ../shared/data); skipped when absent."""
    path = SHARED_DATA / "qwen3_chat_template.jinja"
    if not path.exists():
        pytest.skip(f"{path} not present (only in the project's CI checkout)")
    return path.read_text()
