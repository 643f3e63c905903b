"""The TTT unroll and its loss on a tiny random draft (no data on disk needed)."""

import pytest
import torch
import torch.nn.functional as F

from eagle3.config import Eagle3Qwen3Config
from eagle3.target import TargetHead
from eagle3.train.loss import (
    STATS_PER_STEP,
    TargetProjector,
    count_items,
    metrics_from_stats,
    step_loss,
    ttt_loss,
)
from eagle3.train.model import Eagle3DraftForTraining

H, V, VD, T = 64, 96, 48, 12


def _draft(steps=3):
    config = Eagle3Qwen3Config(
        hidden_size=H,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=96,
        vocab_size=V,
        draft_vocab_size=VD,
        target_layers=[0, 1, 2],
        num_hidden_layers=1,
        target_hidden_size=H,
    )
    torch.manual_seed(0)
    draft = Eagle3DraftForTraining(config)
    draft.set_draft_vocab(torch.arange(0, 2 * VD, 2))
    draft.ttt_steps = steps
    return draft


def _head():
    torch.manual_seed(1)
    config = type("C", (), {"rms_norm_eps": 1e-6})()
    return TargetHead(config=config, embed_tokens=torch.randn(V, H), norm=torch.ones(H), lm_head=torch.randn(V, H))


def _batch(b=2):
    torch.manual_seed(2)
    return {
        "input_ids": torch.randint(0, V, (b, T)),
        "aux": torch.randn(b, T, 3 * H),
        "last": torch.randn(b, T, H),
        "mask": torch.ones(b, T, dtype=torch.bool),
    }


def test_chunked_full_argmax_and_draft_vocab_mask():
    head, draft_ids = _head(), torch.arange(0, 2 * VD, 2)
    projector = TargetProjector(head, draft_ids, vocab_chunk=7)
    batch = _batch()
    target = projector(batch["last"], batch["mask"])
    full = projector.normed(batch["last"]) @ head.lm_head.T
    assert torch.equal(projector.full_argmax(projector.normed(batch["last"]).flatten(0, 1)), full.argmax(-1).flatten())
    in_vocab = full.argmax(-1) % 2 == 0
    expected_valid = in_vocab.clone()
    expected_valid[:, -1] = False  # nothing follows the last token
    assert torch.equal(target.valid, expected_valid)
    assert torch.allclose(target.probs.sum(-1), torch.ones(2, T))
    assert torch.equal(draft_ids[target.pred][target.valid], full.argmax(-1)[target.valid])


def test_one_step_loss_is_soft_cross_entropy_at_shifted_positions():
    draft, head = _draft(steps=1), _head()
    batch = _batch()
    target = TargetProjector(head, draft.draft_to_target_ids())(batch["last"], batch["mask"])
    loss, stats = ttt_loss(draft, batch["input_ids"], batch["aux"], target, steps=1, decay=0.8)
    # Reference: step 0 at t sees fc(aux_t) and x_{t+1}, predicts the target's distribution at t+1.
    hidden = draft.fc(batch["aux"])
    embeds = draft.embed_tokens(F.pad(batch["input_ids"][:, 1:], (0, 1)))
    normed, _ = draft.draft_step(hidden, embeds, torch.arange(T).expand(2, T), draft.new_cache("ttt"))
    logp = draft.compute_logits(normed[:, : T - 1]).log_softmax(-1)
    ce = -(target.probs[:, 1:] * logp).sum(-1)
    valid = target.valid[:, 1:]
    assert torch.allclose(loss, (ce * valid).sum() / valid.sum(), atol=1e-5)
    assert stats[2] == valid.sum()


