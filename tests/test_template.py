"""Loss masks: exactly the assistant tokens, per turn, with the thinking block as served."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from eagle3.data.template import ChatRenderer, tokenizer_hash

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Count from 1 to 4."},
    {"role": "assistant", "content": "1, 2, 3, 4."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
]


@pytest.fixture(scope="module")
def tokenizer(random_target):
    return AutoTokenizer.from_pretrained(random_target)


def _masked_text(tokenizer, rendered):
    return tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.loss_mask, strict=True) if m])


def _unmasked_text(tokenizer, rendered):
    return tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.loss_mask, strict=True) if not m])


def test_tiny_template_masks_each_assistant_turn(tokenizer):
    rendered = ChatRenderer(tokenizer).render(CHAT)
    text = tokenizer.decode(rendered.input_ids)
    # the last turn is stored as served: the generation prompt (with its empty think block) + the answer
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n2 plus 3 is 5.<|im_end|>")
    assert _masked_text(tokenizer, rendered) == "1, 2, 3, 4.<|im_end|>2 plus 3 is 5.<|im_end|>"
    assert "<think>" in _unmasked_text(tokenizer, rendered)  # the think block is prompt, not learned


def test_real_qwen3_template_thinking_off(tokenizer, qwen3_chat_template):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = qwen3_chat_template
    rendered = ChatRenderer(tokenizer, enable_thinking=False).render(CHAT)
    text = tokenizer.decode(rendered.input_ids)
    # history answers lose their think block (Qwen3), the served one follows the empty think block
    assert "<|im_start|>assistant\n1, 2, 3, 4.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n2 plus 3 is 5.<|im_end|>")
    assert _masked_text(tokenizer, rendered) == "1, 2, 3, 4.<|im_end|>2 plus 3 is 5.<|im_end|>"
    assert rendered.input_ids[: len(ChatRenderer(tokenizer).prompt_ids(CHAT[:4]))] == ChatRenderer(
        tokenizer
    ).prompt_ids(CHAT[:4])


def test_real_qwen3_template_thinking_on(tokenizer, qwen3_chat_template):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = qwen3_chat_template
    chat = CHAT[:2] + [{"role": "assistant", "content": "<think>\ncount\n</think>\n\n1, 2, 3, 4."}] + CHAT[3:4]
    chat += [{"role": "assistant", "content": "<think>\nadd them\n</think>\n\n2 plus 3 is 5."}]
    rendered = ChatRenderer(tokenizer, enable_thinking=True).render(chat)
    text = tokenizer.decode(rendered.input_ids)
    assert "<|im_start|>assistant\n1, 2, 3, 4.<|im_end|>" in text  # history: think block dropped by the template
    # served turn: the model writes its think block itself, so it is learned
    assert _masked_text(tokenizer, rendered) == (
        "1, 2, 3, 4.<|im_end|><think>\nadd them\n</think>\n\n2 plus 3 is 5.<|im_end|>"
    )


def test_exact_generated_ids_and_truncation(tokenizer):
    renderer = ChatRenderer(tokenizer, max_length=None)
    answer_ids = tokenizer("2 plus 3 is 5.", add_special_tokens=False)["input_ids"] + [renderer.end_of_turn_id]
    rendered = renderer.render(CHAT, last_answer_ids=answer_ids)
    assert rendered.input_ids[-len(answer_ids) :] == answer_ids
    assert rendered.input_ids[: -len(answer_ids)] == renderer.prompt_ids(CHAT[:4])
    short = ChatRenderer(tokenizer, max_length=10).render(CHAT)
    assert len(short.input_ids) == len(short.loss_mask) == 10


def test_no_assistant_turn_gives_none(tokenizer):
    assert ChatRenderer(tokenizer).render([{"role": "user", "content": "hi"}]) is None


def test_tokenizer_hash_sees_the_template(tokenizer, qwen3_chat_template):
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    assert tokenizer_hash(other) == tokenizer_hash(tokenizer)
    other.chat_template = qwen3_chat_template
    assert tokenizer_hash(other) != tokenizer_hash(tokenizer)


def test_thinking_auto_follows_the_chat_template(tokenizer):
    """Default "auto": on when the template reads enable_thinking (as vLLM's chat API serves a Qwen3
    hybrid model), off when it has no switch; an explicit choice wins; one line says which and why."""
    from eagle3.data.template import parse_thinking, resolve_thinking

    assert "enable_thinking" in tokenizer.chat_template  # the tiny target's template has Qwen3's switch
    assert resolve_thinking("auto", tokenizer) == (
        True,
        "thinking: on (the target's chat template serves thinking by default; "
        "--enable-thinking false to train for a non-thinking deployment)",
    )
    assert resolve_thinking(False, tokenizer) == (False, "thinking: off (--enable-thinking given)")
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_thinking("auto", plain)[0] is False
    plain.chat_template = {"default": tokenizer.chat_template, "tool_use": "x"}
    assert resolve_thinking("auto", plain)[0] is True
    assert [parse_thinking(v) for v in ("auto", "true", "False", "0", True)] == ["auto", True, False, False, True]
    with pytest.raises(ValueError, match="--enable-thinking must be auto, true or false"):
        parse_thinking("sometimes")
