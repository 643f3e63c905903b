"""One command-line vocabulary across run_collect.py, run_train.py, run_eval.py and eagle3:
config files with overrides, aliases, --help, and exit 2 with the flag and the fix before any work."""

from __future__ import annotations

import configparser
import importlib
import sys
from pathlib import Path

import pytest

from eagle3.collect.args import parse_args as parse_collect
from eagle3.config import DEFAULT_MAX_LENGTH
from eagle3.evaluate.args import parse_args as parse_eval
from eagle3.train.args import EAGLE3_SECTION, Eagle3TrainingArguments
from eagle3.train.args import parse_args as parse_train

REPO = Path(__file__).resolve().parents[1]
PARSERS = {"collect": parse_collect, "train": parse_train, "eval": parse_eval}


def exit_message(parse, argv, capsys) -> str:
    """Parse ``argv``, expect exit 2, return stderr."""
    with pytest.raises(SystemExit) as exit_:
        parse([str(a) for a in argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_one_name_for_the_target_layers_and_max_length():
    """--model/--layers everywhere; the recipe's --base-model/--target-layers/--target stay aliases."""
    for spelling in ("--model", "--base-model", "--target", "--target-model"):
        collect = parse_collect([spelling, "m", "--layers", "0,3", "--dataset", "d", "--output-dir", "o"])
        train = parse_train(["--data-dir", "d", spelling, "m", "--target-layers", "0,3", "--report_to", "none"])
        evaluate = parse_eval([spelling, "m", "--draft", "x", "--dataset", "d"])
        assert collect.model == train.model == evaluate.model == "m"
    assert collect.layers == [0, 3] and train.layers == "0,3" and train.target_layers == train.layers
    assert train.base_model == "m"  # the former field name still reads
    assert collect.max_length == train.max_length == DEFAULT_MAX_LENGTH
    recipe = parse_collect(  # --concurrent-requests is a vLLM flag: refused with the hf backend (see below)
        "--model Qwen/Qwen3-1.7B --layers 0,13,27 --output-dir ./eagle_data --target-tokens 1000000 "
        "--batch-size 8 --concurrent-requests 4 --dataset d --backend vllm --server-url http://h:8000".split()
    )
    assert (recipe.layers, recipe.target_tokens, recipe.batch_size, recipe.concurrent_requests) == (
        [0, 13, 27],
        1000000,
        8,
        4,
    )


@pytest.mark.parametrize("tool", ["collect", "eval"])
def test_config_file_with_overrides(tool, tmp_path):
    """A YAML file by field name or flag spelling, then command-line flags on top; JSON too."""
    config = tmp_path / f"{tool}.yaml"
    config.write_text(
        "target: m\ndataset: d.jsonl\n" + ("output-dir: o\nlayers: [0, 3]\n" if tool == "collect" else "draft: x\n")
    )
    parse = PARSERS[tool]
    args = parse([str(config), "--seed", "5"])
    assert (args.model, args.dataset, args.seed) == ("m", ["d.jsonl"], 5)
    if tool == "collect":
        assert args.layers == [0, 3]
    as_json = tmp_path / f"{tool}.json"
    extra = '"output_dir": "o"' if tool == "collect" else '"draft": "x"'
    as_json.write_text('{"model": "m2", "dataset": ["a", "b"], ' + extra + "}")
    assert parse([str(as_json)]).dataset == ["a", "b"]


def test_train_config_file_honours_aliases_and_refuses_unknown_keys(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("data_dir: d\nlr: 3.0e-4\nepochs: 2\nbase-model: m\nno_deduplicate: true\nreport_to: none\n")
    for argv in ([str(config)], [str(config), "--ttt-steps", "3"]):  # with and without overrides: same file values
        args = parse_train(argv)
        assert (args.learning_rate, args.num_train_epochs, args.model, args.deduplicate) == (3e-4, 2, "m", False)
    assert parse_train([str(config), "--lr", "1e-3"]).learning_rate == 1e-3  # the command line wins
    config.write_text("data_dir: d\nlearning_rat: 3.0e-4\n")
    message = exit_message(parse_train, [config, "--ttt-steps", "3"], capsys)
    assert "learning_rat" in message and "did you mean --learning_rate" in message
    message = exit_message(parse_train, [tmp_path / "missing.yaml"], capsys)
    assert "missing.yaml does not exist" in message


@pytest.mark.parametrize(
    ("tool", "argv", "expected"),
    [
        ("train", ["--data-dir", "d", "--lrr", "1"], ["--lrr", "did you mean --lr?"]),
        ("train", ["--data-dir", "d", "--ttt-steps", "0"], ["--ttt-steps must be >= 1"]),
        (
            "train",
            ["--data-dir", "d", "--gradient_checkpointing"],
            ["--gradient_checkpointing", "--head-checkpointing"],
        ),
        ("train", ["--data-dir", "d", "--num-train-epoch", "2"], ["did you mean --num-train-epochs?"]),
        ("collect", ["--model", "m", "--dataset", "d"], ["--output-dir is required"]),
        ("collect", ["--model", "m", "--dataset", "d", "--output-dir", "o", "--batch-size", "0"], ["--batch-size"]),
        (
            "collect",
            ["--model", "m", "--dataset", "d", "--output-dir", "o", "--layers", "0,x"],
            ["--layers", "0,13,27"],
        ),
        ("collect", ["--modle", "m"], ["did you mean --model?"]),
        ("eval", ["--model", "m", "--draft", "x", "--dataset", "d", "-k", "0"], ["--num-speculative-tokens"]),
        ("eval", ["--model", "m", "--dataset", "d"], ["--draft is required"]),
        ("eval", ["--model", "m", "--draft", "x", "--dataset", "d", "--temperature", "abc"], ["--temperature"]),
    ],
)
def test_bad_flags_exit_2_with_the_flag_and_the_fix(tool, argv, expected, capsys):
    message = exit_message(PARSERS[tool], argv, capsys)
    for text in expected:
        assert text in message, message
    assert "Traceback" not in message and len(message.splitlines()) <= 3  # one line + the --help hint


@pytest.mark.parametrize(
    ("package", "flags", "fix"),
    [("matplotlib", ["--plot", "r.png"], "pip install matplotlib"), ("vllm", ["--backend", "vllm"], "--backend hf")],
)
def test_missing_packages_are_found_before_the_evaluation(package, flags, fix, monkeypatch, capsys):
    """sys.modules[name] = None is how Python itself marks a module as not importable."""
    base = ["--model", "m", "--draft", "x", "--dataset", "d"]
    assert parse_eval([*base, *flags])  # installed here: accepted
    monkeypatch.setitem(sys.modules, package, None)
    message = exit_message(parse_eval, [*base, *flags], capsys)
    assert flags[0] in message and fix in message


def test_help_shows_every_flag_with_a_help_line_and_eagle3_options_first(capsys):
    from eagle3.argparsing import Eagle3ArgumentParser
    from eagle3.collect.args import CollectArgs
    from eagle3.evaluate.args import EvalArgs

    for dtype in (CollectArgs, EvalArgs, Eagle3TrainingArguments):
        parser = Eagle3ArgumentParser(dtype, prog="x")
        undocumented = [a.option_strings for a in parser._actions if not a.help]
        assert not undocumented, f"{dtype.__name__}: no help for {undocumented}"
    with pytest.raises(SystemExit):
        parse_train(["--help"])
    text = capsys.readouterr().out
    sections = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert sections[:2] == ["options:", f"{EAGLE3_SECTION}:"], sections
    eagle3_part = text.split(f"{EAGLE3_SECTION}:")[1].split("\n\n")[0]
    assert "--ttt_steps" in eagle3_part and "(default: 7)" in eagle3_part and "--learning_rate" not in eagle3_part


def test_trainer_defaults():
    args = parse_train(["--data-dir", "d", "--report_to", "none"])
    assert args.ddp_find_unused_parameters is False and args.greater_is_better is True  # accept_len: higher is better
    by_loss = parse_train(["--data-dir", "d", "--report_to", "none", "--metric_for_best_model", "loss"])
    assert by_loss.greater_is_better is False  # inferred by transformers: keep the lowest loss


def test_console_scripts_point_at_the_tools():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    assert set(scripts) == {"eagle3", "eagle3-collect", "eagle3-train", "eagle3-eval"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


LOG_SCRIPT = """
import logging, sys
import torch
from eagle3.train.args import parse_args
from eagle3.train.cli import _setup_logging
args = parse_args(["--data-dir", "d", "--report_to", "none", "--output-dir", sys.argv[1]])
_setup_logging(args)
log = logging.getLogger("eagle3.train.main")
log.info("info from rank %d", args.process_index)
log.warning("warning from rank %d", args.process_index)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def test_info_logs_come_from_the_main_process_only(tmp_path):
    """Two real ranks (torchrun, gloo): INFO from rank 0 only, warnings from both."""
    import os
    import subprocess

    script = tmp_path / "log_ranks.py"
    script.write_text(LOG_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + [str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("info from rank 0") == 1 and "info from rank 1" not in output, output[-3000:]
    assert "warning from rank 0" in output and "warning from rank 1" in output


@pytest.fixture
def deepspeed_config_cleanup():
    """Parsing a DeepSpeed config registers it globally in transformers (is_deepspeed_zero3_enabled):
    unregister it so later tests in this process do not load models as under ZeRO-3."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@pytest.mark.parametrize("yaml_name", sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_accelerate_configs_find_their_deepspeed_json_from_any_directory(
    yaml_name, tmp_path, monkeypatch, deepspeed_config_cleanup
):
    """`accelerate launch --config_file /path/to/repo/accelerate_configs/X.yaml` from another directory:
    accelerate passes the YAML's relative ds_configs/*.json on as it is (ACCELERATE_DEEPSPEED_CONFIG_FILE)."""
    import json

    import yaml

    config = yaml.safe_load((REPO / "accelerate_configs" / yaml_name).read_text())
    if config["distributed_type"] != "DEEPSPEED":
        pytest.skip(f"{yaml_name} does not use DeepSpeed")
    relative = config["deepspeed_config"]["deepspeed_config_file"]
    assert not Path(relative).is_absolute()
    monkeypatch.chdir(tmp_path)  # not the repo root
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for the process
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", relative)
    args = parse_train(["--report_to", "none"])
    expected = json.loads((REPO / relative).read_text())["zero_optimization"]["stage"]
    assert args.deepspeed_plugin.hf_ds_config.config["zero_optimization"]["stage"] == expected


def test_deepspeed_flag_finds_the_shipped_json_from_any_directory(
    tmp_path, monkeypatch, capsys, deepspeed_config_cleanup
):
    monkeypatch.chdir(tmp_path)
    args = parse_train(["--deepspeed", "ds_configs/zero2.json", "--report_to", "none"])
    assert Path(args.deepspeed) == REPO / "ds_configs" / "zero2.json"
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    (tmp_path / "ds_configs").mkdir()  # a file of the same name in the working directory still wins
    (tmp_path / "ds_configs" / "zero2.json").write_text((REPO / "ds_configs" / "zero3.json").read_text())
    assert (
        parse_train(["--deepspeed", "ds_configs/zero2.json", "--report_to", "none"]).deepspeed
        == "ds_configs/zero2.json"
    )
    message = exit_message(parse_train, ["--deepspeed", "ds_configs/zero9.json", "--report_to", "none"], capsys)
    assert "--deepspeed ds_configs/zero9.json: no such file" in message and "absolute path" in message


def test_lk_eta_is_for_the_lk_loss_only(capsys):
    assert parse_train(["--report_to", "none"]).lk_eta == 1.0  # the earlier weight (the benchmark chose soft_ce)
    assert parse_train(["--loss", "lk_lambda", "--lk-eta", "3", "--report_to", "none"]).lk_eta == 3.0
    message = exit_message(parse_train, ["--lk-eta", "3", "--loss", "soft_ce", "--report_to", "none"], capsys)
    assert "--lk-eta 3.0 is for --loss lk_lambda" in message and "--loss is soft_ce" in message
    assert "--lk-eta must be >= 0" in exit_message(parse_train, ["--lk-eta", "-1", "--report_to", "none"], capsys)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--online-dtype", "bf16"], ["--online-dtype bf16 is for --online", "add --online"]),
        (
            ["--online", "--server-url", "http://h:8000", "--online-dtype", "fp16"],
            ["--online-dtype fp16 has no effect with --server-url"],
        ),
        (["--hidden-states-dir", "/dev/shm/h"], ["--hidden-states-dir /dev/shm/h is for --server-url"]),
        (["--online", "--hidden-states-dir", "/dev/shm/h"], ["--hidden-states-dir /dev/shm/h is for --server-url"]),
        (
            ["--max-tokens-per-batch", "4096", "--train_sampling_strategy", "random"],
            ["--train_sampling_strategy random has no effect with --max-tokens-per-batch"],
        ),
    ],
)
def test_flags_of_another_mode_are_refused_not_ignored(argv, expected, capsys):
    message = exit_message(parse_train, ["--data-dir", "d", "--report_to", "none", *argv], capsys)
    for text in expected:
        assert text in message, message


def test_flags_of_their_own_mode_are_accepted():
    base = ["--data-dir", "d", "--report_to", "none"]
    online = parse_train([*base, "--online", "--online-dtype", "bf16"])
    assert online.online_dtype == "bf16"
    served = parse_train([*base, "--online", "--server-url", "http://h:8000", "--hidden-states-dir", "/dev/shm/h"])
    assert served.hidden_states_dir == "/dev/shm/h"
    budget = parse_train([*base, "--max-tokens-per-batch", "4096"])
    assert budget.train_sampling_strategy == "group_by_length"


def test_online_training_regenerates_on_generate_url_servers_only_from_chat_data(capsys):
    """run_train.py --online --dataset --server-url: --generate-url (repeatable, comma-separated) hands
    the regeneration to plain servers; with a --data-dir store (nothing to regenerate) it is refused."""
    chats = ["--online", "--dataset", "c.jsonl", "--model", "m", "--server-url", "http://e:1", "--report_to", "none"]
    args = parse_train([*chats, "--generate-url", "http://a:1,http://b:1", "--generate-url", "http://c:1"])
    assert args.generate_url == ["http://a:1", "http://b:1", "http://c:1"]
    assert parse_train(chats).generate_url is None
    stored = ["--online", "--data-dir", "d", "--server-url", "http://e:1", "--report_to", "none"]
    err = exit_message(parse_train, [*stored, "--generate-url", "http://a:1"], capsys)
    assert "--generate-url is read by --online --dataset --server-url" in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--concurrent-requests", "4"],
        ["--server-url", "http://127.0.0.1:8000"],
        ["--generate-url", "http://127.0.0.1:8001"],
        ["--request-timeout", "30", "--max-request-attempts", "2"],
        ["--hidden-states-dir", "/tmp/x"],
    ],
)
def test_vllm_flags_with_the_hf_backend_are_refused(flags, capsys):
    """Not silently ignored: the user believes they do something."""
    err = exit_message(parse_collect, ["--model", "m", "--dataset", "d", "--output-dir", "o", *flags], capsys)
    named = [flag for flag in flags if flag.startswith("--")]
    assert f"{', '.join(named)}: only for --backend vllm" in err and "the hf backend" in err
    # the same flags with --backend vllm, or printing the server command, are fine
    parse_collect(["--model", "m", "--dataset", "d", "--output-dir", "o", "--backend", "vllm", *flags]
                  + ([] if "--server-url" in flags else ["--server-url", "http://h:8000"]))  # fmt: skip
    parse_collect(["--model", "m", "--output-dir", "o", "--print-server-command", *flags])


