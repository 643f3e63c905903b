"""Peak memory of one training process (one device), estimated before training starts.

A pure function of the shapes: the draft's weights, gradients and AdamW states, the frozen
pieces (the target's embedding inside the draft; the target's norm and lm_head in the loss),
and the activations the training-time test keeps for backward, which grow with the tokens in
a micro-batch. ``run_train.py`` prints it before the first step, and ``--max-tokens-per-batch``
is how one keeps the last term in check. ``bench/bench_train.py --memory-model`` measures the
real peak against it.

Activation bytes per token are counted from what autograd keeps in ``eagle3.train.loss.ttt_loss``
(``eagle3.modeling``), per TTT step:

* the decoder layer: norms (input and output, fp32 statistics), the 2H concatenation, q/k/v and
  their q/k norms and rotary outputs, the attention output, o_proj, the MLP's gate, up, SiLU
  and product (4 x intermediate), the residual sums and the final norm;
* the step's head: log-softmax output over the draft vocabulary, always fp32 (``.float()``),
  plus the draft's probabilities q for ``lk_lambda`` (its min(p, q) term),
  unless ``--head-checkpointing`` recomputes them in backward;
* once per token: the fp32 copy of the aux states for ``fc``, its output, the token embeddings,
  and the target's softmax over the draft vocabulary (fp32).

Plus one transient: the backward of one step's head holds the gradients of the loss product, of
the log-softmax and of the logits, and the softmax it recomputes (4 x draft vocab fp32 per token;
calibrated with ``bench/bench_train.py --memory-model``, where 2 x left the estimate 13 % low). Under ``--bf16``/``--fp16`` the layer activations are 2-byte
(autocast) while the head's log-softmax and the target's probabilities stay fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

from eagle3.config import DEFAULT_MAX_LENGTH, QWEN3_CONFIGS
from eagle3.config import draft_intermediate_size as draft_mlp

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per device; ``total`` is the estimated peak."""

    trainable_weights: int
    frozen_weights: int
    gradients: int
    optimizer_states: int
    target_head: int
    activations: int
    tokens_per_batch: int
    online_target: int = 0  # the whole frozen target, when --online runs it in this process
    draft_type: str = "eagle3"  # "dflash": frozen = the target's embedding AND lm_head; block activations

    @property
    def total(self) -> int:
        return (
            self.online_target
            + self.trainable_weights
            + self.frozen_weights
            + self.gradients
            + self.optimizer_states
            + self.target_head
            + self.activations
        )

    def table(self) -> str:
        rows = [
            ("draft weights (trainable, fp32 master)", self.trainable_weights),
            (
                "frozen weights (target embedding in the draft)"
                if self.draft_type == "eagle3"
                else "frozen weights (target embedding + lm_head in the draft)",
                self.frozen_weights,
            ),
            ("gradients", self.gradients),
            ("AdamW states", self.optimizer_states),
            ("target norm + lm_head (loss)", self.target_head),
            (
                f"{'TTT' if self.draft_type == 'eagle3' else 'DFlash block'} activations "
                f"({self.tokens_per_batch} tokens per micro-batch)",
                self.activations,
            ),
        ]
        if self.online_target:
            rows.insert(0, ("frozen target (--online, all experts)", self.online_target))
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value / GIB:7.2f} GiB" for name, value in rows]
        lines.append(f"  {'estimated peak per device':<{width}}  {self.total / GIB:7.2f} GiB")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class DraftShape:
    """The sizes that decide a draft's memory: the target's (the draft copies them) and the draft's own."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int | None = None
    num_aux: int = 3
    num_draft_layers: int = 1


TARGET_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def target_shape(config, draft_intermediate_size: int | None = None) -> dict[str, int]:
    """The ``DraftShape`` sizes a target's (text) config decides (a transformers config or a plain
    dict; ``head_dim`` defaults to hidden / heads as in transformers; the MLP width is the draft's,
    which an MoE target without ``intermediate_size`` does not name: ``draft_intermediate_size``)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    shape = {key: get(key) for key in TARGET_SHAPE_KEYS}
    shape["head_dim"] = shape["head_dim"] or shape["hidden_size"] // shape["num_attention_heads"]
    shape["intermediate_size"] = draft_mlp(SimpleNamespace(**shape), draft_intermediate_size)
    return shape


