"""run_train.py end to end on data collected from the tiny trained target (single process)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

from eagle3.export.check import check_draft
from eagle3.train.args import parse_args
from eagle3.train.cli import main as run_train_main
from eagle3.train.main import resolve_resume, train

try:
    from tests.train_data import StopAt, assert_resumed_equals_straight, cached_store, wandb_offline_records
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from train_data import StopAt, assert_resumed_equals_straight, cached_store, wandb_offline_records

FAST = [
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--draft-vocab-size",
    "256",
    "--ttt-steps",
    "4",
    "--dataloader_num_workers",
    "0",
    "--logging_steps",
    "5",
]


@pytest.fixture(scope="module")
def data_dir(trained_target) -> Path:
    return cached_store(trained_target)


def _eval_history(output_dir: Path) -> list[dict]:
    last = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "eval_accept_len" in entry]


@pytest.fixture(scope="module")
def trained_run(data_dir, trained_target, tmp_path_factory):
    """One short run with W&B (offline) and --push_to_hub, the Hub client patched at its HTTP methods."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    calls: dict[str, list] = {"create_repo": [], "create_commit": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def whoami(self, *args, **kwargs):  # a bare --hub_model_id goes under the logged-in user
        calls.setdefault("whoami", []).append(kwargs)
        return {"name": "someone", "type": "user"}

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"].append((repo_id, [op.path_in_repo for op in operations], kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

    argv = [
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(output_dir),
        "--base-model",
        str(trained_target),
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--eval-ratio",
        "0.15",
        "--eval_on_start",
        "true",
        *FAST,
        "--report_to",
        "wandb",
        "--run_name",
        "tiny-test",
        "--push_to_hub",
        "--hub_model_id",
        "eagle3-tiny",
    ]
    with (
        mock.patch.dict(os.environ, {"WANDB_MODE": "offline", "HF_TOKEN": "hf_test"}),  # logged in
        mock.patch.object(HfApi, "create_repo", create_repo),
        mock.patch.object(HfApi, "create_commit", create_commit),
        mock.patch.object(HfApi, "whoami", whoami),
    ):
        metrics = train(parse_args(argv))
        import wandb

        wandb.finish()
    return SimpleNamespace(output_dir=output_dir, metrics=metrics, hub_calls=calls, target=trained_target)


def test_training_raises_eval_acceptance_over_the_untrained_draft(trained_run):
    history = _eval_history(trained_run.output_dir)
    untrained = history[0]  # --eval_on_start: the draft before any update
    assert untrained["step"] == 0
    trained = trained_run.metrics
    print(
        f"accept_len untrained {untrained['eval_accept_len']:.3f} -> trained {trained['eval_accept_len']:.3f}; "
        f"product {untrained['eval_accept_len_product']:.3f} -> {trained['eval_accept_len_product']:.3f}"
    )
    assert untrained["eval_accept_len"] < 1.2
    assert trained["eval_accept_len"] > untrained["eval_accept_len"] + 0.5
    assert trained["eval_acc_0"] > 0.5
    # the consecutive-run estimator never exceeds the product formula's optimism by construction? no: just sane
    assert 1.0 <= trained["eval_accept_len"] <= 1.0 + 4
    for step in range(4):
        assert f"eval_loss_{step}" in trained and f"eval_cum_acc_{step}" in trained
    assert 0.0 <= trained["eval_padding_fraction"] < 0.5


