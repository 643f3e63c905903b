"""Hub naming without the network: the repo id a push uses and what the card shows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi

from eagle3.cli import build_parser, new_draft
from eagle3.cli import main as eagle3_main
from eagle3.export.hub import render_model_card, resolve_repo_id


def test_namespaced_hub_model_id_is_used_as_given(tmp_path):
    # HF_HUB_OFFLINE=1 (conftest): a whoami call here would raise, so these never touch the network.
    assert resolve_repo_id("org/draft", tmp_path / "out") == "org/draft"


def test_card_without_a_hub_id_shows_no_local_path(random_target, tmp_path):
    draft = new_draft(random_target, tmp_path / "run" / "best_model")
    card = render_model_card(draft, {})
    assert str(tmp_path) not in card.replace(str(random_target), "")  # only the target is named by path
    assert '"model": "./best_model"' in card
    assert '"model": "org/draft"' in render_model_card(draft, {}, repo_id="org/draft")


def _saved_draft(random_target, tmp_path) -> Path:
    draft = new_draft(random_target, tmp_path / "run" / "best_model")
    (draft / "eagle3_eval.json").write_text(json.dumps({"metrics": {"eval_accept_len": 2.5}, "data": {}}))
    (draft / "README.md").write_text("a card written for another repo id")
    return draft


def test_push_parser():
    args = build_parser().parse_args(["push", "out/best_model", "--repo-id", "org/draft", "--private", "--dry-run"])
    assert (args.draft_dir, args.repo_id, args.private, args.dry_run, args.keep_card) == (
        "out/best_model",
        "org/draft",
        True,
        True,
        False,
    )
    assert args.run is not None


def test_push_dry_run_lists_the_upload_and_changes_nothing(random_target, tmp_path, capsys, no_hf_login):
    draft = _saved_draft(random_target, tmp_path)
    assert eagle3_main(["push", str(draft), "--repo-id", "org/draft", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "https://huggingface.co/org/draft" in out
    for name in ("config.json", "model.safetensors", "eagle3_eval.json", "README.md"):
        assert f"  {name}\n" in out, out
    assert (draft / "README.md").read_text() == "a card written for another repo id"


@pytest.mark.parametrize(
    ("repo_id", "login", "expected"),
    [
        ("org/draft", False, ["eagle3 push", "no Hugging Face token", "huggingface-cli login", "HF_TOKEN"]),
        ("draft", True, ["--repo-id draft", "OWNER/NAME"]),
        ("org/dr..aft", True, ["--repo-id org/dr..aft", "not a Hub repo id"]),
    ],
)
def test_push_refuses_a_missing_login_or_a_bad_repo_id(
    random_target, tmp_path, capsys, no_hf_login, monkeypatch, repo_id, login, expected
):
    if login:
        monkeypatch.setenv("HF_TOKEN", "hf_test")
    draft = _saved_draft(random_target, tmp_path)
    assert eagle3_main(["push", str(draft), "--repo-id", repo_id]) == 2
    message = capsys.readouterr().err
    for text in expected:
        assert text in message, message


def test_push_uploads_the_draft_with_a_card_for_the_repo(random_target, tmp_path, capsys, no_hf_login, monkeypatch):
    """The Hub client is patched at its HTTP methods (no network here)."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    calls = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append((repo_id, sorted(op.path_in_repo for op in operations), self.token))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    draft = _saved_draft(random_target, tmp_path)
    assert eagle3_main(["push", str(draft), "--repo-id", "org/draft"]) == 0
    assert calls == [("org/draft", ["README.md", "config.json", "eagle3_eval.json", "model.safetensors"], "hf_test")]
    card = (draft / "README.md").read_text()
    assert '"model": "org/draft"' in card and "2.5000" in card
    assert "org/draft" in capsys.readouterr().out
