"""Online training (the target inside training) against offline training from stored states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eagle3.collect.cli import main as collect_main
from eagle3.testing import synthetic_conversations, write_jsonl
from eagle3.train.args import parse_args
from eagle3.train.main import train

try:
    from tests.train_data import Losses
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from train_data import Losses

FAST = ["--report_to", "none", "--disable_tqdm", "true", "--draft-vocab-size", "256", "--ttt-steps", "3"]
FAST += ["--dataloader_num_workers", "0", "--logging_steps", "1", "--eval-ratio", "0", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", synthetic_conversations(12, seed=11))


def _train(argv: list[str]) -> list[float]:
    losses = Losses()
    train(parse_args(argv), callbacks=[losses])
    return losses.losses


def test_online_from_chats_equals_offline_from_stored_states(trained_target, chats, tmp_path):
    collect = ["--model", str(trained_target), "--dataset", str(chats), "--no-regenerate", "--quiet"]
    collect_main([*collect, "--output-dir", str(tmp_path / "states"), "--hidden-dtype", "fp32"])
    common = ["--base-model", str(trained_target), "--max_steps", "4", "--batch-size", "4", "--lr", "3e-3", *FAST]

    offline = _train(["--data-dir", str(tmp_path / "states"), "--output-dir", str(tmp_path / "offline"), *common])
    collect_main([*collect, "--output-dir", str(tmp_path / "ids"), "--no-states"])
    online = _train(
        ["--online", "--data-dir", str(tmp_path / "ids"), "--output-dir", str(tmp_path / "online"), *common]
    )
    assert len(offline) == 4 and len(online) == 4
    for step, (a, b) in enumerate(zip(offline, online, strict=True)):
        assert b == pytest.approx(a, rel=1e-4), (step, offline, online)

    manifest = json.loads((tmp_path / "ids" / "manifest.json").read_text())
    states = json.loads((tmp_path / "states" / "manifest.json").read_text())
    assert manifest["num_tokens"] == states["num_tokens"]
    assert manifest["num_bytes"] / manifest["num_tokens"] < 0.02 * states["num_bytes"] / states["num_tokens"]


def test_online_from_dataset_regenerates_into_the_output_dir_and_resumes(trained_target, chats, tmp_path):
    argv = ["--online", "--dataset", str(chats), "--base-model", str(trained_target), "--output-dir", str(tmp_path)]
    argv += ["--max_steps", "2", "--batch-size", "4", *FAST]
    assert len(_train(argv)) == 2
    manifest = json.loads((tmp_path / "online_data" / "manifest.json").read_text())
    assert manifest["hidden_dtype"] == "none" and manifest["num_samples"] == 12
    assert manifest["settings"]["regenerate"] is True
    shards = sorted(p.name for p in (tmp_path / "online_data").glob("shard-*"))
    assert len(_train(argv)) == 2  # a rerun reuses the stored answers: nothing regenerated twice
    assert sorted(p.name for p in (tmp_path / "online_data").glob("shard-*")) == shards
    assert (tmp_path / "best_model" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "x.jsonl"], "--dataset is for --online"),
        (["--online"], "either --dataset"),
        (["--online", "--dataset", "x.jsonl"], "needs --model"),
        (["--data-dir", "d", "--server-url", "http://127.0.0.1:1"], "--server-url is for --online"),
    ],
)
def test_online_flags_are_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--report_to", "none"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data-dir", "d", "--max-new-tokens", "64"], "--max-new-tokens: only read by --online --dataset"),
        (["--online", "--data-dir", "d", "--skip-bad-lines"], "--skip-bad-lines: only read by --online --dataset"),
        (["--data-dir", "d", "--enable-thinking", "false"], "--enable-thinking: only read by --online --dataset"),
        (["--online", "--dataset", "x", "--model", "m", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--online", "--dataset", "x", "--model", "m", "--enable-thinking", "x"], "must be auto, true or false"),
        (
            ["--online", "--dataset", "x", "--model", "m", "--server-url", "http://h:1", "--collect-batch-size", "2"],
            "--collect-batch-size has no effect with --server-url",
        ),
    ],
)
def test_collection_flags_are_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--report_to", "none"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_online_dataset_takes_run_collect_options(trained_target, chats, tmp_path, capsys):
    """--online --dataset's collection gets run_collect.py's options; a bad record stops run_train.py
    with one line that names a flag run_train.py accepts (it was a traceback recommending a rejected one)."""
    from eagle3.train.cli import main as train_main
    from eagle3.train.online import prepare_online_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text() + "{not json\n")
    argv = ["--online", "--dataset", str(bad), "--base-model", str(trained_target), *FAST]
    argv += ["--enable-thinking", "false", "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.9"]
    argv += ["--collect-batch-size", "5"]
    assert train_main([*argv, "--output-dir", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{bad}:13" in err and "--skip-bad-lines" in err

    args = parse_args([*argv, "--output-dir", str(tmp_path / "run"), "--skip-bad-lines"])
    data_dir = Path(prepare_online_data(args))
    settings = json.loads((data_dir / "manifest.json").read_text())["settings"]
    assert "skipped 1 malformed records" in capsys.readouterr().out
    assert (settings["enable_thinking"], settings["max_new_tokens"]) == (False, 6)
    assert (settings["temperature"], settings["top_p"]) == (0.7, 0.9)
