"""Conversations in, chat messages out: the first room of the data flow.

Accepted records (JSONL lines, or rows of a Hugging Face dataset):

* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
* OpenAI:   ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}``
* Prompt:   ``{"prompt": "..."}`` (optionally with ``"response"``/``"completion"``)

Every record becomes a ``Conversation`` with a stable integer ``key``: its position in the
input stream (all sources in the order given). Keys are what resume, rank sharding and the
store's ``sample_keys`` use, so the same inputs always give the same keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


class SourceError(ValueError):
    """An input file or dataset that cannot be read; the message names file and line."""


@dataclass
class Conversation:
    key: int
    messages: list[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content": str}]
    where: str  # "file.jsonl:12" or "dataset[split][row]": for error messages


@dataclass
class LoadStats:
    records: int = 0
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)  # the first few, for the summary


def normalize_record(record: Any, where: str) -> list[dict[str, str]]:
    """One record in any accepted form -> a list of ``{"role", "content"}`` messages."""
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "conversations" in record:
        turns, role_key, content_key = record["conversations"], "from", "value"
    elif "messages" in record:
        turns, role_key, content_key = record["messages"], "role", "content"
    elif "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise SourceError(f"{where}: 'prompt' must be a string.")
        messages = [{"role": "user", "content": record["prompt"]}]
        answer = record.get("response", record.get("completion"))
        if isinstance(answer, str):
            messages.append({"role": "assistant", "content": answer})
        return messages
    else:
        raise SourceError(
            f"{where}: no 'conversations' (ShareGPT), 'messages' (OpenAI) or 'prompt' field; "
            f"keys present: {sorted(record)[:8]}."
        )
    if not isinstance(turns, list) or not turns:
        raise SourceError(f"{where}: the conversation is empty or not a list.")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise SourceError(f"{where}: turn {number} needs '{role_key}' and '{content_key}' fields.")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise SourceError(
                f"{where}: turn {number} has role {turn[role_key]!r}; expected one of {sorted(ROLE_ALIASES)}."
            )
        content = turn[content_key]
        if not isinstance(content, str):
            raise SourceError(f"{where}: turn {number} content must be a string, got {type(content).__name__}.")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise SourceError(f"{where}: the conversation has no user turn.")
    return messages


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any | Exception]]:
    """(where, parsed object or the parse error) per non-blank line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                yield where, SourceError(f"{where}: malformed JSON ({error.msg} at column {error.colno}).")


def _iter_hf_dataset(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    local = Path(name)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()):
            dataset = datasets.load_from_disk(str(local))  # a save_to_disk folder
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types; all mean "cannot read it"
        raise SourceError(f"--dataset {name} (split {split!r}): cannot load it: {error}") from None
    for row, record in enumerate(dataset):
        yield f"{name}[{split}][{row}]", record


def _is_jsonl(name: str) -> bool:
    return name.endswith((".jsonl", ".json", ".jsonl.gz")) or Path(name).is_file()


def load_conversations(
    sources: Sequence[str], split: str = "train", skip_bad_lines: bool = False
) -> tuple[list[Conversation], LoadStats]:
    """Read and normalise every source; raise on the first bad record unless ``skip_bad_lines``.

    Everything is read up front (text is small next to hidden states) so that a bad line
    stops the run before the target is loaded.
    """
    conversations: list[Conversation] = []
    stats = LoadStats()
    for source in sources:
        if _is_jsonl(source):
            path = Path(source)
            if not path.exists():
                raise SourceError(f"--dataset {source}: file not found.")
            records = _iter_jsonl(path)
        else:
            records = _iter_hf_dataset(source, split)
        for where, record in records:
            stats.records += 1
            try:
                if isinstance(record, Exception):
                    raise record
                messages = normalize_record(record, where)
            except SourceError as error:
                if not skip_bad_lines:
                    raise SourceError(f"{error} (use --skip-bad-lines to skip and count such records)") from None
                stats.skipped += 1
                if len(stats.skipped_where) < 5:
                    stats.skipped_where.append(str(error))
                continue
            # the key counts bad records too, so skipping them never shifts the keys of good ones
            conversations.append(Conversation(key=stats.records - 1, messages=messages, where=where))
    if not conversations:
        detail = f" ({stats.skipped} bad records skipped)" if stats.skipped else ""
        raise SourceError(f"--dataset {' '.join(sources)}: no usable conversations{detail}.")
    return conversations, stats
