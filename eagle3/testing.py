"""A tiny Qwen3 target, built deterministically on this machine (no hub access needed).

Tests and the demo need a real Qwen3 checkpoint that vLLM (CPU build) and transformers both
load: a byte-level BPE tokenizer with ChatML special tokens and a chat template, and Qwen3
weights with head_dim 64 (vLLM's CPU attention rejects smaller heads). ``trained=True``
additionally trains it for a short while on synthetic chat data so that its answers are
predictable and a draft can reach a meaningful acceptance length.

Targets are cached under ``$EAGLE3_CACHE_DIR`` (default ``~/.cache/eagle3-qwen3``), keyed by
the build recipe, and written atomically so concurrent test workers never see half a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from eagle3.config import QWEN3_CONFIGS
from eagle3.families import family_of

RECIPE_VERSION = "tiny-qwen3-v1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# A small ChatML template with Qwen3's thinking switch: with enable_thinking=False the
# generation prompt carries an empty think block, as Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_WORDS = (
    "apple river stone cloud green music window garden silver paper orange bridge forest "
    "candle rocket yellow winter summer purple planet ocean mirror pencil castle thunder "
    "coffee dragon island basket marble violet copper tiger falcon meadow harbor lantern"
).split()
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _synthetic_exchange(rng: random.Random) -> tuple[str, str]:
    """One user request and the deterministic answer a well-behaved assistant gives."""
    kind = rng.randrange(6)
    if kind == 0:
        start = rng.randrange(1, 40)
        end = start + rng.randrange(3, 12)
        return f"Count from {start} to {end}.", ", ".join(str(i) for i in range(start, end + 1)) + "."
    if kind == 1:
        word = rng.choice(_WORDS)
        return f"Spell the word {word}.", f"The word {word} is spelled " + "-".join(word.upper()) + "."
    if kind == 2:
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 3:
        words = rng.sample(_WORDS, rng.randrange(3, 7))
        return "Repeat after me: " + " ".join(words) + ".", " ".join(words).capitalize() + "."
    if kind == 4:
        n = rng.randrange(0, len(_NUMBER_WORDS))
        return f"Write the number {n} in words.", f"The number {n} is written as {_NUMBER_WORDS[n]}."
    words = rng.sample(_WORDS, 4)
    return (
        "Sort these words: " + ", ".join(words) + ".",
        "In alphabetical order: " + ", ".join(sorted(words)) + ".",
    )


def synthetic_conversations(count: int, seed: int = 0, turns: int = 1) -> list[dict]:
    """``count`` OpenAI-style conversations ({"messages": [...]}) with ``turns`` exchanges each."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        messages = []
        for _ in range(turns):
            question, answer = _synthetic_exchange(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append({"messages": messages})
    return conversations


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def _render(messages: list[dict]) -> str:
    """ChatML text as the target is trained on it (empty think block before each answer,
    i.e. how the template renders a generation prompt with enable_thinking=False)."""
    text = ""
    for message in messages:
        content = message["content"]
        if message["role"] == "assistant":
            content = "<think>\n\n</think>\n\n" + content
        text += f"<|im_start|>{message['role']}\n{content}<|im_end|>\n"
    return text


def _build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_tiny_target(
    output_dir: str | Path,
    trained: bool = False,
    seed: int = 0,
    num_layers: int = 8,
    hidden_size: int = 128,
    train_steps: int = 400,
    dtype: str = "float32",
) -> Path:
    """Write a tiny Qwen3 checkpoint (config, safetensors, tokenizer) into ``output_dir``, trained
    in fp32 and saved in ``dtype`` (bfloat16: the dtype vLLM serves it in, as real Qwen3 ships)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    corpus = [_render(c["messages"]) for c in synthetic_conversations(3000, seed=seed + 1, turns=2)]
    tokenizer = _build_tokenizer(corpus, vocab_size=1000)
    vocab_size = (len(tokenizer) + 63) // 64 * 64  # padded, as real checkpoints are
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=max(1, hidden_size // 128),
        head_dim=64,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    if trained:
        _train_briefly(model, tokenizer, corpus, train_steps, seed)
    model.eval()
    model.generation_config = greedy_generation_config(config)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
        model.config.dtype = dtype
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def greedy_generation_config(config):
    """Greedy decoding that stops at <|im_end|> or <|endoftext|>, as the tiny targets are served."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, config.pad_token_id],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )


def _train_briefly(model, tokenizer, corpus: list[str], steps: int, seed: int) -> None:
    """Next-token training on the synthetic chats: enough for confident, regular answers."""
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.tensor(tokenizer(text)["input_ids"]) for text in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        batch_index = torch.randint(len(ids), (16,), generator=generator)
        batch = torch.nn.utils.rnn.pad_sequence(
            [ids[i] for i in batch_index], batch_first=True, padding_value=tokenizer.pad_token_id
        )
        labels = batch.masked_fill(batch == tokenizer.pad_token_id, -100)
        loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def cache_dir() -> Path:
    return Path(os.environ.get("EAGLE3_CACHE_DIR", Path.home() / ".cache" / "eagle3-qwen3"))


def tiny_target(trained: bool = False, **kwargs) -> Path:
    """Path to a cached tiny Qwen3 target, building it on first use."""
    key = json.dumps({"recipe": RECIPE_VERSION, "trained": trained, **kwargs}, sort_keys=True)
    name = f"tiny-qwen3-{'trained' if trained else 'random'}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return _cached_build(
        cache_dir() / name, "model.safetensors", lambda staging: build_tiny_target(staging, trained=trained, **kwargs)
    )