def test_step_outputs_are_causal_and_later_steps_see_only_their_own_position():
    draft, head = _draft(steps=3), _head()
    batch = _batch(b=1)
    target = TargetProjector(head, draft.draft_to_target_ids())(batch["last"], batch["mask"])
    draft.eval()
    _, base = ttt_loss(draft, batch["input_ids"], batch["aux"], target, steps=3, decay=0.8)
    # Changing the last position's aux state and token must not change any earlier position's result.
    aux2, ids2 = batch["aux"].clone(), batch["input_ids"].clone()
    aux2[:, -1] += 5.0
    ids2[:, -1] = (ids2[:, -1] + 1) % V
    target2 = TargetProjector(head, draft.draft_to_target_ids())(batch["last"], batch["mask"])
    for name in ("valid", "pred"):
        assert torch.equal(getattr(target, name), getattr(target2, name))
    loss_a, stats_a = ttt_loss(draft, batch["input_ids"], batch["aux"], target, steps=3, decay=0.8)
    loss_b, stats_b = ttt_loss(draft, ids2, aux2, target2, steps=3, decay=0.8)
    # x_{T-1} is the step-0 input at t = T-2, whose prediction target x_T is out of range, and the
    # step-i input at t = T-2-i; those positions are masked, so the whole loss is unchanged.
    assert torch.allclose(loss_a, loss_b, atol=1e-5) and torch.equal(stats_a, stats_b)
    assert torch.equal(base, stats_a)


def test_head_checkpointing_gives_the_same_loss_and_gradients():
    batch = _batch()
    results = []
    for checkpointing in (False, True):
        draft, head = _draft(steps=3), _head()
        target = TargetProjector(head, draft.draft_to_target_ids())(batch["last"], batch["mask"])
        loss, _ = ttt_loss(draft, batch["input_ids"], batch["aux"], target, 3, 0.8, head_checkpointing=checkpointing)
        loss.backward()
        results.append((loss.detach(), draft.fc.weight.grad.clone(), draft.lm_head.weight.grad.clone()))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_acceptance_estimators():
    steps = 3
    # per step: loss_sum, hits, valid, runs alive, positions eligible; then the decoding walk's
    # (accepted, rounds) at k3 and at all steps; then assistant positions
    stats = torch.tensor([0.0, 8, 10, 8, 10, 0, 5, 10, 4, 8, 0, 5, 10, 1, 4, 6, 4, 6, 4, 10])
    metrics = metrics_from_stats(stats, steps)
    assert metrics["accept_len_rounds"] == metrics["accept_len_rounds_k3"] == 1 + 6 / 4
    assert abs(metrics["acc_0"] - 0.8) < 1e-9 and abs(metrics["cum_acc_2"] - 0.8 * 0.5 * 0.5) < 1e-9
    assert abs(metrics["accept_len_product"] - (1 + 0.8 + 0.4 + 0.2)) < 1e-9
    assert abs(metrics["accept_len"] - (1 + (8 + 4 + 1) / 10)) < 1e-9


def _logits_and_target(seed=3, n=6, v=10):
    torch.manual_seed(seed)
    logits = torch.randn(1, n, v, requires_grad=True)
    probs = torch.randn(1, n, v).mul(2).softmax(-1)
    valid = torch.tensor([[True, True, False, True, True, True]])
    return logits, probs, valid


def test_forward_kl_is_soft_ce_minus_target_entropy_with_the_same_gradient():
    logits, probs, valid = _logits_and_target()
    ce = step_loss(logits, probs, valid, "soft_ce")
    (grad_ce,) = torch.autograd.grad(ce, logits)
    kl = step_loss(logits, probs, valid, "forward_kl")
    (grad_kl,) = torch.autograd.grad(kl, logits)
    entropy = -(probs * probs.log()).sum(-1)
    assert torch.allclose(kl, ce - (entropy * valid).sum(), atol=1e-5)
    assert kl > 0 and torch.allclose(grad_ce, grad_kl, atol=1e-6)


def test_lk_lambda_mixes_kl_and_acceptance_by_the_detached_mean_acceptance():
    logits, probs, valid = _logits_and_target()
    q = logits.softmax(-1)
    alpha = torch.minimum(probs, q).sum(-1)
    kl = (probs * (probs.log() - q.log())).sum(-1)
    w = torch.exp(-alpha[valid].mean()).detach()
    expected = ((w * kl + (1 - w) * (1 - alpha)) * valid).sum()
    assert torch.allclose(step_loss(logits, probs, valid, "lk_lambda"), expected, atol=1e-5)
    # a draft equal to the target: full acceptance, zero loss
    assert step_loss(probs.log(), probs, valid, "lk_lambda").abs() < 1e-5
    with pytest.raises(ValueError, match="unknown loss"):
        step_loss(logits, probs, valid, "reverse_kl")


