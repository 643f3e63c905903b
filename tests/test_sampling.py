"""Sampling above temperature 0: the hf evaluator applies top-k/top-p to the target as vLLM does,
and the serving advice (probabilistic drafting, its cost) reaches the card and `eagle3 check`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.cli import new_draft, serving_recommendation
from eagle3.evaluate.run import parse_args
from eagle3.evaluate.sampling import filter_target_logits, top_k_top_p_mask
from eagle3.evaluate.speculative import SpeculativeDecoder
from eagle3.export.hub import render_model_card
from eagle3.export.serving import draft_probs_bytes
from eagle3.modeling import Eagle3Qwen3ForCausalLM


@pytest.mark.parametrize(("top_p", "top_k"), [(0.95, 20), (0.5, 0), (1.0, 5), (0.9, 3)])
def test_top_k_top_p_keeps_what_vllm_keeps(top_p, top_k):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    ours = top_k_top_p_mask(logits, 0.6, top_p, top_k)
    k = torch.full((6,), top_k) if top_k else None
    p = torch.full((6,), top_p) if top_p < 1 else None
    theirs = apply_top_k_top_p_pytorch(logits.clone() / 0.6, k, p, allow_cpu_sync=True)
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert 0 < int(ours.isfinite().sum(-1).min())


def test_hf_backend_top_k_1_samples_the_targets_greedy_answer(random_target, tmp_path):
    """Top-k 1 leaves the target one token per step: decoding at T=0.6 must give the greedy
    answer, which it does only if the filter reaches sampling, verification and target-only runs."""
    draft_dir = new_draft(random_target, tmp_path / "draft")
    target = AutoModelForCausalLM.from_pretrained(random_target)
    draft = Eagle3Qwen3ForCausalLM.from_pretrained(draft_dir)
    draft.load_target_embeddings(target.get_input_embeddings().weight)
    greedy, _ = SpeculativeDecoder(target, draft, 3, temperature=0.0).generate_target_only([1, 5, 9, 14], 20)
    hook = filter_target_logits(target, 0.6, 0.95, 1)
    decoder = SpeculativeDecoder(target, draft, 3, temperature=0.6, seed=3, draft_sampling="probabilistic")
    sampled = decoder.generate([1, 5, 9, 14], 20).output_ids
    target_only, _ = decoder.generate_target_only([1, 5, 9, 14], 20)
    hook.remove()
    decoder.close()
    assert sampled == greedy and target_only == greedy
    assert filter_target_logits(target, 0.0, 0.95, 20) is None  # greedy runs are never filtered


def test_eval_sampling_flags_are_checked(random_target, tmp_path):
    base = ["--model", str(random_target), "--draft", str(tmp_path), "--dataset", "x.jsonl"]
    args = parse_args([*base, "--temperature", "0.6", "--top-p", "0.95", "--top-k", "20"])
    assert (args.top_p, args.top_k, args.draft_sampling) == (0.95, 20, "greedy")
    for bad in (["--top-p", "0"], ["--top-k", "-1"], ["--draft-sampling", "random"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])


def test_card_and_check_recommend_probabilistic_drafting_with_its_cost(random_target, tmp_path):
    draft = new_draft(random_target, tmp_path / "run" / "best_model")
    vocab = Eagle3Qwen3ForCausalLM.config_class.from_pretrained(draft).vocab_size
    cost = f"3 x {vocab} float32 = {draft_probs_bytes(vocab) / 2**20:.1f} MiB per running sequence"
    card = render_model_card(draft, {}, repo_id="org/draft")
    assert card.count('"draft_sample_method": "probabilistic"') == 3  # python snippet, vllm serve, advice
    assert "temperature=0.6, top_p=0.95, top_k=20" in card and cost in card
    summary = serving_recommendation(draft)
    assert '"draft_sample_method": "probabilistic"' in summary and cost in summary
    assert draft_probs_bytes(151936) == 3 * 151936 * 4  # Qwen3: 1.74 MiB per sequence at k=3
