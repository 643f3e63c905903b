"""The vLLM client against small fake servers that misbehave on purpose (tests/fake_vllm.py).

No vLLM here: each scenario takes seconds, so faults that need precise timing (a frozen writer,
a server that restarts on one request) are tested without a real engine. Real vLLM servers are
in tests/test_collect_vllm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from eagle3.collect.cli import main
from eagle3.data.store import HiddenStateStore
from eagle3.testing import synthetic_conversations, write_jsonl
from tests.fake_vllm import _HOLD_LOCK, FakeVllm, fake_states

LAYERS = "0,3,7"  # vLLM ids 1, 4, 8 = L: three captured states
NUM_IDS, HIDDEN = 3, 128  # the tiny target's


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str, seconds: float):
        self.returncode, self.stdout, self.stderr, self.seconds = returncode, stdout, stderr, seconds


def _run(*argv, limit: float = 120.0) -> _Result:
    """run_collect.py in-process, in a thread: a run that hangs fails the test after ``limit`` s."""
    stdout, stderr = io.StringIO(), io.StringIO()
    outcome: dict = {"code": 0}

    def target() -> None:
        try:
            main([str(a) for a in argv])
        except SystemExit as exit_:
            outcome["code"] = exit_.code
        except BaseException as error:  # noqa: BLE001 - reported by the test
            outcome["error"] = error

    started = time.monotonic()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(limit)
    assert not thread.is_alive(), f"run_collect.py still running after {limit} s: {stderr.getvalue()[-2000:]}"
    if "error" in outcome:
        raise outcome["error"]
    return _Result(outcome["code"], stdout.getvalue(), stderr.getvalue(), time.monotonic() - started)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", synthetic_conversations(6, seed=3))


def _args(model, chats, out, hidden_dir, urls, *extra):
    return [
        "--model", model, "--dataset", chats, "--output-dir", out, "--backend", "vllm",
        "--server-url", *urls, "--hidden-states-dir", hidden_dir, "--layers", LAYERS,
        "--no-regenerate", "--quiet", "--concurrent-requests", "2", "--max-retries", "0", *extra,
    ]  # fmt: skip


def _assert_stored_states_are_the_servers(out: Path, keys: set[int]) -> None:
    store = HiddenStateStore(out, deduplicate=False)
    assert {store[i].key for i in range(len(store))} == keys
    for i in range(len(store)):
        sample = store[i]
        want = fake_states(sample.input_ids.tolist(), NUM_IDS, HIDDEN).to(torch.bfloat16)
        assert torch.equal(sample.last_hidden_states, want[:, 2])
        assert torch.equal(sample.aux_hidden_states, want.flatten(1))


async def _freeze_after_probe(server: FakeVllm, payload: dict) -> None:
    """Captures after the start-up probe stay locked by a process that never lets go."""
    if "probe" not in payload.get("request_id", ""):
        server.frozen_locks = True


# ---------------------------------------------------------------------- the capture file's lock
def test_a_lock_held_forever_is_given_up_after_the_timeout(tmp_path):
    from eagle3.collect.capture_files import LockTimeout, read_hidden_states

    path = tmp_path / "cmpl-x.safetensors"
    path.write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="still locked by its writer after 0.5 s"):
            read_hidden_states(str(path), 0.5)
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    assert not path.exists() and not Path(f"{path}.lock").exists()  # given up: nothing of it is kept


def test_frozen_writer_fails_over_to_the_other_server(random_target, chats, tmp_path):
    """One server's capture files stay locked forever: each of its captures is given up after
    --request-timeout and taken by the other server; the run finishes with every sample."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    with (
        FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN, hook=_freeze_after_probe) as frozen,
        FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN) as good,
    ):
        result = _run(*_args(random_target, chats, tmp_path / "out", hidden, [frozen.url, good.url]),
                      "--request-timeout", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert frozen.captures >= 2  # the probe and at least one frozen capture
    assert "stayed locked by its writer past --request-timeout 2 s" in result.stderr
    _assert_stored_states_are_the_servers(tmp_path / "out", set(range(6)))
    assert not list(hidden.iterdir())


def test_frozen_writer_on_the_only_server_stops_the_run_clearly(random_target, chats, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    with FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN, hook=_freeze_after_probe) as frozen:
        result = _run(*_args(random_target, chats, tmp_path / "out", hidden, [frozen.url]), "--request-timeout", "1")
    assert result.returncode == 2
    assert f"the file vLLM server {frozen.url} wrote stayed locked" in result.stderr
    assert "--hidden-states-dir" in result.stderr
    assert result.seconds < 60
    assert not list(hidden.iterdir())  # given-up files are removed with the rest of this client's


# ---------------------------------------------------------------------- a request that makes servers fail
def _crashes_on_conversation_0(hold: float, down_for: float):
    """Conversation 0's capture makes the server fail (HTTP 500, /health too, for ``down_for`` s,
    as a crashed server being restarted) after ``hold`` s; every other request is fine."""

    async def hook(server: FakeVllm, payload: dict):
        from aiohttp import web

        if payload.get("request_id", "").endswith("-0-c"):
            await asyncio.sleep(hold)
            server.crash(down_for)
            return web.Response(status=500, text="crashed")
        return None

    return hook


def test_a_request_failing_on_restarting_servers_is_not_resent_forever(random_target, chats, tmp_path):
    """Conversation 0 takes down whichever server it is on; each restarts within a second and rejoins,
    so without a cap the request would go round the servers forever. It is sent
    --max-request-attempts times, then the run stops naming it, after storing the finished ones."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    hook = _crashes_on_conversation_0(hold=1.5, down_for=0.3)
    with (
        FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN, hook=hook) as a,
        FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN, hook=hook) as b,
    ):
        argv = _args(random_target, chats, tmp_path / "out", hidden, [a.url, b.url], "--concurrent-requests", "4")
        result = _run(*argv, "--max-request-attempts", "3", limit=90)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "capture of conversation 0 was sent 3 times (--max-request-attempts 3)" in result.stderr
    assert "rejoins" in result.stderr  # the servers did come back: only the cap stopped it
    _assert_stored_states_are_the_servers(tmp_path / "out", {1, 2, 3, 4, 5})
    assert not list(hidden.iterdir())


def test_no_server_live_is_what_stops_the_run_and_the_finished_are_stored(random_target, chats, tmp_path):
    """The only server goes down on conversation 0 and stays down: NoServerLive (rerun to resume),
    not the attempts cap, even at --max-request-attempts 1; conversations 1-5, finished, are stored."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    with FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN, hook=_crashes_on_conversation_0(1.5, 600)) as a:
        argv = _args(random_target, chats, tmp_path / "out", hidden, [a.url], "--concurrent-requests", "4")
        result = _run(*argv, "--max-request-attempts", "1", limit=60)
    assert result.returncode == 2
    assert f"no vLLM server is live ({a.url}: HTTP 500: crashed)" in result.stderr
    assert "--max-request-attempts" not in result.stderr
    _assert_stored_states_are_the_servers(tmp_path / "out", {1, 2, 3, 4, 5})


# ---------------------------------------------------------------------- non-finite states
def _bad_states(request_id: str, states: torch.Tensor) -> None:
    """Conversation 1: one value fp16 cannot hold (fine in bf16); conversation 4: a NaN in one token."""
    if request_id.endswith("-1-c"):
        states[3, 0, 5] = 1e6
    if request_id.endswith("-4-c"):
        states[2, 1, 7] = float("nan")


@pytest.mark.parametrize(
    ("hidden_dtype", "skipped"), [("fp16", {1, 4}), ("fp8", {4}), ("bf16", {4})]
)  # fmt: skip
def test_non_finite_states_are_skipped_and_counted_never_stored(random_target, chats, tmp_path, hidden_dtype, skipped):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    with FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN) as server:
        server.edit_states = _bad_states
        argv = _args(random_target, chats, tmp_path / "out", hidden, [server.url], "--hidden-dtype", hidden_dtype)
        result = _run(*argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {len(skipped)} samples whose hidden states hold inf/NaN as {hidden_dtype}" in result.stdout
    assert f"collected {6 - len(skipped)} samples" in result.stdout
    for key in skipped:
        assert f"skipped sample {key}: its hidden states hold inf/NaN as {hidden_dtype}" in result.stderr
    store = HiddenStateStore(tmp_path / "out", deduplicate=False)
    assert {store[i].key for i in range(len(store))} == set(range(6)) - skipped
    for i in range(len(store)):
        for tensor in store[i].stored_tensors().values():
            assert torch.isfinite(tensor.float()).all()


def test_training_refuses_a_batch_with_non_finite_states():
    """A store collected before the check may hold inf/NaN: the batch is refused, not trained on
    (the Trainer would only smooth the NaN loss out of its logs)."""
    from eagle3.data.codecs import NonFiniteStatesError, decode_batch, encode

    states = torch.randn(2, 5, 3 * 8)
    fine = {"aux_hidden_states": states.to(torch.bfloat16), "input_ids": torch.zeros(2, 5, dtype=torch.long)}
    assert torch.equal(decode_batch(dict(fine), "cpu")["aux_hidden_states"], fine["aux_hidden_states"])
    overflowed = dict(fine, aux_hidden_states=(states * 1e5).to(torch.float16))  # an fp16 store before the check
    with pytest.raises(NonFiniteStatesError, match="aux_hidden_states"):
        decode_batch(overflowed, "cpu")
    states[1, 2, 4] = float("nan")
    encoded = encode(states.flatten(0, 1), 3, "fp8")  # what an fp8 store held before the check
    fp8 = {
        "last_hidden_states": encoded[""].unflatten(0, (2, 5)),
        "last_hidden_states_scales": encoded["_scales"].unflatten(0, (2, 5)),
    }
    with pytest.raises(NonFiniteStatesError, match="last_hidden_states"):
        decode_batch(fp8, "cpu")


# ---------------------------------------------------------------------- online training from servers
def test_online_dataset_stopped_mid_epoch_leaves_no_capture_files(random_target, tmp_path):
    """A DataLoader worker busy with a batch when the iterator is dropped (a run stopped mid-epoch)
    is terminated by PyTorch after 5 s: the files of its captures in flight stay behind unless the
    dataset's close() removes them."""
    from torch.utils.data import DataLoader

    from eagle3.train.dataset import Eagle3Collator, StoreDataset
    from eagle3.train.server_states import ServerSource, ServerStatesDataset

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    chats = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(12, seed=4))
    captures = {"n": 0}

    async def slow_after_the_first_batch(server: FakeVllm, payload: dict) -> None:
        if "probe" not in payload["request_id"] and not (payload.get("kv_transfer_params") or {}):
            captures["n"] += 1
            if captures["n"] > 2:  # files are written at once, answers come 60 s later
                server.write_delay = 60.0

    with FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN) as server:
        ids = tmp_path / "ids"
        assert _run(*_args(random_target, chats, ids, hidden, [server.url], "--no-states")).returncode == 0
        server.hook = slow_after_the_first_batch
        source = ServerSource(
            model=str(random_target),
            server_urls=(server.url,),
            hidden_states_dir=str(hidden),
            layers=(0, 3, 7),
            num_layers=8,
            hidden_size=HIDDEN,
            max_length=2047,
            concurrent_requests=4,
            run_dir=str(tmp_path / "run"),
        )
        base = StoreDataset(HiddenStateStore(ids), states=False, max_length=2047)
        dataset = ServerStatesDataset(base, source, "train", num_workers=1)
        loader = DataLoader(dataset, batch_size=2, num_workers=1, prefetch_factor=2, collate_fn=Eagle3Collator())
        try:
            batches = iter(loader)
            first = next(batches)
            assert first["aux_hidden_states"].shape[-1] == NUM_IDS * HIDDEN
            deadline = time.monotonic() + 60
            while captures["n"] < 4:  # the worker's next batch is in flight
                assert time.monotonic() < deadline
                time.sleep(0.1)
            del batches  # stopped mid-epoch: the busy worker is terminated
            assert any("-c-" in p.name for p in hidden.iterdir())  # its captures' files are there
        finally:
            dataset.close()
    assert not list(hidden.iterdir())


