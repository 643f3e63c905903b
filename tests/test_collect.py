"""run_collect.py with the in-process (hf) backend: exact states, loss masks, resume after SIGKILL, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle3.collect.cli import main
from eagle3.data.store import HiddenStateStore
from eagle3.testing import synthetic_conversations, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    """Run run_collect.py's main in-process; (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def reference_states(model, input_ids: torch.Tensor, layers: list[int]):
    """Plain transformers forward: layer i = hidden_states[i + 1], except the last layer, whose
    output is the INPUT of the final norm (HF's last hidden_states entry is after the norm)."""
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda module, args: captured.update(last=args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids[None], output_hidden_states=True)
    finally:
        handle.remove()
    num_layers = model.config.num_hidden_layers
    states = [captured["last"][0] if layer == num_layers - 1 else out.hidden_states[layer + 1][0] for layer in layers]
    assert not torch.equal(out.hidden_states[num_layers][0], captured["last"][0])  # the norm did change it
    return torch.cat(states, dim=-1), captured["last"][0]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rows = synthetic_conversations(3, seed=11, turns=2)
    rows.append({"prompt": "Count from 3 to 7."})
    rows.append({"conversations": [{"from": "human", "value": "Spell the word tiger."}, {"from": "gpt", "value": "T"}]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", rows)


def test_hf_states_equal_plain_forward_and_mask_is_assistant_only(trained_target, chats, tmp_path, capsys):
    out = tmp_path / "store"
    code, stdout, stderr = run_main(
        [
            "--model",
            trained_target,
            "--dataset",
            chats,
            "--output-dir",
            out,
            "--layers",
            "0,3,7",
            "--hidden-dtype",
            "fp32",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "3",
            "--enable-thinking",
            "false",  # the served turn's empty think block is prompt: what the mask check below expects
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert "collected 5 samples" in stdout and str(out) in stdout and "bytes/token" in stdout
    store = HiddenStateStore(out)
    assert store.manifest["layers"] == [0, 3, 7] and store.manifest["vllm_layer_ids"] == [1, 4, 8]
    assert len(store) == 5
    model = AutoModelForCausalLM.from_pretrained(trained_target, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_target)
    header = tokenizer.encode("<|im_start|>assistant\n")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    think = tokenizer.encode("<think>\n\n</think>\n\n")
    for i in range(len(store)):
        sample = store[i]
        aux, last = reference_states(model, sample.input_ids, [0, 3, 7])
        # batched (right-padded) capture vs an unpadded single forward: equal to float32 rounding
        torch.testing.assert_close(sample.aux_hidden_states, aux, rtol=0, atol=2e-5)
        torch.testing.assert_close(sample.last_hidden_states, last, rtol=0, atol=2e-5)
        # loss mask: every assistant answer (up to and including <|im_end|>), nothing else,
        # and the served turn's empty think block is prompt, not answer
        ids = sample.input_ids.tolist()
        expected = [False] * len(ids)
        position = 0
        while position < len(ids):
            if ids[position : position + len(header)] == header:
                start = position + len(header)
                if ids[start : start + len(think)] == think:
                    start += len(think)
                stop = ids.index(end, start) if end in ids[start:] else len(ids) - 1
                expected[start : stop + 1] = [True] * (stop + 1 - start)
                position = stop
            position += 1
        assert sample.loss_mask.tolist() == expected, tokenizer.decode(ids)
    # regenerated: the dataset's answers are gone, the target's own are stored
    texts = [tokenizer.decode(store[i].input_ids) for i in range(len(store))]
    assert not any(text.endswith("\nT<|im_end|>") for text in texts)


def test_hf_exact_in_fp32_single_batch_and_no_regenerate(trained_target, chats, tmp_path, capsys):
    out = tmp_path / "store"
    code, _, stderr = run_main(
        [
            "--model",
            trained_target,
            "--dataset",
            chats,
            "--output-dir",
            out,
            "--no-regenerate",
            "--hidden-dtype",
            "fp32",
            "--batch-size",
            "1",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, stderr
    store = HiddenStateStore(out)
    assert store.manifest["layers"] == [1, 3, 4]  # EAGLE-3 default for 8 layers: (1, L//2-1, L-4)
    assert len(store) == 4  # the bare prompt has no answer to learn without regeneration
    model = AutoModelForCausalLM.from_pretrained(trained_target, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_target)
    rows = [json.loads(line) for line in chats.read_text().splitlines()]
    for i in range(len(store)):
        sample = store[i]
        aux, last = reference_states(model, sample.input_ids, [1, 3, 4])
        assert torch.equal(sample.aux_hidden_states, aux)
        assert torch.equal(sample.last_hidden_states, last)
        row = rows[sample.key]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"] if "messages" in row else ["T"]
        masked = tokenizer.decode(sample.input_ids[sample.loss_mask])
        assert masked == "".join(answer + "<|im_end|>" for answer in answers)


# --------------------------------------------------------------------------- resume after SIGKILL
def _collect_cmd(model, data, out, *extra):
    return [
        sys.executable,
        str(REPO / "run_collect.py"),
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
        "--shard-tokens",
        "60",
        "--target-tokens",
        "400",
        "--enable-thinking",
        "false",  # the samples this test was sized with (bf16 state tolerance, kill timing)
        "--quiet",
        *extra,
    ]


def _samples(directory):
    store = HiddenStateStore(directory, deduplicate=False)
    return {store[i].key: store[i] for i in range(len(store))}


def test_resume_after_sigkill_gives_the_uninterrupted_samples(trained_target, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(20, seed=3, turns=1))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = tmp_path / "reference"
    assert run_main(_collect_cmd(trained_target, data, reference)[2:], capsys)[0] == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen(_collect_cmd(trained_target, data, killed), env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            manifest = killed / "manifest.json"
            if manifest.exists() and json.loads(manifest.read_text()).get("num_samples", 0) >= 3:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before it could be killed; make it longer"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    partial = json.loads((killed / "manifest.json").read_text())
    expected = _samples(reference)
    assert 0 < partial["num_samples"] < len(expected)
    code, stdout, _ = run_main(_collect_cmd(trained_target, data, killed)[2:], capsys)
    assert code == 0 and f"collected {len(expected) - partial['num_samples']} samples" in stdout

    resumed = _samples(killed)
    assert sorted(resumed) == sorted(expected)  # same keys
    assert HiddenStateStore(killed, deduplicate=False).manifest["num_samples"] == len(expected)  # none twice
    for key, sample in expected.items():
        assert torch.equal(resumed[key].input_ids, sample.input_ids)
        assert torch.equal(resumed[key].loss_mask, sample.loss_mask)
        torch.testing.assert_close(resumed[key].aux_hidden_states, sample.aux_hidden_states, rtol=0, atol=1e-2)
    # both stopped at --target-tokens: the last sample (highest key) is the one that crossed 400
    total = sum(len(s.input_ids) for s in resumed.values())
    assert total >= 400 > total - len(resumed[max(resumed)].input_ids)


# --------------------------------------------------------------------------- bad inputs
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_inputs_have_clear_messages(trained_target, chats, tmp_path, capsys):
    base = ["--model", trained_target, "--output-dir", tmp_path / "out", "--quiet"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    code, _, err = run_main([*base, "--dataset", bad], capsys)
    assert code == 2 and f"{bad}:2: malformed JSON" in err and "--skip-bad-lines" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_main([*base, "--dataset", empty], capsys)
    assert code == 2 and "no usable conversations" in err

    code, _, err = run_main([*base, "--dataset", chats, "--layers", "0,8"], capsys)
    assert code == 2 and "--layers: layer(s) [8] out of range" in err and "0..7" in err

    code, _, err = run_main([*base, "--dataset", chats, "--layers", "0,x"], capsys)
    assert code == 2 and "--layers: expected comma-separated integers" in err

    code, _, err = run_main(
        ["--model", tmp_path / "no-model", "--dataset", chats, "--output-dir", tmp_path / "o"], capsys
    )
    assert code == 2 and f"--model {tmp_path / 'no-model'}: no such local folder" in err  # not "a bad Hub id"

    port = _free_port()
    started = time.time()
    code, _, err = run_main(
        [
            *base,
            "--dataset",
            chats,
            "--backend",
            "vllm",
            "--server-url",
            f"http://127.0.0.1:{port}",
            "--max-retries",
            "2",
        ],
        capsys,
    )
    assert code == 2 and f"http://127.0.0.1:{port}" in err and "unreachable after 3 attempts" in err
    assert "--print-server-command" in err
    assert time.time() - started < 30


def test_a_run_that_skips_every_conversation_fails_with_why(trained_target, chats, tmp_path, capsys):
    argv = ["--model", trained_target, "--dataset", chats, "--output-dir", tmp_path / "out", "--quiet"]
    code, _, err = run_main([*argv, "--no-regenerate", "--max-length", "8"], capsys)
    assert code == 2 and "every conversation" in err and "--max-length 8" in err and "Raise --max-length" in err
    # nothing was stored, so the next run with the fix may use the same directory
    code, stdout, _ = run_main([*argv, "--no-regenerate", "--max-length", "512"], capsys)
    assert code == 0 and "collected 4 samples" in stdout  # the prompt-only record has no answer


def test_resume_with_other_settings_is_refused(trained_target, chats, tmp_path, capsys):
    argv = [
        "--model",
        trained_target,
        "--dataset",
        chats,
        "--output-dir",
        tmp_path / "out",
        "--no-regenerate",
        "--quiet",
    ]
    assert run_main(argv, capsys)[0] == 0
    code, stdout, _ = run_main(argv, capsys)  # same settings: resumes, nothing new
    assert code == 0 and "collected 0 samples" in stdout and "4 samples" in stdout
    code, _, err = run_main([*argv, "--layers", "0,3,7"], capsys)
    assert code == 2 and "other settings (layers: stored [1, 3, 4], now [0, 3, 7]" in err
    code, _, err = run_main([*argv, "--hidden-dtype", "fp16"], capsys)
    assert code == 2 and "hidden_dtype: stored 'bf16', now 'fp16'" in err


def test_skip_bad_lines_counts(trained_target, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [json.dumps(r) for r in synthetic_conversations(2, seed=1)]
    data.write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")
    code, stdout, err = run_main(
        [
            "--model",
            trained_target,
            "--dataset",
            data,
            "--output-dir",
            tmp_path / "o",
            "--no-regenerate",
            "--skip-bad-lines",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert "collected 2 samples" in stdout and "skipped 1 malformed records" in stdout


def test_ranks_take_disjoint_shares(trained_target, chats, tmp_path, capsys, monkeypatch):
    """What torchrun / accelerate launch set: RANK and WORLD_SIZE; each rank writes its own shards."""
    argv = ["--model", trained_target, "--dataset", chats, "--output-dir", tmp_path, "--no-regenerate", "--quiet"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert run_main(argv, capsys)[0] == 0
    assert sorted(p.name[:9] for p in tmp_path.glob("shard-*")) == ["shard-r00", "shard-r01"]
    rank0, rank1 = (HiddenStateStore(tmp_path, ranks=[r]) for r in (0, 1))
    keys0, keys1 = ({s[i].key for i in range(len(s))} for s in (rank0, rank1))
    assert keys0 == {0, 2, 4} and keys1 == {1}  # key 3 (a bare prompt) has no answer without regeneration
    assert HiddenStateStore(tmp_path).manifest["ranks"] == [0, 1]


def test_num_shards_flags_split_without_torchrun(trained_target, chats, tmp_path, capsys, monkeypatch):
    """--num-shards/--shard-index: the split of the launcher's RANK/WORLD_SIZE, for clients on several
    nodes started without torchrun; checked before anything is loaded."""
    argv = ["--model", trained_target, "--dataset", chats, "--output-dir", tmp_path, "--no-regenerate", "--quiet"]
    assert run_main([*argv, "--num-shards", "2", "--shard-index", "1"], capsys)[0] == 0
    assert [p.name[:9] for p in tmp_path.glob("shard-*")] == ["shard-r01"]
    store = HiddenStateStore(tmp_path)
    assert [store[i].key for i in range(len(store))] == [1]
    code, _, err = run_main([*argv, "--num-shards", "2"], capsys)
    assert code == 2 and "--num-shards and --shard-index go together" in err
    code, _, err = run_main([*argv, "--num-shards", "2", "--shard-index", "2"], capsys)
    assert code == 2 and "--shard-index must be in 0..1" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    code, _, err = run_main([*argv, "--num-shards", "2", "--shard-index", "1"], capsys)
    assert code == 2 and "disagree with the launcher's WORLD_SIZE=4 RANK=3" in err


def test_sampling_is_seeded(trained_target, chats, tmp_path, capsys):
    argv = [
        "--model",
        trained_target,
        "--dataset",
        chats,
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
        "--quiet",
    ]
    for name in ("a", "b"):
        assert run_main([*argv, "--output-dir", tmp_path / name], capsys)[0] == 0
    a, b = HiddenStateStore(tmp_path / "a"), HiddenStateStore(tmp_path / "b")
    assert [a[i].input_ids.tolist() for i in range(len(a))] == [b[i].input_ids.tolist() for i in range(len(b))]


def test_hf_backend_loads_the_target_straight_onto_its_device(tmp_path):
    """No full host copy per rank: loaded onto the 'meta' device the target takes no host
    memory; loaded on the CPU and then moved, it would take its full size (~220 MB here)."""
    from eagle3.collect.hf import HfBackend
    from eagle3.data.template import ChatRenderer
    from eagle3.memory import PeakRSS
    from eagle3.testing import build_qwen3_target

    target = build_qwen3_target(tmp_path / "t", "small", "untied", dtype="bfloat16", vocab_size=151936)
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(target))
    with PeakRSS() as peak:
        backend = HfBackend(str(target), renderer, [0, 1, 2], device="meta", dtype="float32")
    assert next(backend.model.parameters()).device.type == "meta"
    assert peak.delta_gib < 0.06, f"host memory peaked {peak.delta_gib:.2f} GiB above the start while loading"


def test_local_model_path_is_stored_absolute_and_resumes_however_typed(
    trained_target, chats, tmp_path, capsys, monkeypatch
):
    """./target and target are one model: the manifest holds the absolute path, resume accepts both."""
    (tmp_path / "target").symlink_to(trained_target, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", chats, "--output-dir", "out", "--no-regenerate", "--quiet"]
    assert run_main(["--model", "./target", *argv], capsys)[0] == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["target"]["name_or_path"] == str(Path(trained_target).resolve())
    code, stdout, err = run_main(["--model", "target", *argv], capsys)
    assert code == 0, err
    assert "collected 0 samples" in stdout


def test_hf_backend_caps_max_length_at_the_targets_positions(random_target, tmp_path, capsys):
    """As the vLLM backend does (where a server could not serve more): the tiny target has 2048."""
    chats = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(1, seed=2))
    argv = ["--model", random_target, "--dataset", chats, "--output-dir", tmp_path / "out", "--quiet"]
    code, _, err = run_main([*argv, "--no-regenerate", "--max-length", "4096"], capsys)
    assert code == 0, err
    assert "--max-length 4096 capped at 2048: the target has 2048 positions" in err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["max_length"] == 2048


def test_thinking_defaults_to_how_the_target_is_served(trained_target, chats, tmp_path, capsys):
    """The tiny target's template has Qwen3's switch: by default collection renders as vLLM serves it,
    thinking on (no empty think block in the prompt), says so, and records the choice; false turns it off."""
    argv = ["--model", trained_target, "--dataset", chats, "--no-regenerate", "--quiet"]
    code, stdout, err = run_main([*argv, "--output-dir", tmp_path / "auto"], capsys)
    assert code == 0, err
    assert stdout.splitlines()[0] == (
        "run_collect.py: thinking: on (the target's chat template serves thinking by default; "
        "--enable-thinking false to train for a non-thinking deployment)"
    )
    code, stdout, err = run_main([*argv, "--output-dir", tmp_path / "off", "--enable-thinking", "false"], capsys)
    assert code == 0 and "thinking: off (--enable-thinking given)" in stdout, err
    tokenizer = AutoTokenizer.from_pretrained(trained_target)
    think = tokenizer.convert_tokens_to_ids("<think>")
    for name, thinking in (("auto", True), ("off", False)):
        store = HiddenStateStore(tmp_path / name)
        assert store.manifest["settings"]["enable_thinking"] is thinking
        assert any(think in store[i].input_ids.tolist() for i in range(len(store))) is not thinking