def test_generate_url_lists_and_what_it_needs(capsys):
    """Repeatable and comma-separated; capture still needs --server-url (only --no-states runs on
    generation servers alone); flags that would do nothing are refused."""
    base = ["--model", "m", "--dataset", "d", "--output-dir", "o", "--backend", "vllm"]
    args = parse_collect([*base, "--server-url", "http://e:1", "--generate-url", "http://a:1,http://b:1",
                          "--generate-url", "http://c:1"])  # fmt: skip
    assert args.generate_url == ["http://a:1", "http://b:1", "http://c:1"] and args.server_url == ["http://e:1"]
    assert parse_collect([*base, "--generate-url", "http://a:1", "--no-states"]).server_url == []
    for flags, message in [
        (["--generate-url", "http://a:1"], "only --no-states runs on --generate-url servers alone"),
        (["--server-url", "http://e:1", "--generate-url", "http://a:1", "--no-regenerate"], "nothing is generated"),
        (["--server-url", "http://e:1", "--generate-model", "qwen"], "--generate-model names the model"),
    ]:
        assert message in exit_message(parse_collect, [*base, *flags], capsys)


@pytest.mark.parametrize(
    "model", ["./models/Qwen3-8b", "/no/such/Qwen3-8B", "~/models/Qwen3-8B", "models/qwen/Qwen3-8B"]
)
def test_a_mistyped_local_model_path_is_reported_as_missing_not_as_a_hub_id(model, capsys):
    err = exit_message(parse_collect, ["--model", model, "--dataset", "d", "--output-dir", "o"], capsys)
    assert f"--model {model}: no such local folder" in err


def test_hub_ids_and_existing_folders_still_pass_the_model_check(tmp_path, monkeypatch):
    assert parse_collect(["--model", "Qwen/Qwen3-8B", "--dataset", "d", "--output-dir", "o"]).model == "Qwen/Qwen3-8B"
    (tmp_path / "models" / "q").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    parsed = parse_collect(["--model", "./models/q", "--dataset", "d", "--output-dir", "o"])
    assert parsed.model == str(tmp_path / "models" / "q")
