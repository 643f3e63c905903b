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


QUESTIONS = ("Count from 3 to 10.", "Spell the word tiger.", "What is 4 plus 5?")


@pytest.fixture(scope="session")
def vllm_bench():
    """Run ``python -m eagle3.evaluate.vllm_bench`` (real vLLM, in a subprocess) and return its JSON.

    ``prompts``: token-id lists, or None for the chat-rendered ``QUESTIONS``. vLLM wants a
    ``__main__`` process of its own; a subprocess also frees its memory afterwards.
    """
    import json
    import subprocess
    import sys

    def run(target, drafts, workdir, prompts=None, baseline=False, k=3, max_tokens=32, temperature=0.0) -> dict:
        if prompts is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(target)
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, enable_thinking=False, tokenize=False
                )
                for q in QUESTIONS
            ]
        workdir = Path(workdir)
        (workdir / "prompts.json").write_text(json.dumps(prompts))
        command = [sys.executable, "-m", "eagle3.evaluate.vllm_bench", "--model", str(target)]
        command += ["--baseline"] if baseline else []
        command += [arg for draft in drafts for arg in ("--draft", str(draft))]
        command += ["--num-speculative-tokens", str(k), "--max-tokens", str(max_tokens)]
        command += ["--temperature", str(temperature)]
        command += ["--prompts", str(workdir / "prompts.json"), "--json", str(workdir / "vllm.json")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads((workdir / "vllm.json").read_text())

    return run


@pytest.fixture
def no_hf_login(monkeypatch, tmp_path):
    """No Hugging Face token anywhere: no HF_TOKEN, no saved login (the token file is redirected)."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
