"""In-process backend: the target runs here with transformers (CPU, or the rank's GPU).

Per batch of conversations: regenerate the assistant turns with batched ``generate`` (left
padding), render the final conversations, then ONE forward over the full sequences (right
padding) with forward hooks on the decoder layers we need. Hooks instead of
``output_hidden_states=True``: only the requested layers are kept (not all L + 1), and the
last hidden state is the last decoder layer's output BEFORE the final norm, which HF's
``hidden_states`` tuple does not hold (its last entry is after the norm). The base model is
called without the lm_head: logits [B, T, vocab] would cost more than everything else.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch

from eagle3.collect.common import cut_at_stop, decode_answer, generation_slots, set_answer, to_sample
from eagle3.data.codecs import capture_dtype, has_states
from eagle3.data.sources import Conversation
from eagle3.data.store import Sample
from eagle3.data.template import ChatRenderer
from eagle3.device import compute_dtype, resolve_device
from eagle3.families import decoder_layers, load_text_model, text_backbone
from eagle3.target import load_target_config, target_family


def default_device() -> str:
    return str(resolve_device())  # this rank's GPU; never CPU by surprise on a GPU machine


def _torch_dtype(name: str) -> torch.dtype | str:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    name = aliases.get(name, name)
    return name if name == "auto" else getattr(torch, name)


class LayerCapture:
    """Forward hooks that keep the outputs of the chosen decoder layers during one forward."""

    def __init__(self, decoder_layers: Sequence[torch.nn.Module], layer_indices: Sequence[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = [
            decoder_layers[index].register_forward_hook(self._hook(index)) for index in sorted(set(layer_indices))
        ]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()  # not inference_mode: online training feeds these states to autograd
def capture_states(
    model, layers: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``model``'s base model (no lm_head) over a right-padded batch:
    (aux [B, T, n_aux*H] at ``layers`` in ascending order, last [B, T, H] = the last decoder
    layer's output before the final norm), on the model's device, in ``dtype``."""
    layers_of_model = decoder_layers(model)
    last_layer = len(layers_of_model) - 1
    capture = LayerCapture(layers_of_model, sorted(set(layers) | {last_layer}))
    try:
        text_backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        capture.remove()
    # One pass per layer: copy + cast into the stored dtype on the device (halves the
    # device-to-host transfer for bf16), instead of cat, cast and copy as separate passes.
    hidden = capture.outputs[last_layer]
    size = hidden.shape[-1]
    aux = torch.empty((*hidden.shape[:2], size * len(layers)), dtype=dtype, device=hidden.device)
    for slot, layer in enumerate(layers):
        aux[..., slot * size : (slot + 1) * size].copy_(capture.outputs[layer])
    return aux, hidden.to(dtype)


class HfBackend:
    def __init__(
        self,
        model: str,
        renderer: ChatRenderer,
        layers: list[int],
        batch_size: int = 8,
        regenerate: bool = True,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        device: str | None = None,
        dtype: str = "auto",
        hidden_dtype: str = "bf16",
    ):
        self.device = torch.device(device or default_device())
        # Straight onto this rank's device (no full copy in host memory per rank first); the text
        # model of a multimodal checkpoint (its family says how).
        config = load_target_config(model)
        computed = compute_dtype(dtype, self.device, str(config.dtype).removeprefix("torch."))
        if computed != dtype:
            print(
                f"run_collect.py: computing the {config.dtype} target in {computed} on this CPU (no native bf16: "
                "a bf16 matmul would be over 50x slower); the stored states are the same dtype as before. "
                "--dtype bfloat16 forces bf16.",
                file=sys.stderr,
            )
        self.model = load_text_model(
            model, target_family(config), dtype=_torch_dtype(computed), device_map=self.device
        ).eval()
        self.renderer = renderer
        self.hidden_dtype = capture_dtype(hidden_dtype)  # the store encodes fp8 from bf16
        self.capture_states = has_states(hidden_dtype)  # --no-states: ids and masks only
        self.layers = list(layers)
        self.num_layers = self.model.config.get_text_config().num_hidden_layers
        self.batch_size = batch_size
        self.regenerate = regenerate
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        generation_config = self.model.generation_config
        eos = generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stop_ids = set(eos) | {renderer.end_of_turn_id}
        tokenizer = renderer.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.stop_ids))

    # ------------------------------------------------------------------ regeneration
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """Answer token ids per prompt (up to and including the first stop token)."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every answer starts at column `width`
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        sampling = self.temperature > 0
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            temperature=self.temperature if sampling else None,
            top_p=self.top_p if sampling else None,
            top_k=None,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.stop_ids),
        )
        return [cut_at_stop(row.tolist(), self.stop_ids) for row in output[:, width:].cpu()]

    def regenerate_batch(self, conversations: list[Conversation]) -> list[tuple[list[dict], list[int] | None]]:
        """Final messages (+ the exact ids of the last generated answer) per conversation.

        Turn k of every conversation in the batch is generated in one batched call, after
        turn k - 1, so each answer conditions on the regenerated history.
        """
        states = [list(c.messages) for c in conversations]
        slots = [generation_slots(c.messages, self.regenerate) for c in conversations]
        last_ids: list[list[int] | None] = [None] * len(conversations)
        for step in range(max((len(s) for s in slots), default=0)):
            active, prompts = [], []
            for i, conversation_slots in enumerate(slots):
                if step < len(conversation_slots):
                    prompt = self.renderer.prompt_ids(states[i][: conversation_slots[step]])
                    if self.renderer.max_length is not None and len(prompt) >= self.renderer.max_length:
                        slots[i] = conversation_slots[:step]  # later turns would be truncated away anyway
                        continue
                    active.append(i)
                    prompts.append(prompt)
            if not active:
                continue
            for i, ids in zip(active, self.generate(prompts), strict=True):
                slot = slots[i][step]
                states[i] = set_answer(states[i], slot, decode_answer(self.renderer, ids, self.stop_ids))
                last_ids[i] = ids
        results = []
        for i, state in enumerate(states):
            if slots[i]:
                results.append((state[: slots[i][-1] + 1], last_ids[i]))
            else:
                results.append((state, None))
        return results

    # ------------------------------------------------------------------ capture
    def capture(self, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(aux [T, n_aux*H], last [T, H]) per sequence, on the CPU, in the stored dtype."""
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):  # right padding: positions start at 0 for every row
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        aux, last = capture_states(
            self.model, self.layers, input_ids.to(self.device), attention_mask.to(self.device), self.hidden_dtype
        )
        aux, last = aux.cpu(), last.cpu()
        return [(aux[row, : len(ids)], last[row, : len(ids)]) for row, ids in enumerate(sequences)]

    # ------------------------------------------------------------------ the backend interface
    def samples(self, conversations: list[Conversation]) -> Iterator[Sample | None]:
        """One Sample per conversation, in order; None for one with nothing to learn."""
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            # Seeded per batch so that a rerun samples the same answers for the same batch.
            torch.manual_seed(self.seed + batch[0].key)
            rendered = [self.renderer.render(m, ids) for m, ids in self.regenerate_batch(batch)]
            keep = [i for i, r in enumerate(rendered) if r is not None and r.num_assistant_tokens > 0]
            if keep and self.capture_states:
                by_index = dict(zip(keep, self.capture([rendered[i].input_ids for i in keep]), strict=True))
            else:
                by_index = dict.fromkeys(keep, (None, None))
            for i, conversation in enumerate(batch):
                if i in by_index:
                    yield to_sample(conversation.key, rendered[i], *by_index[i])
                else:
                    yield None

    def close(self) -> None:
        pass