# ---------------------------------------------------------------------- room for the captures in flight
def test_captures_in_flight_are_sized_and_a_small_directory_is_named(tmp_path):
    """Qwen3-1.7B (4 captured states, H=2048), 16 in flight on 2 servers, 2048 tokens: 2 GiB at most;
    a directory without that much room is named with what to change (a directory still to be
    created is judged by its parent)."""
    from eagle3.collect.capture_files import capture_bytes_in_flight, space_note

    assert capture_bytes_in_flight(16, 2, 2048, 4, 2048) == 2 * 2**30
    assert space_note(str(tmp_path / "not-yet" / "created"), 1024) is None
    note = space_note(str(tmp_path), 1 << 60)
    assert note is not None and f"--hidden-states-dir {tmp_path} has" in note and "/dev/shm" in note


# ---------------------------------------------------------------------- a generation server that is not vLLM
def _openai_style(count_offset: int = 0):
    """A hook that answers as an OpenAI-compatible server without vLLM's extensions would: no /tokenize
    (the fake has none: 404), text answers without token ids, and the prompt-token count in ``usage``
    (off by ``count_offset``: another tokenizer)."""

    async def hook(server: FakeVllm, payload: dict):
        from aiohttp import web
        from transformers import AutoTokenizer

        prompt = payload["prompt"]
        if isinstance(prompt, str):  # the start-up check's probe text
            count = len(AutoTokenizer.from_pretrained(server.model)(prompt, add_special_tokens=False)["input_ids"])
            usage = {"prompt_tokens": count + count_offset, "completion_tokens": 1}
            return web.json_response({"choices": [{"text": "x", "finish_reason": "length"}], "usage": usage})
        choice = {"text": "Nine.", "finish_reason": "stop"}
        return web.json_response({"choices": [choice], "usage": {"prompt_tokens": len(prompt), "completion_tokens": 3}})

    return hook