def test_num_items_normalises_over_the_whole_accumulated_step():
    """Two micro-batches of unequal size, each divided by the step's total count, add up to the
    per-token mean over both; per-micro-batch means would weigh the small one's tokens more."""
    draft, head = _draft(steps=2), _head()
    batch = _batch(b=3)
    batch["mask"][2, :8] = False  # sample 2 has fewer answer tokens
    projector = TargetProjector(head, draft.draft_to_target_ids())
    whole = projector(batch["last"], batch["mask"])
    total = count_items(batch["mask"])
    assert total == whole.assistant[:, 1:].sum()

    def part(rows, num_items=None):
        target = projector(batch["last"][rows], batch["mask"][rows])
        loss, _ = ttt_loss(draft, batch["input_ids"][rows], batch["aux"][rows], target, 2, 0.8, num_items=num_items)
        return loss

    accumulated = part([0, 1], total) + part([2], total)
    assert torch.allclose(accumulated, part([0, 1, 2], total), atol=1e-5)
    assert not torch.allclose(accumulated, (part([0, 1]) + part([2])) / 2, atol=1e-3)


def test_run_estimator_skips_steps_fed_a_non_greedy_data_token():
    draft, head = _draft(steps=3), _head()
    batch = _batch(b=1)
    projector = TargetProjector(head, draft.draft_to_target_ids())
    target = projector(batch["last"], batch["mask"])
    # Data the target would have generated greedily wherever its argmax is in the draft vocab.
    greedy_ids = batch["input_ids"].clone()
    greedy_ids[:, 1:] = torch.where(
        target.valid[:, :-1], draft.draft_to_target_ids()[target.pred[:, :-1]], greedy_ids[:, 1:]
    )
    on_policy = projector(batch["last"], batch["mask"], greedy_ids)
    assert torch.equal(on_policy.greedy, on_policy.valid)
    draft.eval()
    _, stats_unknown = ttt_loss(draft, greedy_ids, batch["aux"], target, 3, 0.8)
    _, stats_greedy = ttt_loss(draft, greedy_ids, batch["aux"], on_policy, 3, 0.8)
    assert torch.equal(stats_unknown, stats_greedy)  # greedy data: nothing changes
    # Data that deviates from the target's choice at s: a run fed that token is no longer eligible.
    off = greedy_ids.clone()
    off[:, 1:] = (off[:, 1:] + 1) % V
    off_policy = projector(batch["last"], batch["mask"], off)
    assert not off_policy.greedy.any()
    _, stats = ttt_loss(draft, off, batch["aux"], off_policy, 3, 0.8)
    per_step = stats[:15].view(3, 5)
    assert per_step[1:, 4].sum() == 0  # steps >= 1 never eligible
    metrics = metrics_from_stats(stats, 3)
    assert abs(metrics["accept_len"] - (1 + float(per_step[0, 3] / per_step[0, 4]))) < 1e-9


def test_decoding_rounds_walk_answers_as_speculation_does():
    """Round starts: one position into each answer (the prefill writes its first token), then
    t + min(run, k) + 1; two answers in one row are walked separately."""
    from eagle3.train.loss import decoding_rounds

    answer = torch.tensor([[False, True, True, True, True, True, True, False, True, True, True]])
    runs = torch.tensor([[9, 9, 2, 0, 1, 3, 0, 9, 9, 1, 0]])
    # k=3: answer 1 (positions 1..6) rounds at 2 (keeps 2) and 5 (keeps 3); answer 2 (8..10) at 9 (keeps 1)
    # k=1: rounds at 2, 4, 6 (keeps 1, 1, 0) and 9 (keeps 1)
    assert decoding_rounds(answer, runs, (3, 1)).tolist() == [6, 3, 3, 4]


