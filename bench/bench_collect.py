"""Benchmarks of the collection.

1. Bytes per stored token against the floor (n_aux + 1) * H * 2 + 4 (int32 id) + 1 (mask):
   a real ``run_collect.py`` run (bf16, hf backend), read back from manifest.json.
2. hf backend capture throughput against a bare forward of the base model over the SAME
   padded batches in the same process, interleaved and repeated (median), so CPU noise from
   other processes hits both sides alike. Aim: capture >= 0.85 of the bare forward.
3. ``--vllm``: the vLLM backend against vLLM itself. Two real servers of the same target run
   side by side: ours (the ``--print-server-command`` command: ``extract_hidden_states`` + our
   connector) and a plain one (same flags, no extraction). Per concurrency (requests in flight
   per server), rounds alternate between the two on fresh data, median over rounds:
   (a) capture: our client (``VllmBackend`` with --no-regenerate: request, file read, split)
       tokens/s vs the plain server's prefill (the same token ids, max_tokens=1) tokens/s;
   (b) regeneration: our client's generation requests (no save) vs the same requests on the
       plain server, generated tokens/s.
   ``--samples`` caps what is in flight: keep it >= the largest ``--concurrency``.

    python bench/bench_collect.py [--model PATH] [--hidden-size 512] [--samples 64] [--batch-size 8]
    python bench/bench_collect.py --vllm [--model PATH] [--hidden-size 512] [--samples 64] \
        [--concurrency 4,16,64] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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


def _without_flags(command: list[str], flags: tuple[str, ...]) -> list[str]:
    """``command`` without ``flags`` and the value after each."""
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


def vllm_vs_vllm(
    model: str, samples: int, concurrencies: list[int], repeats: int, max_new_tokens: int, server_args: str
) -> list[dict]:
    from eagle3.collect.args import parse_args
    from eagle3.collect.loop import resolve_layers
    from eagle3.collect.vllm_client import VllmBackend, server_command_for
    from eagle3.data.sources import Conversation
    from eagle3.testing import free_port, vllm_server

    config = load_target_config(model)
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(model))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--model", model, "--output-dir", f"{tmp}/out", "--hidden-states-dir", f"{tmp}/hidden", "--quiet"]
        base += ["--max-length", str(min(4096, config.max_position_embeddings - 1))]
        ours_command = server_command_for(
            parse_args([*base, "--print-server-command", "--host", "127.0.0.1", "--port", str(free_port()),
                        f"--server-args={server_args}"])
        )  # fmt: skip
        plain_command = _without_flags(ours_command, ("--speculative-config", "--kv-transfer-config", "--port"))
        plain_command += ["--port", str(free_port())]
        layers = resolve_layers(parse_args([*base, "--print-server-command"]), config.num_hidden_layers)
        with (
            vllm_server(ours_command, f"{tmp}/ours.log", timeout=900) as ours,
            vllm_server(plain_command, f"{tmp}/plain.log", timeout=900) as plain,
        ):
            name = model  # what both servers serve it as
            for concurrency in concurrencies:
                args = parse_args(
                    [*base, "--dataset", "unused", "--backend", "vllm", "--server-url", ours["url"], "--no-regenerate",
                     "--concurrent-requests", str(concurrency), "--max-new-tokens", str(max_new_tokens)]
                )  # fmt: skip
                backend = VllmBackend(args, renderer, layers, config.num_hidden_layers, config.hidden_size)
                try:
                    rows = [
                        _one_round(backend, plain["url"], name, renderer, concurrency, max_new_tokens,
                                   synthetic_conversations(samples, seed=10_000 * concurrency + r, turns=2), Conversation,
                                   flip=r % 2 == 1)
                        for r in range(repeats)
                    ]  # fmt: skip
                finally:
                    backend.close()
                results.append(
                    {"concurrency": concurrency} | {k: statistics.median(row[k] for row in rows) for k in rows[0]}
                )
    return results


def _one_round(backend, plain_url, name, renderer, concurrency, max_new_tokens, rows, conversation_cls, flip) -> dict:
    """One round on fresh data; ``flip``: our side first (rounds alternate who goes first)."""
    import asyncio

    def timed(run) -> tuple[float, object]:
        start = time.perf_counter()
        result = run()
        return time.perf_counter() - start, result

    def both(plain_run, ours_run):
        if flip:
            ours = timed(ours_run)
            return timed(plain_run), ours
        plain = timed(plain_run)
        return plain, timed(ours_run)

    conversations = [conversation_cls(key, row["messages"], f"bench[{key}]") for key, row in enumerate(rows)]
    # (a) capture: our client end to end vs the plain server's prefill of the same ids
    sequences = [renderer.render(c.messages).input_ids for c in conversations]
    tokens = sum(len(s) for s in sequences)
    payloads = [{"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0} for ids in sequences]
    (plain_s, _), (ours_s, stored) = both(
        lambda: _post_all(plain_url, payloads, concurrency),
        lambda: [s for s in backend.samples(conversations) if s is not None],
    )
    assert sum(len(s.input_ids) for s in stored) == tokens
    # (b) regeneration: our generation requests (no save) vs the same requests on the plain server
    prompts = [renderer.prompt_ids(c.messages[:1]) for c in conversations]

    async def generate_all() -> list:
        return await asyncio.gather(
            *(backend._generate(p, c.key, 0, None) for p, c in zip(prompts, conversations, strict=True))
        )

    payloads = [
        {"model": name, "prompt": p, "max_tokens": max_new_tokens, "temperature": 0.0, "seed": 0,
         "stop_token_ids": sorted(backend.stop_ids)}
        for p in prompts
    ]  # fmt: skip
    (plain_gen_s, (_, plain_answers)), (ours_gen_s, answers) = both(
        lambda: _post_all(plain_url, payloads, concurrency),
        lambda: backend.loop.run_until_complete(generate_all()),
    )
    ours_gen_tokens = sum(len(ids) for _, ids in answers)
    plain_gen_tokens = sum(a["usage"]["completion_tokens"] for a in plain_answers)
    return {
        "prefill_tok_s": tokens / plain_s,
        "capture_tok_s": tokens / ours_s,
        "capture_ratio": plain_s / ours_s,
        "plain_gen_tok_s": plain_gen_tokens / plain_gen_s,
        "ours_gen_tok_s": ours_gen_tokens / ours_gen_s,
        "gen_ratio": (ours_gen_tokens / ours_gen_s) / (plain_gen_tokens / plain_gen_s),
    }


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
    parser.add_argument("--concurrency", default="4,16,64", help="--vllm: requests in flight per server, to compare")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="--vllm: tokens per regeneration request")
    parser.add_argument(
        "--server-args", default="", help="--vllm: extra flags for BOTH servers, e.g. '--enforce-eager'"
    )
    args = parser.parse_args()
    sizes = {} if args.hidden_size == 128 else {"hidden_size": args.hidden_size}  # 128: the tests' cached target
    model = args.model or str(tiny_target(trained=False, **sizes))
    if args.vllm:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        rows = vllm_vs_vllm(model, args.samples, concurrencies, args.repeats, args.max_new_tokens, args.server_args)
        print(f"model {model}; {args.samples} conversations per round, median of {args.repeats} rounds")
        print("in flight | capture tok/s | plain prefill tok/s | ratio | regen tok/s ours | plain | ratio")
        for r in rows:
            print(
                f"{r['concurrency']:9d} | {r['capture_tok_s']:13.0f} | {r['prefill_tok_s']:19.0f} | "
                f"{r['capture_ratio']:5.2f} | {r['ours_gen_tok_s']:16.0f} | {r['plain_gen_tok_s']:5.0f} | "
                f"{r['gen_ratio']:5.2f}"
            )
        return
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