def _cached_build(final: Path, marker: str, build) -> Path:
    """``final``, built by ``build(staging_dir)`` on first use (``marker``: the file that says it is
    complete). Written to a staging folder and renamed, so that concurrent test workers never
    see half a model and an interrupted build leaves nothing behind."""
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(final)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return final


@contextlib.contextmanager
def vllm_server(
    command: list[str], log_path: str | Path, timeout: float = 240.0, env: dict[str, str] | None = None
) -> Iterator[dict]:
    """Run a vLLM server command (its own process group, log in ``log_path``) until it answers
    /health; always stopped afterwards. Yields {"url", "process"}; the command needs ``--port``."""
    import time
    import urllib.request

    port = command[command.index("--port") + 1]
    host = command[command.index("--host") + 1] if "--host" in command else "127.0.0.1"
    url = f"http://{host}:{port}"
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, **(env or {})},
        )
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vLLM server not healthy after {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "process": process}
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and all its children (vLLM's
    engine core and workers), SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Random-weight targets at Qwen3's real shapes, laid out the way the Hub ships them.

# Qwen3's published configs (eagle3.config.QWEN3_CONFIGS) plus one at test size.
QWEN3_SHAPES: dict[str, dict] = {
    **QWEN3_CONFIGS,
    # The same layouts at test size (vLLM's CPU attention needs head_dim >= 64).
    "small": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=384,
        vocab_size=1024,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
}
# How the Hub lays out a causal LM's lm_head:
#   tied            tie_word_embeddings, no lm_head.weight anywhere (Qwen3-4B)
#   tied-head-copy  tie_word_embeddings, lm_head.weight stored too (Qwen3-1.7B)
#   untied          its own lm_head.weight (Qwen3-8B)
LAYOUTS = ("tied", "tied-head-copy", "untied")


