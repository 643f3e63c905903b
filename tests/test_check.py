"""`eagle3 check` catches each silent failure of the vLLM contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3.cli import new_draft
from eagle3.export.check import check_draft, errors
from eagle3.target import EMBED, read_target_tensors


@pytest.fixture(scope="module")
def good_draft(random_target, tmp_path_factory):
    path = tmp_path_factory.mktemp("draft") / "good"
    new_draft(random_target, path, draft_vocab_size=300)
    # A real (non-arange) draft vocab: every other id.
    tensors = load_file(path / "model.safetensors")
    ids = torch.arange(0, 600, 2)
    tensors["d2t"] = ids - torch.arange(300)
    tensors["t2d"] = torch.zeros(tensors["t2d"].numel(), dtype=torch.bool)
    tensors["t2d"][ids] = True
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def broken_copy(good_draft, tmp_path, edit_tensors=None, edit_config=None):
    path = tmp_path / "broken"
    shutil.copytree(good_draft, path)
    if edit_tensors:
        tensors = load_file(path / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_good_draft_passes(good_draft, random_target):
    assert check_draft(good_draft, random_target) == []


def _rename(tensors):
    tensors["model.fc.weight"] = tensors.pop("fc.weight")


def _drop_qk_norm(tensors):
    del tensors["midlayer.self_attn.q_norm.weight"], tensors["midlayer.self_attn.k_norm.weight"]


def _drop_d2t(tensors):
    del tensors["d2t"], tensors["t2d"]


def _unsorted_d2t(tensors):
    # target ids of draft ids 0 and 1 swapped: (0, 2) -> (2, 0)
    tensors["d2t"][0], tensors["d2t"][1] = 2, -1


def _aux_out_of_range(config):
    config["eagle_aux_hidden_state_layer_ids"] = [2, 4, 9]


def _short_context(config):
    config["max_position_embeddings"] = 512


def _no_aux_ids(config):
    del config["eagle_aux_hidden_state_layer_ids"]


@pytest.mark.parametrize(
    ("edit_tensors", "edit_config", "message"),
    [
        (_rename, None, "tensor fc.weight"),
        (_drop_qk_norm, None, "q_norm.weight [64] missing"),
        (_drop_d2t, None, "tensor d2t"),
        (_unsorted_d2t, None, "strictly increasing"),
        (None, _aux_out_of_range, "outside 1..8"),
        (None, _short_context, "max_position_embeddings = 512"),
        (None, _no_aux_ids, "eagle_aux_hidden_state_layer_ids is missing"),
    ],
    ids=[
        "renamed-tensor",
        "missing-qk-norm",
        "missing-d2t",
        "unsorted-d2t",
        "aux-out-of-range",
        "short-max-positions",
        "no-aux-ids",
    ],
)
def test_each_silent_failure_is_caught(good_draft, random_target, tmp_path, edit_tensors, edit_config, message):
    path = broken_copy(good_draft, tmp_path, edit_tensors, edit_config)
    problems = errors(check_draft(path, random_target))
    assert problems, "the checker missed a broken draft"
    assert any(message in str(problem) for problem in problems), [str(p) for p in problems]
    assert all("fix:" in str(problem) for problem in problems)


@pytest.fixture(scope="module")
def eagle3_1_draft(random_target, tmp_path_factory):
    return new_draft(random_target, tmp_path_factory.mktemp("draft31") / "eagle3.1", draft_variant="eagle3.1")


def _switch_off(name):
    def edit(config):
        config[name] = False

    return edit


@pytest.mark.parametrize(
    ("edit_config", "severity", "message"),
    [
        (_switch_off("fc_norm"), "error", "weights hold fc_norm.*"),
        (_switch_off("norm_output"), "warning", "neither EAGLE-3 (all off) nor EAGLE-3.1"),
        (lambda config: config.update(norm_before_fc=True), "error", "tensor input_norm.weight"),
    ],
    ids=["fc-norm-off", "norm-output-off", "norm-before-fc-without-weights"],
)
def test_norm_switches_must_match_the_weights(eagle3_1_draft, random_target, tmp_path, edit_config, severity, message):
    """vLLM follows fc_norm / norm_output / norm_before_fc silently: a config that does not match
    the trained draft changes its math without an error."""
    assert check_draft(eagle3_1_draft, random_target) == []
    path = broken_copy(eagle3_1_draft, tmp_path, edit_config=edit_config)
    problems = [p for p in check_draft(path, random_target) if p.severity == severity]
    assert any(message in str(problem) for problem in problems), [str(p) for p in check_draft(path, random_target)]


def test_stray_safetensors_file(good_draft, random_target, tmp_path):
    path = broken_copy(good_draft, tmp_path)
    save_file({"x": torch.zeros(1)}, path / "old_checkpoint.safetensors")
    assert any("stray weights file old_checkpoint.safetensors" in str(p) for p in check_draft(path, random_target))


def test_embed_tokens_must_equal_targets(good_draft, random_target, tmp_path):
    target_embed = read_target_tensors(random_target, [EMBED])[EMBED]

    def same_embed(tensors):
        tensors["embed_tokens.weight"] = target_embed.clone()

    assert check_draft(broken_copy(good_draft, tmp_path, same_embed), random_target) == []

    def random_embed(tensors):
        tensors["embed_tokens.weight"] = torch.randn_like(target_embed)

    problems = check_draft(broken_copy(good_draft, tmp_path / "x", random_embed), random_target)
    assert any("embed_tokens.weight differs" in str(p) for p in problems)


def test_console_script_exit_codes(good_draft, random_target, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "eagle3.cli", "check", str(good_draft), "--target", str(random_target)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "OK:" in ok.stdout
    # the recommendation comes after the report, only for a draft that passes
    assert ok.stdout.index('"draft_sample_method": "probabilistic"') > ok.stdout.index("OK:")
    path = broken_copy(good_draft, tmp_path, _drop_qk_norm)
    bad = subprocess.run(
        [sys.executable, "-m", "eagle3.cli", "check", str(path), "--target", str(random_target)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "q_norm" in bad.stdout and "fix:" in bad.stdout and "draft_sample_method" not in bad.stdout


def test_target_without_architectures_is_warned_about(good_draft, random_target, tmp_path):
    """vLLM would serve such a target as an embedding model; the fix is named."""
    target = tmp_path / "target"
    shutil.copytree(random_target, target)
    config = json.loads((target / "config.json").read_text())
    del config["architectures"]
    (target / "config.json").write_text(json.dumps(config))
    problems = check_draft(good_draft, target)
    assert [p.severity for p in problems] == ["warning"]
    assert "architectures" in problems[0].what and "hf_overrides" in problems[0].fix
    assert check_draft(good_draft, random_target) == []