def test_best_model_is_the_best_eval_checkpoint_and_passes_eagle3_check(trained_run):
    best = trained_run.output_dir / "best_model"
    info = json.loads((best / "eagle3_eval.json").read_text())
    best_seen = max(entry["eval_accept_len"] for entry in _eval_history(trained_run.output_dir))
    assert info["metrics"]["eval_accept_len"] == pytest.approx(best_seen)
    assert check_draft(best, trained_run.target) == []
    assert check_draft(trained_run.output_dir / "final_model", trained_run.target) == []
    config = json.loads((best / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Qwen3ForCausalLM"] and config["draft_vocab_size"] == 256
    tensors = load_file(best / "model.safetensors")
    assert "embed_tokens.weight" not in tensors and tensors["d2t"].dtype == torch.int64
    assert sorted(p.name for p in best.glob("*.safetensors")) == ["model.safetensors"]


def test_wandb_offline_run_holds_per_step_acceptance(trained_run):
    runs = list((trained_run.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged, config = set(), set()
    for record in wandb_offline_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            logged |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key or "/".join(item.nested_key) for item in record.config.update}
    for key in (
        "train/acc_0",
        "train/acc_3",
        "train/cum_acc_3",
        "train/accept_len",
        "train/accept_len_product",
        "train/loss_0",
        "train/padding_fraction",
        "eval/acc_0",
        "eval/accept_len",
    ):
        assert key in logged, sorted(logged)
    assert {"ttt_steps", "ttt_decay", "draft_vocab_size", "data"} <= config  # the run config and data stats


def test_model_card_and_hub_upload(trained_run):
    card = (trained_run.output_dir / "best_model" / "README.md").read_text()
    for expected in (
        "eagle3",
        "[1, 3, 4]",
        "[2, 4, 5]",
        "256 of 768",
        "num_train_samples",
        "accept_len",
        '"method": "eagle3"',
        "someone/eagle3-tiny",
        str(trained_run.target),
    ):
        assert expected in card, expected
    assert str(trained_run.output_dir) not in card  # the draft is named by its Hub id, never a local path
    assert len(trained_run.hub_calls["whoami"]) == 1  # resolved once, before training
    assert [repo for repo, _ in trained_run.hub_calls["create_repo"]] == ["someone/eagle3-tiny"]
    ((repo_id, files, _),) = trained_run.hub_calls["create_commit"]
    assert repo_id == "someone/eagle3-tiny"
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoint-") or name.endswith(".bin") for name in files)


@pytest.mark.parametrize(
    ("batching", "stop_at"),
    [
        # 117 train samples / batch 16 = 8 steps per epoch: interrupted in epoch 0, the run ends in epoch 1.
        ([], 5),
        # 117 samples of 27-45 tokens in 768-token batches = 6 steps per epoch: interrupted mid-epoch 1,
        # whose batch order (seed + epoch) the resumed run must draw again.
        (["--max-tokens-per-batch", "768"], 8),
    ],
)
def test_resume_equals_uninterrupted(data_dir, trained_target, tmp_path, batching, stop_at):
    def args(out, *extra):
        return parse_args(
            [
                "--data-dir",
                str(data_dir),
                "--output-dir",
                str(out),
                "--base-model",
                str(trained_target),
                "--max_steps",
                "11",
                "--batch-size",
                "16",
                "--lr",
                "3e-3",
                "--eval-ratio",
                "0.15",
                "--eval_strategy",
                "no",
                "--save_strategy",
                "steps",
                "--save_steps",
                "100",
                *FAST,
                *batching,
                *extra,
            ]
        )

    checkpoint = tmp_path / "interrupted" / f"checkpoint-{stop_at}"
    train(args(tmp_path / "straight"))
    train(args(tmp_path / "interrupted"), callbacks=[StopAt(stop_at)])
    assert (checkpoint / "optimizer.pt").exists()
    train(args(tmp_path / "interrupted", "--resume_from_checkpoint", str(checkpoint)))
    assert_resumed_equals_straight(tmp_path / "straight", tmp_path / "interrupted", checkpoint)


def _rewritten_manifest(data_dir: Path, tmp_path: Path, **changes) -> Path:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for key, value in changes.items():
        if key == "config_hash":
            manifest["target"]["config_hash"] = value
        else:
            manifest[key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


@pytest.mark.parametrize(
    ("change", "flags", "expected"),
    [
        ({}, ["--target-layers", "0,3,7"], ["--layers 0,3,7", "1,3,4", "vLLM ids [2, 4, 5]"]),
        ({"config_hash": "0123456789abcdef"}, [], ["--model", "not the model", "0123456789abcdef"]),
        ({"hidden_size": 2048}, [], ["--model", "hidden size 128", "size 2048"]),
        ({}, ["--layers", "1,3,9"], ["--layers", "out of range", "0..7"]),
    ],
)
def test_mismatches_stop_before_any_work_with_a_clear_message(
    data_dir, trained_target, tmp_path, capsys, change, flags, expected
):
    directory = _rewritten_manifest(data_dir, tmp_path, **change) if change else data_dir
    code = run_train_main(
        [
            "--data-dir",
            str(directory),
            "--output-dir",
            str(tmp_path / "out"),
            "--base-model",
            str(trained_target),
            *FAST,
            *flags,
        ]
    )
    message = capsys.readouterr().err
    assert code == 2
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "out").exists()


def test_several_gpus_in_one_process_are_refused_before_training(
    data_dir, trained_target, tmp_path, capsys, monkeypatch
):
    """`python run_train.py` on a node with 2 visible GPUs: transformers would use nn.DataParallel."""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    argv = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"), "--base-model", str(trained_target)]
    code = run_train_main([*argv, *FAST])
    message = capsys.readouterr().err
    assert code == 2
    for text in (
        "2 GPUs",
        "DataParallel",
        "torchrun --nproc_per_node 2",
        "accelerate launch",
        "CUDA_VISIBLE_DEVICES=0",
    ):
        assert text in message, message
    assert not (tmp_path / "out").exists()  # nothing trained, nothing saved


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("last", ["--resume_from_checkpoint last", "no checkpoint-N folder", "Drop --resume_from_checkpoint"]),
        ("True", ["--resume_from_checkpoint True", "no checkpoint-N folder"]),
        ("{out}/checkpoint-7", ["checkpoint-7", "not a Trainer checkpoint folder"]),
    ],
)
def test_resume_without_a_checkpoint_stops_before_training(data_dir, trained_target, tmp_path, capsys, value, expected):
    """Without the check, `last` with an empty --output-dir silently trained from step 0."""
    out = tmp_path / "out"
    out.mkdir()  # an earlier run's folder without checkpoints (e.g. --save_strategy no)
    argv = ["--data-dir", str(data_dir), "--output-dir", str(out), "--base-model", str(trained_target)]
    code = run_train_main([*argv, *FAST, "--max_steps", "1", "--resume_from_checkpoint", value.format(out=out)])
    message = capsys.readouterr().err
    assert code == 2, message
    for text in expected:
        assert text in message, message
    assert list(out.iterdir()) == []  # nothing trained, nothing saved


def test_resume_last_picks_the_newest_checkpoint(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    for value in ("last", "true"):
        args = parse_args(["--output-dir", str(tmp_path), "--resume_from_checkpoint", value, "--report_to", "none"])
        assert resolve_resume(args) == str(tmp_path / "checkpoint-10")
    given = str(tmp_path / "checkpoint-2")
    assert resolve_resume(parse_args(["--resume_from_checkpoint", given, "--report_to", "none"])) == given
    assert resolve_resume(parse_args(["--report_to", "none"])) is None


@pytest.mark.parametrize(
    ("hub_model_id", "login", "expected"),
    [
        ("org/eagle3-tiny", False, ["--push_to_hub", "no Hugging Face token", "huggingface-cli login", "HF_TOKEN"]),
        ("org/eagle3/tiny", True, ["--hub_model_id org/eagle3/tiny", "not a Hub repo id", "OWNER/NAME"]),
    ],
)
def test_push_to_hub_without_a_login_or_with_a_bad_id_stops_before_training(
    data_dir, trained_target, tmp_path, capsys, no_hf_login, monkeypatch, hub_model_id, login, expected
):
    """Without the check the upload failed at the very end, after all the training."""
    if login:
        monkeypatch.setenv("HF_TOKEN", "hf_test")
    argv = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"), "--base-model", str(trained_target)]
    code = run_train_main([*argv, *FAST, "--max_steps", "1", "--push_to_hub", "--hub_model_id", hub_model_id])
    message = capsys.readouterr().err
    assert code == 2, message
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "out").exists()


def test_recipe_flags_and_config_file_map_onto_training_arguments(tmp_path):
    args = parse_args(
        "--data-dir d --filter-rank 0 --no-deduplicate --output-dir o --base-model m "
        "--target-layers 0,13,27 --num-draft-layers 2 --epochs 10 --batch-size 64 "
        "--gradient-accumulation-steps 4 --lr 1e-4 --report_to none".split()
    )
    assert (args.data_dir, args.filter_ranks, args.deduplicate, args.output_dir) == ("d", [0], False, "o")
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (10, 64, 4)
    assert (args.learning_rate, args.num_draft_layers, args.layers, args.model) == (1e-4, 2, "0,13,27", "m")
    same = parse_args(
        "--data_dir d --num_train_epochs 10 --per_device_train_batch_size 64 --learning_rate 1e-4 "
        "--report_to none".split()
    )
    assert (same.num_train_epochs, same.per_device_train_batch_size, same.learning_rate) == (10, 64, 1e-4)
    (tmp_path / "train.yaml").write_text("data_dir: d\nnum_train_epochs: 2\nttt_steps: 5\nreport_to: none\n")
    from_file = parse_args([str(tmp_path / "train.yaml")])
    assert (from_file.num_train_epochs, from_file.ttt_steps) == (2, 5)
    overridden = parse_args([str(tmp_path / "train.yaml"), "--ttt-steps", "3"])
    assert (overridden.num_train_epochs, overridden.ttt_steps) == (2, 3)


@pytest.mark.slow
@pytest.mark.vllm
def test_best_model_loads_and_speculates_in_vllm(trained_run, tmp_path, vllm_bench):
    out = vllm_bench(trained_run.target, [trained_run.output_dir / "best_model"], tmp_path)
    (run,) = out["drafts"].values()
    print(f"vLLM acceptance length of best_model: {run['acceptance_length']:.3f}")
    assert run["num_drafts"] > 0 and run["acceptance_length"] > 1.3


def test_relative_target_paths_are_stored_absolute(data_dir, trained_target, tmp_path, monkeypatch):
    """What names the target (the draft's config.json, hence its model card) works from any directory."""
    from eagle3.cli import new_draft
    from eagle3.train.main import check_data_against_target

    (tmp_path / "target").symlink_to(trained_target, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    absolute = str(Path(trained_target).resolve())
    for typed in ("./target", "target"):
        plan = check_data_against_target(parse_args(["--data-dir", str(data_dir), "--base-model", typed, *FAST]))
        assert plan.base_model == absolute
    draft = new_draft("./target", tmp_path / "draft")
    assert json.loads((draft / "config.json").read_text())["target_model_name_or_path"] == absolute


def test_filter_rank_that_drops_collected_ranks_warns(data_dir, trained_target, tmp_path, caplog):
    """After `torchrun ... run_collect.py` every rank wrote its share: --filter-rank 0 would train
    on 1/world_size of the data, so it says so (and training without it uses everything)."""
    from eagle3.data.store import HiddenStateStore, StoreWriter

    source = HiddenStateStore(data_dir)
    header = {key: source.manifest[key] for key in ("layers", "vllm_layer_ids", "hidden_size", "hidden_dtype")}
    header["target"] = source.manifest["target"]
    two_ranks = tmp_path / "two-ranks"
    for rank in (0, 1):
        writer = StoreWriter(two_ranks, header, rank=rank)
        for i in range(rank, 16, 2):
            writer.add(source[i])
        writer.close()
    common = ["--data-dir", str(two_ranks), "--base-model", str(trained_target), "--max_steps", "1"]
    common += ["--eval-ratio", "0", "--save_strategy", "no", *FAST]
    with caplog.at_level(logging.WARNING, logger="eagle3"):
        train(parse_args([*common, "--output-dir", str(tmp_path / "filtered"), "--filter-rank", "0"]))
    warnings = [r.getMessage() for r in caplog.records if "--filter-rank" in r.getMessage()]
    assert len(warnings) == 1 and "ranks [0, 1] present (8 samples kept)" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eagle3"):
        train(parse_args([*common, "--output-dir", str(tmp_path / "all")]))
    assert not [r for r in caplog.records if "--filter-rank" in r.getMessage()]


def test_exports_take_the_targets_dtype_checkpoints_stay_fp32(data_dir, trained_target, tmp_path):
    """A bf16 target (as Qwen3 ships, as vLLM serves it): best_model/ is bf16 (vLLM loads it without a
    cast per tensor), its config says so and it passes eagle3 check; checkpoints keep fp32 masters."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eagle3.export.check import check_draft

    bf16_target = tmp_path / "target-bf16"
    AutoModelForCausalLM.from_pretrained(trained_target, dtype=torch.bfloat16).save_pretrained(bf16_target)
    AutoTokenizer.from_pretrained(trained_target).save_pretrained(bf16_target)
    output_dir = tmp_path / "out"
    argv = ["--data-dir", str(data_dir), "--base-model", str(bf16_target), "--output-dir", str(output_dir)]
    argv += ["--max_steps", "1", "--eval-ratio", "0", "--save_strategy", "steps", "--save_steps", "1", *FAST]
    train(parse_args(argv))

    def float_dtypes(folder: Path) -> set[torch.dtype]:
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            tensors = [handle.get_tensor(name) for name in handle.keys()]
        return {t.dtype for t in tensors if t.is_floating_point()}

    best = output_dir / "best_model"
    assert float_dtypes(best) == {torch.bfloat16}
    assert json.loads((best / "config.json").read_text())["dtype"] == "bfloat16"
    assert check_draft(best, bf16_target) == []
    assert float_dtypes(output_dir / "checkpoint-1") == {torch.float32}