def _shard_plan(shapes: dict[str, tuple[int, ...]], element_size: int, max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = element_size * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def build_qwen3_target(
    output_dir: str | Path,
    shape: str = "small",
    layout: str = "tied",
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2 * 2**30,
    seed: int = 0,
    **overrides,
) -> Path:
    """A random-weight Qwen3 checkpoint at ``QWEN3_SHAPES[shape]``, sharded with an index.

    Files as ``save_pretrained`` / the Hub write them: ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` ({"metadata": {"total_size"}, "weight_map"}), no
    ``model.safetensors``. The tiny tokenizer serves it: embedding and lm_head rows past its
    ids are zero, so those logits are 0 while the best in-vocab logit is positive (the max of
    ~1000 centred values) and greedy generation never leaves the tokenizer's ids. Weights are
    drawn tensor by tensor, one shard in memory at a time (a 1.7B target needs ~4 GB, not 8).
    """
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_target())
    dims = {**QWEN3_SHAPES[shape], **overrides}
    dims["tie_word_embeddings"] = layout != "untied"
    config = Qwen3Config(
        **dims,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        dtype=dtype,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    with torch.device("meta"):
        names = {name: tuple(t.shape) for name, t in Qwen3ForCausalLM(config).state_dict().items()}
    if layout == "tied":
        names.pop("lm_head.weight", None)
    _write_random_checkpoint(
        output_dir, names, dtype, seed, used=len(tokenizer), head_copy=layout == "tied-head-copy",
        max_shard_bytes=max_shard_bytes,
    )  # fmt: skip
    config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    greedy_generation_config(config).save_pretrained(output_dir)
    return output_dir


def _write_random_checkpoint(
    output_dir: Path,
    names: dict[str, tuple[int, ...]],
    dtype: str,
    seed: int,
    used: int,
    head_copy: bool = False,
    norm_centre: float = 1.0,
    max_shard_bytes: int = 2 * 2**30,
) -> None:
    """Random weights for ``names`` (their shapes), sharded with an index as the Hub writes them,
    drawn tensor by tensor so that one shard at a time is in memory. Norm weights are
    ``norm_centre`` (+ small noise around 0 for zero-centred norms); embedding / head rows past
    ``used`` (the tokenizer's ids) are zero; ``head_copy``: lm_head a copy of the embedding."""
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    element_size = torch.empty((), dtype=torch_dtype).element_size()
    plan = _shard_plan(names, element_size, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    embed = None
    for number, shard_names in enumerate(plan, start=1):
        filename = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in shard_names:
            if name.endswith("norm.weight") and norm_centre == 1.0:
                tensor = torch.ones(names[name], dtype=torch_dtype)
            elif name.endswith("norm.weight"):
                tensor = (torch.randn(names[name], generator=generator) * 0.05 + norm_centre).to(torch_dtype)
            elif name == "lm_head.weight" and head_copy and embed is not None:
                tensor = embed.clone()  # a copy of the tied weight, as Qwen3-1.7B ships it
            else:
                tensor = (torch.randn(names[name], generator=generator) * 0.02).to(torch_dtype)
                if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                    tensor[used:] = 0
            if name.endswith("embed_tokens.weight"):
                embed = tensor
            tensors[name] = tensor
            weight_map[name] = filename
            total += tensor.numel() * element_size
        save_file(tensors, output_dir / filename, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def qwen3_target(shape: str = "small", layout: str = "tied", dtype: str = "bfloat16", **kwargs) -> Path:
    """Path to a cached ``build_qwen3_target`` checkpoint, building it on first use."""
    key = json.dumps({"shape": shape, "layout": layout, "dtype": dtype, **kwargs}, sort_keys=True)
    name = f"{shape}-{layout}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return _cached_build(
        cache_dir() / name,
        "model.safetensors.index.json",
        lambda staging: build_qwen3_target(staging, shape=shape, layout=layout, dtype=dtype, **kwargs),
    )


# ---------------------------------------------------------------------------------------------
# Tiny random-weight targets of every Qwen3-family architecture, saved by transformers' own
# classes, so each is laid out exactly as its published checkpoints are (flat ``model.*``, or
# ``model.language_model.*`` + ``model.visual.*`` for the multimodal wrappers).

_TINY_TEXT = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    vocab_size=1024,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)
_TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
# Hybrid: three Gated DeltaNet layers then full attention, as Qwen3-Next / Qwen3.5 interleave
# them. Linear head dim 128: what vLLM's CPU GDN kernel supports.
_TINY_HYBRID = dict(
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_num_key_heads=1,
    linear_num_value_heads=2,
    partial_rotary_factor=0.25,
)
# Qwen3-VL's multimodal rope sections (text positions use them as plain 1-D rope).
_TINY_MROPE = dict(
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 12, 12], "mrope_interleaved": True}
)
_TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128)

# name -> (config class, model class, text config, wrapped in a multimodal config?)
FAMILY_TARGETS: dict[str, tuple[str, str, dict, bool]] = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=256, **_TINY_MOE), False),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(intermediate_size=256, shared_expert_intermediate_size=64, **_TINY_MOE, **_TINY_HYBRID),
        False,
    ),
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(intermediate_size=256, **_TINY_HYBRID), False),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", dict(intermediate_size=256, **_TINY_HYBRID), True),
    "qwen3_5_moe": (
        "Qwen3_5MoeConfig",
        "Qwen3_5MoeForConditionalGeneration",
        dict(shared_expert_intermediate_size=64, **_TINY_MOE, **_TINY_HYBRID),
        True,
    ),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", dict(intermediate_size=256, **_TINY_MROPE), True),
    "qwen3_vl_moe": (
        "Qwen3VLMoeConfig",
        "Qwen3VLMoeForConditionalGeneration",
        dict(intermediate_size=256, **_TINY_MOE, **_TINY_MROPE),
        True,
    ),
}