def draft_parameter_counts(shape: DraftShape) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of the draft (frozen = the target's embedding)."""
    h, i, head_dim = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    trainable = shape.num_aux * (shape.target_hidden_size or h) * h + h  # fc + final norm
    for layer in range(shape.num_draft_layers):
        width = 2 * h if layer == 0 else h
        trainable += width * (q + 2 * kv) + q * h + 3 * h * i  # attention + MLP
        trainable += 2 * h + 2 * head_dim + (h if layer == 0 else 0)  # norms (hidden_norm on layer 0)
    trainable += shape.draft_vocab_size * h  # lm_head
    return trainable, shape.vocab_size * h


def activation_bytes_per_token(
    shape: DraftShape,
    ttt_steps: int,
    mixed_precision: bool = False,
    head_checkpointing: bool = False,
    loss: str = "soft_ce",
    sequence_length: int = 0,
) -> int:
    """Bytes autograd keeps per token of a micro-batch for one TTT forward (see module doc).

    ``sequence_length``: the padded length of the micro-batch's samples. TTT steps >= 1 compute
    their attention explicitly (``eagle3.modeling.eagle3_attention``) and keep its softmax,
    [heads, T, T] fp32 per sample (plus its bf16 copy under autocast): per token, heads x T."""
    h, i, vd = shape.hidden_size, shape.intermediate_size, shape.draft_vocab_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    act = 2 if mixed_precision else 4  # layer activations (autocast) ...
    fp32 = 4  # ... while softmaxes and norm statistics stay fp32
    layer = 0
    for index in range(shape.num_draft_layers):
        width = 2 * h if index == 0 else h
        norms = (3 if index == 0 else 1) * 2 * h * fp32  # input/hidden norms (+ post-attention below)
        layer += norms + width * act  # the concatenated (or summed) layer input
        layer += (3 * q + 3 * kv) * act + 2 * kv * act  # q, k, v, q/k norms, rotary; cached k, v
        layer += q * act + h * act  # attention output, o_proj output
        layer += 2 * h * fp32 + h * act  # post-attention norm, residual
        layer += 4 * i * act + h * act  # gate, up, SiLU, product; down output
    layer += 2 * h * fp32  # final norm, pre-norm sum
    head_tensors = 2 if loss == "lk_lambda" else 1  # log-softmax output (+ q = exp of it for min(p, q))
    head = 0 if head_checkpointing else head_tensors * vd * fp32
    per_step = layer + head + h * act  # + the normed hidden fed to lm_head
    aux_width = shape.num_aux * (shape.target_hidden_size or h)
    once = aux_width * act + 2 * h * act + vd * fp32  # fc in/out, embeds, target probs
    transient = 4 * vd * fp32  # one step's head backward: grads of product, log-softmax, logits + softmax
    probs = fp32 + (2 if mixed_precision else 0)
    attention = (ttt_steps - 1) * shape.num_draft_layers * shape.num_attention_heads * sequence_length * probs
    return ttt_steps * per_step + once + transient + attention


def sharded_training_bytes(trainable: int, zero_stage: int, world_size: int, offload_optimizer: bool):
    """(fp32 weights, gradients, AdamW states) bytes on one device: ZeRO-1/2 shard the AdamW states
    (ZeRO-2 the gradients too) over ``world_size``, ZeRO-3 also the weights; offloading moves
    the AdamW states to host memory."""
    shard = max(1, world_size)
    weights = trainable * 4 // (shard if zero_stage >= 3 else 1)
    gradients = trainable * 4 // (shard if zero_stage >= 2 else 1)
    optimizer = 0 if offload_optimizer else trainable * 8 // (shard if zero_stage >= 1 else 1)
    return weights, gradients, optimizer


def estimate_peak_memory(
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    vocab_size: int,
    draft_vocab_size: int,
    tokens_per_batch: int,
    ttt_steps: int = 7,
    target_hidden_size: int | None = None,
    num_aux: int = 3,
    num_draft_layers: int = 1,
    mixed_precision: bool = False,
    head_checkpointing: bool = False,
    loss: str = "soft_ce",
    target_dtype_bytes: int = 2,
    zero_stage: int = 0,
    world_size: int = 1,
    offload_optimizer: bool = False,
    online_target_bytes: int = 0,
    max_length: int | None = None,
) -> MemoryEstimate:
    """Estimated peak bytes on one device for micro-batches of ``tokens_per_batch`` padded tokens.

    ``max_length``: the longest (padded) sample of a micro-batch, for the TTT attention's
    [T, T] softmaxes (default: samples of the default --max-length, or one filling a smaller batch).
    ``online_target_bytes``: the frozen target's weights when ``--online`` runs it on this device
    (``eagle3.families.parameter_counts``: an MoE target needs all its experts resident, not
    only the active ones); its forward's activations are freed before the draft's step.

    ZeRO-1/2 shard the AdamW states (and ZeRO-2 the gradients) over ``world_size``; ZeRO-3 also
    the trainable weights; ``offload_optimizer`` moves the AdamW states to host memory. The
    frozen embedding and the target's head are whole on every device.
    """
    shape = DraftShape(
        hidden_size,
        intermediate_size,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        draft_vocab_size,
        target_hidden_size,
        num_aux,
        num_draft_layers,
    )
    trainable, frozen = draft_parameter_counts(shape)
    weights, gradients, optimizer = sharded_training_bytes(trainable, zero_stage, world_size, offload_optimizer)
    full_head = vocab_size if draft_vocab_size < vocab_size else 0  # argmax over the full vocab
    target_head = (full_head + draft_vocab_size + 1) * (target_hidden_size or hidden_size) * target_dtype_bytes
    length = max_length if max_length is not None else min(tokens_per_batch, DEFAULT_MAX_LENGTH)
    per_token = activation_bytes_per_token(shape, ttt_steps, mixed_precision, head_checkpointing, loss, length)
    return MemoryEstimate(
        trainable_weights=weights,
        frozen_weights=frozen * 4,
        gradients=gradients,
        optimizer_states=optimizer,
        target_head=target_head,
        activations=per_token * tokens_per_batch,
        tokens_per_batch=tokens_per_batch,
        online_target=online_target_bytes,
    )


def max_tokens_per_batch(budget_bytes: int, **shapes) -> int:
    """The largest micro-batch (in padded tokens, a multiple of 64) whose estimate fits ``budget_bytes``
    (samples of ``max_length`` tokens, by default the default --max-length)."""
    shapes.setdefault("max_length", DEFAULT_MAX_LENGTH)
    fixed = estimate_peak_memory(tokens_per_batch=0, **shapes).total
    per_token = estimate_peak_memory(tokens_per_batch=1, **shapes).activations
    if budget_bytes <= fixed:
        return 0
    return (budget_bytes - fixed) // per_token // 64 * 64


def usable_bytes(device_gb: float) -> int:
    """What a training process can allocate on a ``device_gb`` GB GPU: 90 % (allocator
    fragmentation, NCCL buffers) minus 1 GiB (CUDA context, kernels)."""
    return int(device_gb * 1e9 * 0.9) - GIB


def budget_table(
    device_gbs: tuple[float, ...] = (24, 40, 80), draft_vocab_size: int = 32000, ttt_steps: int = 7
) -> str:
    """Markdown: --max-tokens-per-batch per device for Qwen3 drafts (bf16, DDP), with and without
    --head-checkpointing."""
    header = "| draft for | fixed (weights, grads, AdamW, target head) | activations per token |"
    header += "".join(f" {gb:g} GB |" for gb in device_gbs)
    lines = [header, "|---" * (3 + len(device_gbs)) + "|"]
    for key, config in QWEN3_CONFIGS.items():
        name = "Qwen3-" + key.split("-", 1)[1].upper()
        shapes = dict(**target_shape(config), draft_vocab_size=draft_vocab_size, mixed_precision=True)
        shapes["ttt_steps"] = ttt_steps
        shapes["max_length"] = DEFAULT_MAX_LENGTH  # samples up to the default --max-length
        fixed = estimate_peak_memory(tokens_per_batch=0, **shapes).total
        per_token = estimate_peak_memory(tokens_per_batch=1, **shapes).activations
        per_token_hc = estimate_peak_memory(tokens_per_batch=1, head_checkpointing=True, **shapes).activations
        row = f"| {name} | {fixed / GIB:.1f} GiB | {per_token / 2**20:.2f} MiB ({per_token_hc / 2**20:.2f}) |"
        for gb in device_gbs:
            plain = max_tokens_per_batch(usable_bytes(gb), **shapes)
            checkpointed = max_tokens_per_batch(usable_bytes(gb), head_checkpointing=True, **shapes)
            row += f" {plain} ({checkpointed}) |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    print(budget_table())


def dflash_parameter_counts(shape: DraftShape) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of a DFlash draft: fc, hidden_norm, the layers (H
    inputs each) and the final norm; frozen = the target's embedding and lm_head it holds."""
    h, i, head_dim = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    trainable = shape.num_aux * (shape.target_hidden_size or h) * h + 2 * h  # fc, hidden_norm, norm
    trainable += shape.num_draft_layers * (h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * head_dim)
    return trainable, 2 * shape.vocab_size * h


def dflash_activation_bytes_per_sample(
    shape: DraftShape, sequence_length: int, num_anchors: int, block_size: int, mixed_precision: bool = False
) -> int:
    """Bytes autograd keeps for one sample of ``sequence_length`` tokens in ``block_loss``
    (eagle3.train.dflash_loss): the context (fc in/out, hidden_norm, per layer its keys/values),
    the target's softmax over the whole vocabulary at every position (fp32), the blocks
    (min(num_anchors, T) x block_size tokens through every layer, as an EAGLE-3 layer of width H
    per token, plus the [Q, T + Q] attention mask), and per drafted position the log-softmax and
    the gathered target probabilities (2 x vocab fp32)."""
    h, i, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    act, fp32 = (2 if mixed_precision else 4), 4
    tokens = sequence_length
    context = tokens * (shape.num_aux * (shape.target_hidden_size or h) * act + 2 * h * act + h * fp32)
    context += tokens * shape.num_draft_layers * 4 * kv * act  # keys (+ k_norm, rotary) and values per layer
    target_probs = tokens * vocab * fp32
    block_tokens = min(num_anchors, tokens) * block_size
    layer = 2 * h * fp32 + h * act + (3 * q + 3 * kv) * act + q * act + h * act + 2 * h * fp32 + h * act
    layer += 4 * i * act + h * act
    blocks = block_tokens * (shape.num_draft_layers * layer + 2 * h * fp32 + h * act)
    mask = block_tokens * (tokens + block_tokens) * (1 + act)  # boolean mask and SDPA's additive copy
    labels = block_tokens * (block_size - 1) // block_size
    heads = labels * 2 * vocab * fp32 + min(num_anchors, tokens) * 4 * vocab * fp32  # + one position's backward
    return context + target_probs + blocks + mask + heads


def estimate_dflash_peak_memory(
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    vocab_size: int,
    tokens_per_batch: int,
    max_length: int,
    num_anchors: int = 512,
    block_size: int = 16,
    num_aux: int = 5,
    num_draft_layers: int = 5,
    target_hidden_size: int | None = None,
    mixed_precision: bool = False,
    target_dtype_bytes: int = 2,
    zero_stage: int = 0,
    world_size: int = 1,
    offload_optimizer: bool = False,
    online_target_bytes: int = 0,
) -> MemoryEstimate:
    """``estimate_peak_memory`` for a DFlash draft (``--draft-type dflash``): micro-batches of
    ``tokens_per_batch`` padded tokens in samples of ``max_length``."""
    shape = DraftShape(
        hidden_size,
        intermediate_size,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        vocab_size,  # the draft predicts through the target's own head: the whole vocabulary
        target_hidden_size,
        num_aux,
        num_draft_layers,
    )
    trainable, frozen = dflash_parameter_counts(shape)
    weights, gradients, optimizer = sharded_training_bytes(trainable, zero_stage, world_size, offload_optimizer)
    per_sample = dflash_activation_bytes_per_sample(shape, max_length, num_anchors, block_size, mixed_precision)
    samples = -(-tokens_per_batch // max(1, max_length))
    return MemoryEstimate(
        trainable_weights=weights,
        frozen_weights=frozen * 4,
        gradients=gradients,
        optimizer_states=optimizer,
        target_head=(vocab_size + 1) * (target_hidden_size or hidden_size) * target_dtype_bytes,
        activations=per_sample * samples,
        tokens_per_batch=tokens_per_batch,
        online_target=online_target_bytes,
        draft_type="dflash",
    )
