"""DFlash drafts: vLLM's layout, the block objective, training through run_train.py, the checker,
in-process speculation, and vLLM 0.32 serving the trained draft with ``method: "dflash"``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen3Config

from eagle3.collect.cli import main as collect_main
from eagle3.config import parse_layers, resolve_layers
from eagle3.dflash import DFlashQwen3Config, DFlashQwen3ForCausalLM
from eagle3.evaluate.run import evaluate
from eagle3.evaluate.run import parse_args as parse_eval_args
from eagle3.export.check import check_draft, errors
from eagle3.testing import synthetic_conversations, write_jsonl
from eagle3.train.args import parse_args
from eagle3.train.dflash_loss import sample_anchors
from eagle3.train.loss import TargetBatch
from eagle3.train.main import train
from eagle3.train.memory_model import estimate_dflash_peak_memory, target_shape
from eagle3.train.model import DFlashDraftForTraining

try:
    from tests.train_data import Losses, StopAt, assert_resumed_equals_straight, cached_store
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from train_data import Losses, StopAt, assert_resumed_equals_straight, cached_store

REPO = Path(__file__).resolve().parents[1]
BLOCK = 4
K = BLOCK - 1
FAST = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--logging_steps", "5"]
DFLASH = ["--draft-type", "dflash", "--block-size", str(BLOCK), "--num-draft-layers", "1"]


def _tiny_target_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )


def _draft(block_size: int = 4, layers: int = 2, seed: int = 0) -> DFlashDraftForTraining:
    config = DFlashQwen3Config.from_target_config(
        _tiny_target_config(), [1, 3, 4], mask_token_id=90, num_draft_layers=layers, block_size=block_size
    )
    torch.manual_seed(seed)
    draft = DFlashDraftForTraining(config)
    draft.load_target_embeddings(torch.randn(96, 64), torch.randn(96, 64))
    draft.loss_type = "soft_ce"
    return draft.eval()


# ----------------------------------------------------------------------------- the model


def test_saved_draft_has_vllms_layout_and_config(tmp_path):
    draft = _draft()
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"mask_token_id": 90, "target_layer_ids": [1, 3, 4]}
    assert config["block_size"] == 4 and "eagle_aux_hidden_state_layer_ids" not in config
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "fc.weight" in names and "hidden_norm.weight" in names and "layers.1.self_attn.k_norm.weight" in names
    assert not names & {"embed_tokens.weight", "lm_head.weight"}  # vLLM shares the target's

    # What vLLM reads from this config.json (AutoConfig, then its own resolution functions).
    from vllm.model_executor.models.qwen3_dflash import dflash_has_any_non_causal
    from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config

    hf_config = AutoConfig.from_pretrained(tmp_path)
    assert dflash_has_any_non_causal(hf_config)  # every layer bidirectional, as trained
    spec = SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf_config))
    assert get_eagle3_aux_layers_from_config(spec) == (2, 4, 5)  # outputs of layers 1, 3, 4

    loaded = DFlashQwen3ForCausalLM.from_pretrained(tmp_path)
    for name, tensor in draft.state_dict().items():
        if not name.startswith(("embed_tokens", "lm_head")):
            torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)


def test_block_training_pass_equals_drafting_each_block_alone():
    """Training runs N blocks in one masked pass; decoding drafts one block from the context before
    its anchor. The two must give the same outputs, or training optimises another model."""
    draft = _draft(block_size=4)
    batch, length = 2, 20
    torch.manual_seed(1)
    ids = torch.randint(0, 90, (batch, length))
    aux = torch.randn(batch, length, 3 * 64)
    anchors = torch.tensor([[0, 5, 9, 17], [2, 3, 11, 19]])
    with torch.no_grad():
        together = draft.block_forward(ids, aux, anchors).view(batch, 4, 4, -1)
        for b in range(batch):
            for n, anchor in enumerate(anchors[b].tolist()):
                context = draft.context_states(aux[b : b + 1, :anchor])
                kv = draft.context_kv(context, torch.arange(anchor).unsqueeze(0))
                block = torch.tensor([[int(ids[b, anchor])] + [90] * 3])
                alone = draft.blocks(block, torch.arange(anchor, anchor + 4).unsqueeze(0), kv)
                torch.testing.assert_close(together[b, n], alone[0], atol=1e-5, rtol=1e-5)


def test_anchors_are_answer_positions_and_the_loss_ignores_everything_else():
    assistant = torch.zeros(2, 12, dtype=torch.bool)
    assistant[0, 4:10] = True  # x_5..x_10 are answer tokens: anchors a with x_a, x_{a+1} answer: 5..9
    assistant[1, 10:11] = True  # one answer token only: no anchor
    anchors, keep = sample_anchors(assistant, num_anchors=8, generator=torch.Generator().manual_seed(0))
    assert sorted(anchors[0][keep[0]].tolist()) == [5, 6, 7, 8, 9] and not keep[1].any()
    anchors, keep = sample_anchors(assistant, num_anchors=2)
    assert keep[0].sum() == 2 and set(anchors[0][keep[0]].tolist()) <= {5, 6, 7, 8, 9}

    draft = _draft().train()
    vocab = 96
    probs = torch.softmax(torch.randn(2, 12, vocab), -1)
    target = TargetBatch(probs=probs, pred=probs.argmax(-1), valid=assistant.clone(), assistant=assistant)
    out = draft(torch.randint(0, 90, (2, 12)), torch.randn(2, 12, 192), probs, target.pred, target.valid, assistant)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trained = {name for name, p in draft.named_parameters() if p.grad is not None}
    assert "fc.weight" in trained and not trained & {"embed_tokens.weight", "lm_head.weight"}


def test_layer_presets_resolve_to_dflash_defaults():
    assert parse_layers("dflash") == "dflash:5"
    assert resolve_layers(parse_layers("dflash"), 36) == [1, 9, 17, 25, 33]  # the published Qwen3-8B draft
    assert resolve_layers(parse_layers("dflash:3"), 8) == [1, 3, 5]
    with pytest.raises(ValueError, match="dflash:N"):
        parse_layers("dflash:x")


def test_memory_model_counts_the_blocks_and_the_shared_head():
    from eagle3.config import QWEN3_CONFIGS

    shape = target_shape(QWEN3_CONFIGS["qwen3-8b"])
    small = estimate_dflash_peak_memory(**shape, tokens_per_batch=2048, max_length=2048, num_anchors=128)
    large = estimate_dflash_peak_memory(**shape, tokens_per_batch=2048, max_length=2048, num_anchors=512)
    assert large.activations > 3 * small.activations  # blocks and their heads grow with the anchors
    assert small.frozen_weights == 2 * 151936 * 4096 * 4  # the target's embedding and lm_head, fp32
    assert "DFlash block activations" in large.table()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--draft-type", "dflash", "--ttt-steps", "3"], "--ttt-steps: only read by --draft-type eagle3"),
        (
            ["--draft-type", "dflash", "--draft-vocab-size", "256"],
            "--draft-vocab-size: only read by --draft-type eagle3",
        ),
        (["--block-size", "8"], "--block-size: only read by --draft-type dflash"),
        (["--draft-type", "dflash", "--block-size", "1"], "--block-size must be >= 2"),
        (["--draft-type", "dflash", "--num-anchors", "0"], "--num-anchors must be >= 1"),
    ],
)
def test_flags_of_the_other_draft_type_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--data-dir", "x", "--report_to", "none", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------- trained end to end


@pytest.fixture(scope="module")
def trained(trained_target, tmp_path_factory):
    root = tmp_path_factory.mktemp("dflash")
    argv = ["--data-dir", str(cached_store(trained_target)), "--output-dir", str(root / "out")]
    argv += ["--base-model", str(trained_target), "--epochs", "6", "--batch-size", "8", "--lr", "3e-3"]
    argv += ["--eval-ratio", "0.15", "--eval_on_start", "true", "--save_total_limit", "1", *DFLASH, *FAST]
    metrics = train(parse_args(argv))
    prompts = write_jsonl(root / "heldout.jsonl", synthetic_conversations(10, seed=4242))
    return SimpleNamespace(
        best=root / "out" / "best_model", out=root / "out", metrics=metrics, prompts=prompts, root=root
    )


def test_training_learns_and_the_best_model_passes_the_check(trained, trained_target):
    last = max(trained.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    evals = [entry["eval_accept_len"] for entry in history if "eval_accept_len" in entry]
    print(f"DFlash eval accept_len over training: {evals}")
    assert evals[0] < 1.1 and max(evals) > evals[0] + 0.4
    assert check_draft(trained.best, trained_target) == []
    card = (trained.best / "README.md").read_text()
    assert '"method": "dflash"' in card and f'"num_speculative_tokens": {K}' in card


def _copy(best: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(best, tmp_path / "draft"))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("dflash_"):
            config["dflash_config"][key.removeprefix("dflash_")] = value
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (lambda p: _edit_config(p, dflash_target_layer_ids=[1, 3, 8]), "outside 0..7"),
        (lambda p: _edit_config(p, dflash_target_layer_ids=[4, 1, 3]), "distinct and ascending"),
        (lambda p: _edit_config(p, eagle_aux_hidden_state_layer_ids=[1, 3, 4]), "wins over"),
        (lambda p: _edit_config(p, dflash_mask_token_id=10**6), "mask_token_id"),
        (lambda p: _edit_config(p, layer_types=["sliding_attention"]), "sliding"),
        (lambda p: _edit_config(p, dflash_causal=True), "causally"),
        (lambda p: _edit_config(p, architectures=["DFlashQwen3ForCausalLM"]), "DFlash draft class"),
        (lambda p: _edit_config(p, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "rope"),
        (lambda p: _edit_config(p, target_final_norm="zero_centred"), "final norm"),
        (
            lambda p: save_file(
                {**load_file(p / "model.safetensors"), "lm_head.weight": torch.zeros(768, 128)},
                str(p / "model.safetensors"),
            ),
            "lm_head.weight differs from the target's",
        ),
        (
            lambda p: save_file(
                {k: v for k, v in load_file(p / "model.safetensors").items() if k != "hidden_norm.weight"},
                str(p / "model.safetensors"),
            ),
            "hidden_norm.weight",
        ),
        (lambda p: torch.save(torch.zeros(128), p / "mask_embedding.pt"), "mask_embedding.pt"),
    ],
)
def test_check_catches_planted_faults(trained, trained_target, tmp_path, fault, message):
    draft = _copy(trained.best, tmp_path)
    fault(draft)
    problems = errors(check_draft(draft, trained_target, numerics=message in ("rope", "final norm")))
    assert any(message in problem.what for problem in problems), [p.what for p in problems]


def _hf_eval(trained, target, *extra):
    argv = ["--model", str(target), "--draft", str(trained.best), "--dataset", str(trained.prompts)]
    argv += ["-k", str(K), "--max-new-tokens", "40", "--enable-thinking", "false", *extra]
    return evaluate(parse_eval_args(argv))


@pytest.fixture(scope="module")
def hf_report(trained, trained_target):
    return _hf_eval(trained, trained_target, "--output", str(trained.root / "hf.json"))


def test_in_process_speculation_is_lossless_and_matches_the_training_estimate(hf_report):
    print(f"DFlash hf acceptance length k={K}: {hf_report.acceptance_length:.3f}")
    assert hf_report.lossless is True and hf_report.acceptance_length > 1.5
    # Teacher forcing on the answers decoding produced counts the same rounds decoding ran.
    assert hf_report.teacher_forced_acceptance_length == pytest.approx(hf_report.acceptance_length, abs=0.02)


@pytest.mark.vllm
def test_vllm_serves_the_trained_draft_losslessly_and_agrees_with_in_process(trained, trained_target, hf_report):
    report = _hf_eval(trained, trained_target, "--backend", "vllm")
    print(f"DFlash acceptance length k={K}: hf {hf_report.acceptance_length:.3f}, vLLM {report.acceptance_length:.3f}")
    assert report.speculative_config["method"] == "dflash"
    assert report.lossless is True
    assert abs(report.acceptance_length - hf_report.acceptance_length) / report.acceptance_length < 0.10
    for hf_rate, vllm_rate in zip(hf_report.per_position_acceptance, report.per_position_acceptance, strict=True):
        assert abs(hf_rate - vllm_rate) < 0.15


# ----------------------------------------------------------------------------- resume, online, ZeRO


def test_resume_equals_uninterrupted(trained_target, tmp_path):
    """The anchors are random: a resumed run must draw the same ones (the Trainer restores the RNG)."""

    def args(out, *extra):
        argv = ["--data-dir", str(cached_store(trained_target)), "--output-dir", str(out)]
        argv += ["--base-model", str(trained_target), "--max_steps", "7", "--batch-size", "16", "--lr", "3e-3"]
        argv += ["--eval-ratio", "0.15", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "100"]
        return parse_args([*argv, *DFLASH, *FAST, *extra])

    checkpoint = tmp_path / "interrupted" / "checkpoint-4"
    train(args(tmp_path / "straight"))
    train(args(tmp_path / "interrupted"), callbacks=[StopAt(4)])
    train(args(tmp_path / "interrupted", "--resume_from_checkpoint", str(checkpoint)))
    assert_resumed_equals_straight(tmp_path / "straight", tmp_path / "interrupted", checkpoint)


def test_online_equals_offline_and_collection_takes_the_dflash_layers(trained_target, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(12, seed=11))
    collect = ["--model", str(trained_target), "--dataset", str(chats), "--no-regenerate", "--quiet"]
    collect_main([*collect, "--output-dir", str(tmp_path / "states"), "--hidden-dtype", "fp32", "--layers", "dflash:2"])
    assert json.loads((tmp_path / "states" / "manifest.json").read_text())["layers"] == [1, 5]
    common = ["--base-model", str(trained_target), "--max_steps", "4", "--batch-size", "4", "--lr", "3e-3", *DFLASH]
    common += [*FAST, "--logging_steps", "1", "--eval-ratio", "0", "--save_strategy", "no"]

    def run(*argv) -> list[float]:
        losses = Losses()
        train(parse_args([*argv, *common]), callbacks=[losses])
        return losses.losses

    offline = run("--data-dir", str(tmp_path / "states"), "--output-dir", str(tmp_path / "offline"))
    collect_main([*collect, "--output-dir", str(tmp_path / "ids"), "--no-states", "--layers", "dflash:2"])
    online = run("--online", "--data-dir", str(tmp_path / "ids"), "--output-dir", str(tmp_path / "online"))
    assert len(offline) == 4 and online == pytest.approx(offline, rel=1e-4)
    config = json.loads((tmp_path / "online" / "best_model" / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == [1, 5]


@pytest.mark.slow
def test_two_process_zero3_run_saves_a_vllm_ready_draft(trained_target, tmp_path):
    """ZeRO-3 partitions the draft and the frozen target embedding/head it holds; every rank must make
    the same module calls whatever its anchors."""
    output_dir = tmp_path / "out"
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file"]
    command += [str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml"), "--num_processes", "2"]
    command += ["--main_process_port", str(29700 + os.getpid() % 1000), str(REPO / "run_train.py")]
    command += ["--data-dir", str(cached_store(trained_target)), "--base-model", str(trained_target)]
    command += ["--output-dir", str(output_dir), "--max_steps", "4", "--batch-size", "4", "--lr", "3e-3"]
    command += ["--eval-ratio", "0.15", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps"]
    command += ["--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true", *DFLASH]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=500, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert check_draft(output_dir / "best_model", trained_target) == []
    info = json.loads((output_dir / "best_model" / "eagle3_eval.json").read_text())
    assert info["metrics"]["eval_accept_len"] >= 1.0 and f"eval_acc_{K - 1}" in info["metrics"]
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert any(p.name.startswith("global_step") for p in (output_dir / "checkpoint-4").iterdir())


@pytest.mark.vllm
def test_hf_and_vllm_agree_when_sampling(trained, trained_target):
    """T=0.6 with Qwen3's top-p / top-k and probabilistic drafting: the answers are sampled, so the
    two runs follow different texts and the tolerance is wider than at T=0."""
    sampling = ["--temperature", "0.6", "--top-p", "0.95", "--top-k", "20", "--draft-sampling", "probabilistic"]
    hf = _hf_eval(trained, trained_target, *sampling, "--no-baseline")
    vllm = _hf_eval(trained, trained_target, *sampling, "--no-baseline", "--backend", "vllm")
    print(f"DFlash T=0.6 acceptance length k={K}: hf {hf.acceptance_length:.3f}, vLLM {vllm.acceptance_length:.3f}")
    assert hf.acceptance_length > 1.3, "too few accepted tokens for the comparison to mean anything"
    assert abs(hf.acceptance_length - vllm.acceptance_length) / hf.acceptance_length < 0.2
    assert abs(hf.per_position_acceptance[0] - vllm.per_position_acceptance[0]) < 0.15