def _family_config(name: str, tied: bool, text: dict, tokenizer):
    """The (top-level) config of a ``FAMILY_TARGETS[name]`` target with these text dimensions."""
    import transformers

    config_name, model_name, _, nested = FAMILY_TARGETS[name]
    text = dict(
        text,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    config_class = getattr(transformers, config_name)
    if nested:
        vision = dict(_TINY_VISION, out_hidden_size=text["hidden_size"])
        if name.startswith("qwen3_vl"):
            vision["deepstack_visual_indexes"] = [0]
        config = config_class(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    else:
        config = config_class(**text, tie_word_embeddings=tied)
    config.architectures = [model_name]
    return config


def build_family_target(
    output_dir: str | Path,
    name: str,
    tied: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    text_overrides: dict | None = None,
) -> Path:
    """A random-weight target of ``FAMILY_TARGETS[name]`` saved by its transformers class, with the
    tiny tokenizer. Final and layer norms get random weights (around 0 for the zero-centred
    families, around 1 for the others), so a norm read with the wrong convention shows at once;
    embedding and head rows past the tokenizer's ids are zero (greedy text stays decodable)."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_target())
    config = _family_config(name, tied, {**_TINY_TEXT, **FAMILY_TARGETS[name][2], **(text_overrides or {})}, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILY_TARGETS[name][1])(config).eval()
    text_config = config.get_text_config()
    zero_centred = family_of(config).zero_centred_norm
    used = len(tokenizer)
    with torch.no_grad():
        for module_name, parameter in model.named_parameters():
            if module_name.endswith("norm.weight") and "visual" not in module_name:
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (0.0 if zero_centred else 1.0))
        model.get_input_embeddings().weight[used:] = 0
        model.get_output_embeddings().weight[used:] = 0
    model.generation_config = greedy_generation_config(text_config)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    config.dtype = dtype
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)


def family_target(name: str, tied: bool = False, dtype: str = "float32", **kwargs) -> Path:
    """Path to a cached ``build_family_target`` checkpoint, building it on first use."""
    key = json.dumps({"name": name, "tied": tied, "dtype": dtype, "v": 1, **kwargs}, sort_keys=True)
    final = (
        cache_dir()
        / f"family-{name}-{'tied' if tied else 'untied'}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    )
    return _cached_build(
        final, "config.json", lambda staging: build_family_target(staging, name, tied=tied, dtype=dtype, **kwargs)
    )


# Published text configs at their real widths, for the family rehearsal (bench/rehearsal.py):
# Qwen3.5-4B exactly (nested multimodal layout, tied head, 248k vocab, head_dim 256, hybrid),
# and Qwen3-30B-A3B's widths with all 128 experts at 4 of its 48 layers (fits 24 GiB).
FAMILY_SHAPES: dict[str, tuple[str, bool, dict]] = {
    "qwen3.5-4b": (
        "qwen3_5",
        True,
        dict(
            hidden_size=2560,
            num_hidden_layers=32,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=256,
            intermediate_size=9216,
            vocab_size=248320,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000000,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": True,
            },
        ),
    ),
    "qwen3-30b-a3b-4l": (
        "qwen3_moe",
        False,
        dict(
            hidden_size=2048,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            vocab_size=151936,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}


def family_shape_target(shape: str, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A cached random-weight checkpoint at ``FAMILY_SHAPES[shape]``, written shard by shard from a
    meta-device instance of its transformers class (names exactly as that class saves them)."""
    key = json.dumps({"shape": shape, "dtype": dtype, "seed": seed, "v": 1}, sort_keys=True)
    final = cache_dir() / f"{shape}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return _cached_build(
        final, "model.safetensors.index.json", lambda staging: _build_family_shape(staging, shape, dtype, seed)
    )


def _build_family_shape(staging: Path, shape: str, dtype: str, seed: int) -> None:
    import transformers
    from transformers import AutoTokenizer

    name, tied, dims = FAMILY_SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(tiny_target())
    config = _family_config(name, tied, dims, tokenizer)
    config.dtype = dtype
    with torch.device("meta"):
        names = {
            n: tuple(t.shape) for n, t in getattr(transformers, FAMILY_TARGETS[name][1])(config).state_dict().items()
        }
    if tied:
        names.pop("lm_head.weight", None)
    zero_centred = family_of(config).zero_centred_norm
    _write_random_checkpoint(staging, names, dtype, seed, used=len(tokenizer), norm_centre=0.0 if zero_centred else 1.0)
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    text = config.get_text_config()
    greedy_generation_config(text).save_pretrained(staging)
