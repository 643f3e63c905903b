"""Conversations in, chat messages out: the first room of the data flow.

Accepted files: JSONL (one record per line) or one JSON array of records (the usual ShareGPT
dump, in a ``.json`` file), each optionally gzip-compressed (``.jsonl.gz``, ``.json.gz``), UTF-8
with or without a byte-order mark; or a Hugging Face dataset. Accepted records:

* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
* OpenAI:   ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}``
* Prompt:   ``{"prompt": "..."}`` (optionally with ``"response"``/``"completion"``)

Every record becomes a ``Conversation`` with a stable integer ``key``: its position in the
input stream (all sources in the order given). Keys are what resume, rank sharding and the
store's ``sample_keys`` use, so the same inputs always give the same keys.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
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


FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
NOT_UTF8_FIX = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"


def _decode(raw: bytes, where: str) -> str | SourceError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return SourceError(
            f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); {NOT_UTF8_FIX}."
        )


def _iter_file(path: Path) -> Iterator[tuple[str, Any | Exception]]:
    """(where, parsed object or the parse error) per record of a JSONL file or a JSON array file."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            lines = iter(handle)
            head: list[bytes] = []
            for raw in lines:  # look at the first non-blank line: "[" starts one JSON array
                head.append(raw.removeprefix(b"\xef\xbb\xbf") if not head else raw)  # UTF-8 byte-order mark
                if raw.strip():
                    break
            if b"".join(head).lstrip()[:1] == b"[":
                yield from _iter_json_array(path, b"".join(head) + handle.read())
            else:
                yield from _iter_jsonl(path, chain(head, lines))  # streamed: JSONL files can be large
    except (gzip.BadGzipFile, EOFError) as error:
        raise SourceError(f"--dataset {path}: not a readable gzip file ({error}).") from None


def _iter_jsonl(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[str, Any | Exception]]:
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        line = _decode(raw, where)
        if isinstance(line, SourceError):
            yield where, line
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            yield where, SourceError(f"{where}: malformed JSON ({error.msg} at column {error.colno}).")


def _iter_json_array(path: Path, data: bytes) -> Iterator[tuple[str, Any | Exception]]:
    """Elements of one JSON array, each named by the line it starts on (``file.json:12``).

    A broken array cannot be resynchronised, so its errors end the file even with --skip-bad-lines.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise SourceError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x} at column {column}); {NOT_UTF8_FIX}."
        ) from None
    decoder = json.JSONDecoder()
    position, line, counted_to = text.index("[") + 1, 1, 0
    while True:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position < len(text) and text[position] == "]":
            return
        line += text.count("\n", counted_to, position)
        counted_to = position
        where = f"{path}:{line}"
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise SourceError(
                f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno}); the file is one "
                "JSON array, so nothing after this point can be read. Fix the file (python -m json.tool finds "
                "the spot)."
            ) from None
        yield where, record
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            line_at = text.count("\n", 0, position) + 1
            raise SourceError(f"{path}:{line_at}: malformed JSON array (expected ',' or ']' after an element).")


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


def _is_file(name: str) -> bool:
    return name.endswith(FILE_SUFFIXES) or Path(name).is_file()


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
        if _is_file(source):
            path = Path(source)
            if not path.exists():
                raise SourceError(f"--dataset {source}: file not found.")
            records = _iter_file(path)
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