def test_a_generation_server_without_vllm_extensions_is_checked_by_its_prompt_count(random_target, chats, tmp_path):
    """Without /tokenize the tokenizer check falls back to the prompt-token count the server reports
    (another count is refused before any work); text answers are tokenised again, with the end of turn."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    base = ["--model", random_target, "--dataset", chats, "--backend", "vllm", "--no-states", "--quiet",
            "--max-retries", "0", "--enable-thinking", "false"]  # fmt: skip
    with FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN, hook=_openai_style(count_offset=3)) as other:
        refused = _run(*base, "--output-dir", tmp_path / "refused", "--generate-url", other.url)
    assert (
        refused.returncode == 2 and f"generation server {other.url} does not use --model's tokenizer" in refused.stderr
    )
    assert "prompt tokens, ours" in refused.stderr and not list((tmp_path / "refused").glob("shard-*"))
    with FakeVllm(str(random_target), hidden, NUM_IDS, HIDDEN, hook=_openai_style()) as plain:
        result = _run(*base, "--output-dir", tmp_path / "out", "--generate-url", plain.url)
    assert result.returncode == 0, result.stderr[-3000:]
    store = HiddenStateStore(tmp_path / "out")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(random_target)
    answer = tokenizer("Nine.", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert len(store) == 6
    for i in range(6):
        ids, mask = store[i].input_ids.tolist(), store[i].loss_mask.tolist()
        assert [t for t, m in zip(ids, mask, strict=True) if m][-len(answer) :] == answer