@pytest.mark.parametrize("head_checkpointing", [False, True])
def test_a_batch_shorter_than_the_unroll_still_runs_every_step(head_checkpointing):
    """Under ZeRO-3 every process must make the same module calls, whatever its batch's length:
    the steps past the end run on no positions and add nothing to the loss or the stats."""
    short, steps = 4, 6  # positions t have targets for steps 0..short-2 only
    draft, head = _draft(steps=steps), _head()
    batch = _batch()
    ids, aux, last, mask = (batch[key][:, :short] for key in ("input_ids", "aux", "last", "mask"))
    target = TargetProjector(head, draft.draft_to_target_ids())(last, mask, ids)
    calls = {"midlayer": 0, "lm_head": 0}
    hooks = [
        getattr(draft, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name in calls
    ]
    loss, stats = ttt_loss(
        draft, ids, aux, target, steps, 0.8, head_checkpointing, loss_type="lk_lambda", num_items=count_items(mask)
    )
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert calls["midlayer"] == steps
    assert calls["lm_head"] == steps * (2 if head_checkpointing else 1)  # recomputed in backward
    assert torch.isfinite(loss) and draft.fc.weight.grad is not None and torch.isfinite(draft.fc.weight.grad).all()
    # The same numbers as an unroll that stops where the targets end (what the old early exit gave).
    defined = short - 1
    reference, reference_stats = ttt_loss(
        draft, ids, aux, target, defined, 0.8, head_checkpointing, loss_type="lk_lambda", num_items=count_items(mask)
    )
    torch.testing.assert_close(loss, reference)
    per_step = STATS_PER_STEP * defined
    torch.testing.assert_close(stats[:per_step], reference_stats[:per_step])
    assert not stats[per_step : STATS_PER_STEP * steps].any()
    assert stats[-1] == reference_stats[-1]


def test_lk_eta_scales_the_acceptance_in_the_kl_weight():
    """w = exp(-eta * mean alpha): the LK paper's eta is 3; the default 1.0 is the earlier weight."""
    logits, probs, valid = _logits_and_target()
    q = logits.softmax(-1)
    alpha = torch.minimum(probs, q).sum(-1)
    kl = (probs * (probs.log() - q.log())).sum(-1)
    mean_alpha = alpha[valid].mean().detach()
    for eta in (0.0, 1.0, 3.0):
        w = torch.exp(-eta * mean_alpha)
        expected = ((w * kl + (1 - w) * (1 - alpha)) * valid).sum()
        assert torch.allclose(step_loss(logits, probs, valid, "lk_lambda", lk_eta=eta), expected, atol=1e-5)
    assert torch.equal(step_loss(logits, probs, valid, "lk_lambda"), step_loss(logits, probs, valid, "lk_lambda", 1.0))
    assert torch.allclose(step_loss(logits, probs, valid, "lk_lambda", lk_eta=0.0), (kl * valid).sum(), atol=1e-5)


def test_lk_eta_reaches_the_training_forward(random_target):
    """--lk-eta travels from the command line through build_draft into every TTT step's loss."""
    from eagle3.target import load_target_config
    from eagle3.train.args import parse_args
    from eagle3.train.main import Plan, build_draft

    head = TargetHead.from_pretrained(random_target)
    plan = Plan(base_model=str(random_target), target_config=load_target_config(random_target), target_layers=[1, 3, 4])
    draft_ids = torch.arange(head.lm_head.shape[0])  # full vocabulary: every position is valid
    losses = {}
    for eta in ("1", "3"):
        args = parse_args(["--loss", "lk_lambda", "--lk-eta", eta, "--ttt-steps", "2", "--report_to", "none"])
        draft = build_draft(args, plan, head, draft_ids)
        assert draft.lk_eta == float(eta)
        torch.manual_seed(0)
        ids = torch.randint(0, head.lm_head.shape[0], (1, 10))
        hidden = plan.target_config.hidden_size
        aux, last = torch.randn(1, 10, 3 * hidden), torch.randn(1, 10, hidden)
        target = TargetProjector(head, draft_ids)(last, torch.ones(1, 10, dtype=torch.bool), ids)
        outputs = draft(ids, aux, target.probs, target.pred, target.valid, target.assistant, target.greedy)
        reference, _ = ttt_loss(draft, ids, aux, target, 2, 0.8, loss_type="lk_lambda", lk_eta=float(eta))
        torch.testing.assert_close(outputs.loss, reference)
        losses[eta] = outputs.loss
    assert not torch.allclose(losses["1"], losses["3"])
