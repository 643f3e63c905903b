"""The TTT unroll and its loss on a tiny random draft (no data on disk needed)."""

import torch
import torch.nn.functional as F

from eagle3.config import Eagle3Qwen3Config
from eagle3.target import TargetHead
from eagle3.train.loss import TargetProjector, metrics_from_stats, ttt_loss
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
    # per step: ce_sum, hits, valid, run positions; then assistant positions
    stats = torch.tensor([0.0, 8, 10, 8, 0, 5, 10, 4, 0, 5, 10, 1, 10])
    metrics = metrics_from_stats(stats, steps)
    assert abs(metrics["acc_0"] - 0.8) < 1e-9 and abs(metrics["cum_acc_2"] - 0.8 * 0.5 * 0.5) < 1e-9
    assert abs(metrics["accept_len_product"] - (1 + 0.8 + 0.4 + 0.2)) < 1e-9
    assert abs(metrics["accept_len"] - (1 + (8 + 4 + 1) / 10)) < 1e-9
