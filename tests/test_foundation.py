"""Config, draft model, tiny target: round trips, vLLM tensor names, TTT attention."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from eagle3.config import (
    NORM_FIELDS,
    Eagle3ConfigError,
    Eagle3Qwen3Config,
    default_target_layers,
    to_vllm_layer_ids,
)
from eagle3.export.check import expected_tensors
from eagle3.modeling import Eagle3Cache, Eagle3Qwen3ForCausalLM, eagle3_attention
from eagle3.testing import build_tiny_target


@pytest.fixture(scope="module")
def target_config(random_target):
    return AutoConfig.from_pretrained(random_target)


def make_draft(target_config, **kwargs) -> Eagle3Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Eagle3Qwen3Config.from_target_config(target_config, **kwargs)
    model = Eagle3Qwen3ForCausalLM(config)
    if model.has_reduced_vocab:
        ids = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(1))[: config.draft_vocab_size]
        model.set_draft_vocab(ids.sort().values)
    return model


# --------------------------------------------------------------------------- config
def test_config_copies_target_and_converts_layers(target_config):
    config = Eagle3Qwen3Config.from_target_config(target_config, target_layers=[6, 0, 3], draft_vocab_size=500)
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "eos_token_id",
        "bos_token_id",
        "rms_norm_eps",
    ):
        assert getattr(config, key) == getattr(target_config, key), key
    assert config.rope_parameters == target_config.rope_parameters
    assert config.num_hidden_layers == 1
    assert config.target_layers == [0, 3, 6]  # sorted: vLLM concatenates in ascending id order
    assert config.eagle_aux_hidden_state_layer_ids == [1, 4, 7]
    assert config.architectures == ["Eagle3Qwen3ForCausalLM"]
    assert config.to_dict()["model_type"] == "qwen3"


def test_default_layers_are_eagle3s():
    # Qwen3-1.7B: 28 layers -> outputs of 1, 13, 24 -> vLLM's default ids (2, 14, 25).
    assert default_target_layers(28) == [1, 13, 24]
    assert to_vllm_layer_ids(default_target_layers(28)) == [2, 28 // 2, 28 - 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_layers": [0, 8]}, "out of range"),
        ({"target_layers": [1, 1, 3]}, "more than once"),
        ({"draft_vocab_size": 10_000}, "larger than the target vocabulary"),
        ({"num_draft_layers": 0}, "--num-draft-layers"),
        ({"draft_arch": "mistral"}, "--draft-arch"),
    ],
)
def test_config_validation_errors(target_config, kwargs, message):
    with pytest.raises(Eagle3ConfigError, match=message):
        Eagle3Qwen3Config.from_target_config(target_config, **kwargs)


def test_saved_config_is_readable_by_autoconfig(target_config, tmp_path):
    config = Eagle3Qwen3Config.from_target_config(target_config, draft_vocab_size=500)
    config.save_pretrained(tmp_path)
    generic = AutoConfig.from_pretrained(tmp_path)  # what vLLM does
    assert generic.model_type == "qwen3"
    assert generic.eagle_aux_hidden_state_layer_ids == config.eagle_aux_hidden_state_layer_ids
    assert generic.draft_vocab_size == 500
    again = Eagle3Qwen3Config.from_pretrained(tmp_path)
    assert again.target_layers == config.target_layers
    assert again.to_dict() == config.to_dict()


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize(
    "kwargs",
    [
        {"draft_vocab_size": 500},
        {"num_draft_layers": 2},
        {"draft_arch": "llama", "draft_vocab_size": 300},
        {"draft_variant": "eagle3.1", "draft_vocab_size": 500},
        {"draft_arch": "llama", "draft_variant": "eagle3.1", "norm_before_fc": True},
    ],
    ids=["qwen3-reduced-vocab", "qwen3-2-layers", "llama", "eagle3.1", "llama-eagle3.1-norm-before-fc"],
)
def test_round_trip_is_bit_exact(target_config, tmp_path, kwargs):
    model = make_draft(target_config, **kwargs)
    model.save_pretrained(tmp_path)
    loaded = Eagle3Qwen3ForCausalLM.from_pretrained(tmp_path)
    loaded.load_target_embeddings(model.embed_tokens.weight)

    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name

    aux = torch.randn(2, 9, model.config.num_aux_layers * model.config.target_hidden_size)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, aux_hidden_states=aux).logits, loaded(input_ids=ids, aux_hidden_states=aux).logits
        )

    # The file holds exactly what vLLM's loader fills: no embedding, no 'model.' prefix.
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    config = json.loads((tmp_path / "config.json").read_text())
    expected = set(expected_tensors(config, model.config.draft_arch))
    assert names - {"t2d"} == expected
    assert "embed_tokens.weight" not in names
    # The norm switches are saved under the keys vLLM reads, and their weights under vLLM's names.
    for name in NORM_FIELDS:
        assert config[name] == getattr(model.config, name)
    if kwargs.get("draft_variant") == "eagle3.1":
        assert config["fc_norm"] and config["norm_output"]
        assert {f"fc_norm.{i}.weight" for i in range(model.config.num_aux_layers)} <= names
    assert ("input_norm.weight" in names) == bool(kwargs.get("norm_before_fc"))
    if kwargs.get("draft_arch") == "llama":
        assert config["model_type"] == "llama"
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert not any("q_norm" in name for name in names)
        # SGLang reads the aux layers here, as OUTPUT-of-layer indices (it adds 1 itself);
        # vLLM reads the top-level key (input of layer i + 1). See Eagle3Qwen3Config.to_dict.
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == model.config.target_layers
        assert config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in model.config.target_layers]
        assert loaded.config.to_dict()["eagle_config"] == config["eagle_config"]  # survives a reload
    else:
        assert config["architectures"] == ["Eagle3Qwen3ForCausalLM"]
        assert "eagle_config" not in config


def test_full_vocab_draft_has_no_d2t(target_config, tmp_path):
    model = make_draft(target_config)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert "d2t" not in handle.keys()  # vLLM >= 0.33 rejects d2t for a full-size vocab


def test_vocab_mapping_buffers(target_config):
    model = make_draft(target_config, draft_vocab_size=100)
    target_ids = model.draft_to_target_ids()
    assert bool((target_ids[1:] > target_ids[:-1]).all())
    assert int(model.t2d.sum()) == 100 and bool(model.t2d[target_ids].all())


# --------------------------------------------------------------------------- attention
def _dense_reference(q, keys, values, scale):
    """Attention over [context; diag_1; ...; diag_n] with an explicit dense mask."""
    steps, length = len(keys), q.shape[-2]
    all_k, all_v = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
    mask = torch.zeros(length, steps * length, dtype=torch.bool)
    mask[:, :length] = torch.ones(length, length, dtype=torch.bool).tril()
    for n in range(1, steps):
        mask[:, n * length : (n + 1) * length] = torch.eye(length, dtype=torch.bool)
    return torch.nn.functional.scaled_dot_product_attention(q, all_k, all_v, attn_mask=mask, scale=scale)


def test_ttt_attention_equals_dense_mask_reference():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 16)
    keys = [torch.randn(2, 4, 7, 16) for _ in range(4)]
    values = [torch.randn(2, 4, 7, 16) for _ in range(4)]
    out = eagle3_attention(q, (keys[0], values[0]), list(zip(keys[1:], values[1:], strict=True)), 0.25)
    torch.testing.assert_close(out, _dense_reference(q, keys, values, 0.25), atol=1e-5, rtol=1e-5)


def test_incremental_decoding_equals_full_forward(target_config):
    """The 'append' cache gives the same logits one token at a time as all at once."""
    model = make_draft(target_config, num_draft_layers=2).eval()
    aux = torch.randn(1, 6, model.config.num_aux_layers * model.config.target_hidden_size)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        full = model(input_ids=ids, aux_hidden_states=aux).logits
        cache = model.new_cache()
        first = model(input_ids=ids[:, :4], aux_hidden_states=aux[:, :4], cache=cache).logits
        rest = [
            model(input_ids=ids[:, t : t + 1], aux_hidden_states=aux[:, t : t + 1], cache=cache).logits
            for t in range(4, 6)
        ]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)
    assert isinstance(cache, Eagle3Cache) and cache.seq_length() == 6


def test_eagle3_1_norms_and_fed_back_state(target_config):
    """fc_norm: one RMSNorm per aux chunk before fc; norm_output: the next step gets the normed state."""
    model = make_draft(target_config, draft_variant="eagle3.1").eval()
    with torch.no_grad():
        for i, norm in enumerate(model.fc_norm):
            norm.weight.fill_(1.0 + i)
    size = model.config.target_hidden_size
    aux = torch.randn(1, 5, model.config.num_aux_layers * size)
    chunks = aux.split(size, dim=-1)
    expected = torch.cat(
        [
            (1.0 + i) * c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
            for i, c in enumerate(chunks)
        ],
        dim=-1,
    )
    with torch.no_grad():
        torch.testing.assert_close(model.combine_hidden_states(aux), model.fc(expected), atol=1e-5, rtol=1e-5)
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        hidden = model.combine_hidden_states(aux)
        normed, fed_back = model.draft_step(hidden, model.embed_tokens(ids), torch.arange(5)[None], model.new_cache())
    assert torch.equal(normed, fed_back)
    plain = make_draft(target_config).eval()
    with torch.no_grad():
        normed, fed_back = plain.draft_step(hidden, plain.embed_tokens(ids), torch.arange(5)[None], plain.new_cache())
    assert not torch.allclose(normed, fed_back)


def test_unknown_draft_variant_is_refused(target_config):
    with pytest.raises(Eagle3ConfigError, match="--draft-variant must be one of"):
        Eagle3Qwen3Config.from_target_config(target_config, draft_variant="eagle4")


# --------------------------------------------------------------------------- tiny target
def test_tiny_target_is_deterministic_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = build_tiny_target(tmp_path / "a", num_layers=2)
    b = build_tiny_target(tmp_path / "b", num_layers=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.head_dim == 64  # vLLM's CPU attention needs it
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id


def test_ttt_attention_checkpointing_keeps_gradients(target_config, monkeypatch):
    """Steps >= 1 recompute attention in backward; gradients must equal the stored-activation path."""
    import eagle3.modeling as modeling

    model = make_draft(target_config, num_draft_layers=2)
    aux = torch.randn(2, 8, model.config.num_aux_layers * model.config.target_hidden_size)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))

    def unrolled_grads():
        model.zero_grad(set_to_none=True)
        cache = model.new_cache("ttt")
        hidden = model.combine_hidden_states(aux)
        positions = torch.arange(8).expand(2, -1)
        total = 0.0
        for step in range(3):
            normed, hidden = model.draft_step(
                hidden, model.embed_tokens(ids[:, 1 + step : 9 + step]), positions + step, cache
            )
            total = total + model.compute_logits(normed).logsumexp(-1).sum()
        total.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    checkpointed = unrolled_grads()
    monkeypatch.setattr(modeling, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    stored = unrolled_grads()
    assert checkpointed.keys() == stored.keys() and len(stored) > 10
    for name in stored:
        torch.testing.assert_close(checkpointed[name], stored[name], atol=1e-6, rtol=1e-5)
