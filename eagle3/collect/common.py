"""Pieces both backends share: which turns to regenerate, and states -> stored ``Sample``.

Regeneration replaces every assistant turn with the target's own answer, in order, so that
later turns condition on the regenerated earlier answers (what the draft will see when the
target serves a multi-turn chat). A conversation that ends with a user turn (or a bare
``{"prompt": ...}``) gets its final answer generated too.
"""

from __future__ import annotations

import torch

from eagle3.data.store import Sample
from eagle3.data.template import ChatRenderer, Rendered


class CollectError(RuntimeError):
    """A problem with the collection run itself (servers, backend), with a message for the user."""


def generation_slots(messages: list[dict], regenerate: bool) -> list[int]:
    """Message indices whose assistant answer the target writes (len(messages) = append one)."""
    if not regenerate:
        return []
    slots = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if messages[-1]["role"] != "assistant":
        slots.append(len(messages))
    return slots


def without_trailing_prompt(messages: list[dict]) -> list[dict]:
    """Drop the turns after the last answer: nothing is learned from them."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[: last + 1]


def set_answer(messages: list[dict], slot: int, text: str) -> list[dict]:
    """Conversation with the answer at ``slot`` replaced (or appended); later turns kept."""
    return messages[:slot] + [{"role": "assistant", "content": text}] + messages[slot + 1 :]


def decode_answer(renderer: ChatRenderer, ids: list[int], stop_ids: set[int]) -> str:
    """Generated ids -> answer text for the next turn's history (think tags kept: the
    template decides how history shows them)."""
    while ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return renderer.tokenizer.decode(ids, skip_special_tokens=False)


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first stop token (the end of turn is learned)."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1]
    return ids


def to_sample(key: int, rendered: Rendered, aux: torch.Tensor | None, last: torch.Tensor | None) -> Sample:
    return Sample(
        input_ids=torch.tensor(rendered.input_ids, dtype=torch.long),
        loss_mask=torch.tensor(rendered.loss_mask, dtype=torch.bool),
        aux_hidden_states=aux,
        last_hidden_states=last,
        key=key,
    )
