"""Every Qwen3-family architecture, in its published layouts: training sees the target's own
distribution, the draft's rope is the one vLLM builds, and collect -> train -> check works.

Targets are tiny random-weight checkpoints saved by transformers' own classes
(``eagle3.testing.build_family_target``); their norms are random so that reading the final norm
with the wrong convention (x * w for Qwen3-Next / Qwen3.5's x * (1 + w)) shows at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eagle3.collect.cli import main as collect_main
from eagle3.collect.hf import capture_states
from eagle3.config import Eagle3Qwen3Config
from eagle3.export.check import check_draft, errors
from eagle3.export.numerics import rope_problems, target_distribution_problems
from eagle3.families import UnknownTargetError, decoder_layers, load_text_model
from eagle3.target import TargetHead, load_target_config, target_family
from eagle3.testing import FAMILY_TARGETS, family_target, synthetic_conversations, write_jsonl
from eagle3.train.args import parse_args
from eagle3.train.main import train

# (name, tied): every architecture, plus Qwen3.5's tied nested layout (Qwen3.5-4B ships so).
TARGETS = [(name, False) for name in FAMILY_TARGETS] + [("qwen3_5", True)]
IDS = [f"{name}{'-tied' if tied else ''}" for name, tied in TARGETS]


@pytest.fixture(scope="module", params=TARGETS, ids=IDS)
def target(request) -> Path:
    name, tied = request.param
    return family_target(name, tied=tied)


def _chat_ids(target: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    messages = synthetic_conversations(1, seed=5, turns=2)[0]["messages"]
    return torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)])


def test_training_target_distribution_is_the_models_own(target):
    """The collection capture + training's norm and head give the model's own logits, every position."""
    config = load_target_config(target)
    model = load_text_model(str(target), target_family(config), dtype=torch.float32).eval()
    ids = _chat_ids(target)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    _, last = capture_states(model, [0], ids, torch.ones_like(ids), torch.float32)
    ours = TargetHead.from_pretrained(target).logits(last[0])
    assert (ours.argmax(-1) == logits.argmax(-1)).all()
    assert float((ours - logits).abs().max()) < 1e-3
    assert len(decoder_layers(model)) == config.num_hidden_layers  # linear-attention layers counted too


def test_the_old_norm_convention_is_caught(target):
    """``eagle3 check``'s numeric test: planting x * w where the family is x * (1 + w) (and the
    reverse) makes it fail with a message that says so."""
    head = TargetHead.from_pretrained(target)
    assert target_distribution_problems({"target_final_norm": _convention(head)}, target, head) == []
    head.zero_centred_norm = not head.zero_centred_norm
    problems = target_distribution_problems({"target_final_norm": _convention(head)}, target, head)
    assert any("target distribution differs" in p.what for p in problems)
    assert any("retrain" in p.fix or "families.py" in p.fix for p in problems)


def _convention(head: TargetHead) -> str:
    return "zero_centred" if head.zero_centred_norm else "standard"


def test_draft_config_for_the_family(target):
    """The draft's rope is full-rotary with the target's theta (what vLLM builds from it equals what
    training uses), its dtype and MLP width come from the target, its norm convention is recorded."""
    config = load_target_config(target)
    draft = Eagle3Qwen3Config.from_target_config(config)
    saved = draft.to_dict()
    assert not {"partial_rotary_factor", "mrope_section", "mrope_interleaved"} & set(saved["rope_parameters"])
    assert saved["rope_parameters"]["rope_theta"] == config.rope_parameters["rope_theta"]
    assert rope_problems(saved) == []
    assert saved["dtype"] == "float32"
    moe_default = (3 * config.hidden_size + 255) // 256 * 256  # 3 x hidden, rounded up to 256
    assert saved["intermediate_size"] == (getattr(config, "intermediate_size", None) or moe_default)
    family = target_family(config)
    assert saved["target_final_norm"] == ("zero_centred" if family.zero_centred_norm else "standard")


def test_the_old_rope_is_caught():
    """A draft config carrying the target's partial rotary / mrope keys (what training wrote
    before) makes vLLM build a rope training never used: check says which."""
    target = family_target("qwen3_5")
    saved = Eagle3Qwen3Config.from_target_config(load_target_config(target)).to_dict()
    saved["rope_parameters"] = dict(saved["rope_parameters"], partial_rotary_factor=0.25)
    problems = rope_problems(saved)
    assert problems and "rotary_dim 16 of head_dim 64" in problems[0].what


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_attention_heads=1, num_hidden_layers=2).save_pretrained(tmp_path)
    with pytest.raises(UnknownTargetError, match="model_type 'llama' is not a Qwen3-family"):
        load_target_config(tmp_path)
    problems = check_draft(tmp_path, tmp_path)  # the draft folder does not matter: the target is refused first
    assert problems and "not a Qwen3-family" in " ".join(p.what for p in problems)


def test_check_fails_on_a_draft_trained_before_the_norm_was_known(tmp_path):
    """A draft without ``target_final_norm`` for a zero-centred target is one trained against the
    wrong distribution (by an earlier version): check says so; for dense Qwen3 it is fine."""
    from eagle3.cli import new_draft

    for name, bad in (("qwen3_5", True), ("qwen3_moe", False)):
        target = family_target(name)
        draft = new_draft(target, tmp_path / name)
        config = json.loads((draft / "config.json").read_text())
        assert errors(check_draft(draft, target)) == []
        config.pop("target_final_norm")
        (draft / "config.json").write_text(json.dumps(config))
        messages = " ".join(p.what for p in errors(check_draft(draft, target)))
        assert ("does not record which final-norm convention" in messages) == bad


def collect_and_train(target: Path, work: Path, chats: int = 6, steps: int = 2, *collect_flags: str) -> Path:
    """collect (hf) -> train, the documented commands with test-sized settings; the best_model folder."""
    data = write_jsonl(work / "chats.jsonl", synthetic_conversations(chats, seed=2))
    collect_main(
        ["--model", str(target), "--dataset", str(data), "--output-dir", str(work / "data")]
        + ["--max-new-tokens", "8", "--batch-size", str(chats), "--quiet", *collect_flags]
    )
    output_dir = work / "out"
    argv = ["--data-dir", str(work / "data"), "--output-dir", str(output_dir), "--max_steps", str(steps)]
    argv += ["--eval-ratio", "0", "--save_strategy", "steps", "--save_steps", str(steps), "--report_to", "none"]
    argv += ["--disable_tqdm", "true", "--draft-vocab-size", "256", "--ttt-steps", "2"]
    argv += ["--dataloader_num_workers", "0", "--per_device_train_batch_size", "2"]
    train(parse_args(argv))
    return output_dir / "best_model"


@pytest.mark.parametrize(("name", "tied"), TARGETS, ids=IDS)
def test_collect_train_check(name, tied, tmp_path):
    """The documented pipeline on each architecture: collect (hf) -> train -> check."""
    target = family_target(name, tied=tied)
    best = collect_and_train(target, tmp_path)
    assert errors(check_draft(best, target)) == [], check_draft(best, target)
    config = json.loads((best / "config.json").read_text())
    assert config["target_final_norm"] == ("zero_centred" if name.startswith(("qwen3_next", "qwen3_5")) else "standard")


@pytest.fixture(scope="module")
def family_draft(target, tmp_path_factory) -> Path:
    from eagle3.cli import new_draft

    return new_draft(target, tmp_path_factory.mktemp("draft") / "draft")


def test_in_process_speculation_is_lossless(target, family_draft):
    """run_eval's hf decoder at T=0 on every architecture, with proposals partly accepted and partly
    rejected (an oracle draft head that is wrong every 4th call): a hybrid target's recurrent
    state must be rolled back exactly on every rejection for the output to equal target-only."""
    from eagle3.evaluate.speculative import SpeculativeDecoder
    from eagle3.modeling import Eagle3Qwen3ForCausalLM

    model = load_text_model(str(target), target_family(load_target_config(target)), dtype=torch.float32)
    draft = Eagle3Qwen3ForCausalLM.from_pretrained(family_draft)
    draft.load_target_embeddings(model.get_input_embeddings().weight)
    decoder = SpeculativeDecoder(model, draft, num_speculative_tokens=3)
    decoder.eos_ids = set()  # random weights may pick the stop token at once: decode a fixed length
    prompt = _chat_ids(target)[0, :12].tolist()
    reference, _ = decoder.generate_target_only(prompt, 24)
    full = prompt + reference
    calls = {"n": 0, "position": 0}
    original_step = draft.draft_step

    def tracking_step(hidden, embeds, positions, cache):
        calls["position"] = int(positions[0, -1]) + 2  # the draft at rope position p predicts token p + 2
        return original_step(hidden, embeds, positions, cache)

    def oracle_logits(normed):
        calls["n"] += 1
        logits = torch.zeros(normed.shape[0], normed.shape[1], draft.config.draft_vocab_size)
        produced = calls["position"]
        logits[..., full[produced] if produced < len(full) and calls["n"] % 4 else 0] = 1.0
        return logits

    draft.draft_step, draft.compute_logits = tracking_step, oracle_logits
    result = decoder.generate(prompt, 24)
    decoder.close()
    assert result.output_ids == reference
    assert 0 < result.accepted < 3 * result.rounds  # both accepted and rejected proposals happened


def test_run_eval_hf_on_every_architecture(family_draft, target, tmp_path):
    """The whole run_eval --backend hf path (speculation, target-only baseline, teacher-forced
    estimate) on each architecture: it runs and reports lossless at T=0."""
    from eagle3.evaluate.run import evaluate
    from eagle3.evaluate.run import parse_args as eval_args

    prompts = write_jsonl(tmp_path / "prompts.jsonl", synthetic_conversations(2, seed=7))
    args = ["--model", str(target), "--draft", str(family_draft), "--dataset", str(prompts)]
    report = evaluate(eval_args(args + ["--max-new-tokens", "10", "--output", str(tmp_path / "r.json")]))
    assert report.lossless is True and report.rounds > 0


def test_parameter_counts_of_qwen3_30b_a3b(tmp_path):
    """All experts count for memory, the routed share for compute: Qwen3-30B-A3B's published
    30.5B total / 3.3B active, from its config alone (a meta-device instance)."""
    from transformers import Qwen3MoeConfig

    from eagle3.families import family_of, parameter_counts
    from eagle3.train.memory_model import estimate_peak_memory, target_shape

    config = Qwen3MoeConfig(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    total, active = parameter_counts(str(tmp_path), family_of(config))
    assert 30.4e9 < total < 30.6e9 and 3.3e9 < active < 3.4e9
    shape = dict(target_shape(config), draft_vocab_size=32000, tokens_per_batch=2048)
    offline = estimate_peak_memory(**shape)
    online = estimate_peak_memory(**shape, online_target_bytes=total * 2)
    assert online.total - offline.total == total * 2 and "frozen target" in online.table()
    assert estimate_peak_memory(**shape, num_aux=5).total > offline.total  # more aux layers, wider fc


def test_online_training_on_an_moe_target_prints_the_target_in_its_estimate(tmp_path, capsys):
    """--online --dataset on Qwen3-MoE: the in-process target regenerates, captures and trains,
    and the memory estimate printed before step 1 includes the whole target."""
    target = family_target("qwen3_moe")
    data = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(6, seed=3))
    argv = ["--model", str(target), "--online", "--dataset", str(data), "--output-dir", str(tmp_path / "out")]
    argv += ["--max_steps", "2", "--eval-ratio", "0", "--report_to", "none", "--disable_tqdm", "true"]
    argv += ["--draft-vocab-size", "256", "--ttt-steps", "2", "--dataloader_num_workers", "0"]
    train(parse_args(argv))
    assert "frozen target (--online, all experts)" in capsys.readouterr().out
    assert errors(check_draft(tmp_path / "out" / "best_model", target)) == []
