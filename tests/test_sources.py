"""Input formats and their error messages (file:line), before any model is loaded."""

from __future__ import annotations

import json

import pytest

from eagle3.data.sources import SourceError, load_conversations, normalize_record


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_three_formats_normalise_to_messages(tmp_path):
    path = _write(
        tmp_path / "mixed.jsonl",
        [
            json.dumps(
                {
                    "conversations": [
                        {"from": "system", "value": "S"},
                        {"from": "human", "value": "Q"},
                        {"from": "gpt", "value": "A"},
                    ]
                }
            ),
            json.dumps({"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}),
            "",  # blank lines are ignored, not errors
            json.dumps({"prompt": "P"}),
        ],
    )
    conversations, stats = load_conversations([str(path)])
    assert [c.messages for c in conversations] == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "P"}],
    ]
    assert [c.key for c in conversations] == [0, 1, 2]
    assert conversations[2].where.endswith("mixed.jsonl:4")
    assert stats.records == 3 and stats.skipped == 0


def test_keys_continue_across_files(tmp_path):
    a = _write(tmp_path / "a.jsonl", [json.dumps({"prompt": "x"})] * 2)
    b = _write(tmp_path / "b.jsonl", [json.dumps({"prompt": "y"})] * 3)
    conversations, _ = load_conversations([str(a), str(b)])
    assert [c.key for c in conversations] == [0, 1, 2, 3, 4]


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), '{"prompt": "unterminated'])
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: malformed JSON.*--skip-bad-lines"):
        load_conversations([str(path)])


def test_skip_bad_lines_counts_and_keeps_keys_stable(tmp_path):
    path = _write(
        tmp_path / "bad.jsonl",
        [json.dumps({"prompt": "a"}), "not json", json.dumps({"nothing": 1}), json.dumps({"prompt": "b"})],
    )
    conversations, stats = load_conversations([str(path)], skip_bad_lines=True)
    assert [c.key for c in conversations] == [0, 3]  # bad records keep their slot: keys never shift
    assert stats.skipped == 2
    assert "bad.jsonl:2" in stats.skipped_where[0] and "bad.jsonl:3" in stats.skipped_where[1]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"foo": 1}, "no 'conversations'"),
        ({"messages": []}, "empty"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role 'wizard'"),
        ({"messages": [{"role": "user"}]}, "needs 'role' and 'content'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "no user turn"),
        ({"conversations": [{"from": "human", "value": 3}]}, "must be a string"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_records(record, message):
    with pytest.raises(SourceError, match=message):
        normalize_record(record, "f.jsonl:7")


def test_empty_data_is_an_error(tmp_path):
    path = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(SourceError, match="no usable conversations"):
        load_conversations([str(path)])
    only_bad = _write(tmp_path / "bad.jsonl", ["nope"])
    with pytest.raises(SourceError, match=r"no usable conversations \(1 bad records skipped\)"):
        load_conversations([str(only_bad)], skip_bad_lines=True)


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="file not found"):
        load_conversations([str(tmp_path / "nope.jsonl")])


def test_hugging_face_dataset_folder(tmp_path):
    import datasets

    rows = {"messages": [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]] * 2}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    conversations, _ = load_conversations([str(tmp_path / "ds")], split="train")
    assert len(conversations) == 2
    assert conversations[1].where.endswith("[train][1]")


SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]},
    {"conversations": [{"from": "human", "value": "Q2 ünïcode"}, {"from": "gpt", "value": "A2"}]},
]


def test_sharegpt_json_array_gzip_and_byte_order_mark(tmp_path):
    """The forms ShareGPT dumps come in: one JSON array (.json), gzip (.jsonl.gz / .json.gz), a UTF-8 BOM."""
    import gzip

    array = json.dumps(SHAREGPT, indent=2, ensure_ascii=False).encode()
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SHAREGPT).encode()
    files = {
        "dump.json": array,
        "bom.json": b"\xef\xbb\xbf" + array,
        "bom.jsonl": b"\xef\xbb\xbf" + lines,
        "crlf.jsonl": lines.replace(b"\n", b"\r\n"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name, data in {"dump.json.gz": array, "chats.jsonl.gz": lines}.items():
        with gzip.open(tmp_path / name, "wb") as handle:
            handle.write(data)
    expected = [c["conversations"][0]["value"] for c in SHAREGPT]
    for name in [*files, "dump.json.gz", "chats.jsonl.gz"]:
        conversations, _ = load_conversations([str(tmp_path / name)])
        assert [c.messages[0]["content"] for c in conversations] == expected, name
    conversations, _ = load_conversations([str(tmp_path / "dump.json")])
    assert [c.where for c in conversations] == [f"{tmp_path / 'dump.json'}:2", f"{tmp_path / 'dump.json'}:14"]


def test_non_utf8_byte_names_file_line_and_fix(tmp_path):
    good = json.dumps({"prompt": "ok"}).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + '{"prompt": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(SourceError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\); re-encode"):
        load_conversations([str(path)])
    conversations, stats = load_conversations([str(path)], skip_bad_lines=True)
    assert len(conversations) == 1 and stats.skipped == 1
    array = tmp_path / "latin1.json"
    array.write_bytes(b"[\n" + good + b",\n" + '{"prompt": "caf\u00e9"}'.encode("latin-1") + b"\n]")
    with pytest.raises(SourceError, match=r"latin1\.json:3: not UTF-8 \(byte 0xe9 at column 16\)"):
        load_conversations([str(array)])


def test_broken_json_array_and_gzip_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "a"},\n {"prompt": "b"\n]')
    with pytest.raises(SourceError, match=r"broken\.json:4: .*one JSON array"):
        load_conversations([str(broken)])
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"prompt": "not compressed"}\n')
    with pytest.raises(SourceError, match=r"fake\.jsonl\.gz: not a readable gzip file"):
        load_conversations([str(fake)])
