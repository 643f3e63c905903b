"""Hub naming without the network: the repo id a push uses and what the card shows."""

from __future__ import annotations

from eagle3.cli import new_draft
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
