"""Render chat messages with the target's chat template and mark the assistant tokens.

A sample is built the way the conversation is SERVED for its last assistant turn:

    prompt  = template(messages[:last], add_generation_prompt=True, enable_thinking=...)
    answer  = the assistant's generated text (or its exact generated token ids) + end of turn

so the thinking block sits where serving puts it: with ``enable_thinking=False`` Qwen3's
generation prompt already holds the empty ``<think>\\n\\n</think>\\n\\n`` (not learned), with
``enable_thinking=True`` the model writes the think block itself (learned). Earlier assistant
turns appear as the template renders history (Qwen3 drops their think blocks), and each one
is located from the rendered boundaries: it starts where the generation prompt for that turn
stops matching the rendered history, and ends with the end-of-turn token. Rendering the whole
conversation once and diffing prefixes would be wrong, because Qwen3's template is not
prefix-stable (the last assistant turn is rendered differently from the earlier ones).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[bool]

    @property
    def num_assistant_tokens(self) -> int:
        return sum(self.loss_mask)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides the token ids: the vocabulary/merges and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(text.encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:16]


THINKING_HELP = (
    "Render with the chat template's thinking switch: auto (default) = as the target is served: on when its "
    "chat template reads enable_thinking (Qwen3's hybrid-thinking models, which vLLM's chat API serves with "
    "thinking on unless the client turns it off), off otherwise; true / false to choose."
)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_thinking(value: object, flag: str = "--enable-thinking") -> bool | str:
    """``auto`` or a boolean (from the command line or a YAML/JSON file) -> "auto", True or False."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{flag} must be auto, true or false, got {value!r}")


def has_thinking_switch(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template reads ``enable_thinking`` (Qwen3 hybrid thinking; not the 2507
    Instruct / Thinking-only releases, whose templates have no switch)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the one apply_chat_template uses
        template = template.get("default", "")
    return "enable_thinking" in (template or "")


def resolve_thinking(setting: bool | str, tokenizer: PreTrainedTokenizerBase) -> tuple[bool, str]:
    """The thinking mode to render with, and the one line that states it and why."""
    if setting != "auto":
        reason = "--enable-thinking given"
        return bool(setting), f"thinking: {'on' if setting else 'off'} ({reason})"
    if has_thinking_switch(tokenizer):
        return True, (
            "thinking: on (the target's chat template serves thinking by default; "
            "--enable-thinking false to train for a non-thinking deployment)"
        )
    return False, "thinking: off (the target's chat template has no enable_thinking switch)"


def _common_prefix_length(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


class ChatRenderer:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, enable_thinking: bool = False, max_length: int | None = None
    ):
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer of {tokenizer.name_or_path!r} has no chat template.")
        if not tokenizer.is_fast:
            raise ValueError("a fast tokenizer is needed (offsets mapping for the loss mask).")
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.max_length = max_length
        # The token the target emits to end its turn (Qwen3: <|im_end|>); each assistant span ends with it.
        self.end_of_turn = tokenizer.eos_token
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking,
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids the server sees when asked for the next assistant turn after ``messages``."""
        return self._encode(self._apply(messages, add_generation_prompt=True))

    def render(self, messages: list[dict], last_answer_ids: list[int] | None = None) -> Rendered | None:
        """Token ids + loss mask of a conversation; None when it has no assistant turn.

        ``last_answer_ids``: the exact token ids the target generated for the last assistant
        turn (regeneration), stored as generated instead of re-tokenising the text.
        """
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_turns:
            return None
        last = assistant_turns[-1]
        head = self._apply(messages[:last], add_generation_prompt=True)
        encoded = self.tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
        spans = self._history_spans(messages, assistant_turns[:-1], head)
        head_mask = [any(start < e and end > s for s, e in spans) for start, end in encoded["offset_mapping"]]
        if last_answer_ids is None:
            last_answer_ids = self._encode(messages[last]["content"]) + [self.end_of_turn_id]
        input_ids = list(encoded["input_ids"]) + list(last_answer_ids)
        loss_mask = head_mask + [True] * len(last_answer_ids)
        if self.max_length is not None:
            input_ids, loss_mask = input_ids[: self.max_length], loss_mask[: self.max_length]
        return Rendered(input_ids=input_ids, loss_mask=loss_mask)

    def _history_spans(self, messages: list[dict], turns: list[int], head: str) -> list[tuple[int, int]]:
        """Character spans of the earlier assistant turns inside the rendered history ``head``."""
        spans = []
        previous_end = 0
        for i in turns:
            # Where serving that turn would have started generating: the rendered history stops
            # matching the generation prompt there (the prompt may carry an empty think block
            # that the history form lacks, so an exact prefix match cannot be assumed).
            start = max(
                _common_prefix_length(self._apply(messages[:i], add_generation_prompt=True), head), previous_end
            )
            end = head.find(self.end_of_turn, start)
            end = len(head) if end < 0 else end + len(self.end_of_turn)
            spans.append((start, end))
            previous_end = end
        return spans
