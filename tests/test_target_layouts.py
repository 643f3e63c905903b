"""The target's head as the Hub ships it: tied without a head tensor, tied with a copy, untied.

All three are sharded with a ``model.safetensors.index.json`` and no ``model.safetensors``
(how the Hub stores every Qwen3 from 1.7B up); small shapes, same layouts as the real ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.target import EMBED, LM_HEAD, NORM, TargetHead, read_target_tensors
from eagle3.testing import LAYOUTS, qwen3_target


@pytest.fixture(scope="module", params=LAYOUTS)
def layout_target(request):
    # Small shards: the embedding, the norm and the head land in different files.
    return request.param, qwen3_target("small", request.param, max_shard_bytes=300_000)


def test_layout_is_what_the_hub_writes(layout_target):
    layout, path = layout_target
    assert not (path / "model.safetensors").exists()
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert (LM_HEAD in weight_map) == (layout != "tied")
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] == (layout != "untied")


def test_target_head_matches_transformers_on_every_layout(layout_target):
    """TargetHead reads only the index's names; the tie fallback gives transformers' own head."""
    layout, path = layout_target
    head = TargetHead.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(head.embed_tokens.float(), model.get_input_embeddings().weight)
    assert torch.equal(head.lm_head.float(), model.get_output_embeddings().weight)
    assert torch.equal(head.lm_head, head.embed_tokens) == (layout != "untied")
    # HF's last hidden_states entry is after the final norm: our head turns it into its logits.
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9, 30]]), output_hidden_states=True)
    assert torch.allclose(out.hidden_states[-1] @ head.lm_head.float().T, out.logits, atol=1e-5)
    assert torch.equal(head.norm.float(), model.model.norm.weight)


def test_absent_names_are_left_out_not_looked_up_elsewhere(layout_target):
    layout, path = layout_target
    tensors = read_target_tensors(path, [EMBED, NORM, LM_HEAD, "no.such.tensor"])
    assert set(tensors) == {EMBED, NORM} | ({LM_HEAD} if layout != "tied" else set())


def test_untied_without_head_is_an_error(tmp_path):
    import shutil

    path = tmp_path / "broken"
    shutil.copytree(qwen3_target("small", "untied", max_shard_bytes=300_000), path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][LM_HEAD]
    index_path.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="tie_word_embeddings is false"):
        TargetHead.from_pretrained(path)
