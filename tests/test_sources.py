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
