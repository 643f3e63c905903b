"""Run the target in vLLM with and without an EAGLE-3 draft and read vLLM's own counters.

Used by ``run_eval.py --backend vllm``, the tests and the demo. vLLM spawns worker processes,
so callers that are not a ``__main__`` script (pytest, the demo) run this module as a
subprocess: ``python -m eagle3.evaluate.vllm_bench --model T --draft D --prompts P --json OUT``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eagle3.export.serving import DRAFT_SAMPLE_METHODS, speculative_config_of


@dataclass
class VllmRun:
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float
    generated_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    device: str = ""  # vLLM's platform (cpu, cuda, ...)
    # what the engine ran with, read back from it: the speculative config's method, k and
    # draft_sample_method (None for target-only), and the sampling parameters
    speculative_config: dict | None = None
    sampling: dict = field(default_factory=dict)
    enforce_eager: bool = True
    pid: int = 0  # the process the engine ran in

    @property
    def acceptance_length(self) -> float | None:
        """Mean tokens per target step: 1 + accepted / drafts (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_length": self.acceptance_length,
            "tokens_per_second": self.tokens_per_second,
        }


def _spec_decode_counters(metrics) -> dict:
    counters = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_position": []}
    for metric in metrics:
        name = metric.name.removeprefix("vllm:spec_decode_")
        if name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            counters[name] += int(metric.value)
        elif name == "num_accepted_tokens_per_pos":
            counters["accepted_per_position"] = [int(v) for v in metric.values]
    return counters


def _is_hybrid(model: str) -> bool:
    from eagle3.target import load_target_config, target_family

    return target_family(load_target_config(model)).hybrid


def _engine_speculative_config(llm) -> dict | None:
    """The speculative settings the engine actually runs with (not the dict we passed it): a
    field vLLM dropped or renamed shows up here, not as a silently lower acceptance."""
    config = llm.llm_engine.vllm_config.speculative_config
    if config is None:
        return None
    fields = ("method", "num_speculative_tokens", "draft_sample_method", "rejection_sample_method")
    return {name: getattr(config, name, None) for name in fields}


def run_vllm(
    model: str,
    prompts: list[str] | list[list[int]],
    draft: str | None = None,
    num_speculative_tokens: int = 3,
    max_tokens: int = 64,
    temperature: float = 0.0,
    max_model_len: int = 1024,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool | None = None,
    dtype: str = "auto",
    draft_sample_method: str = "greedy",
    top_p: float = 1.0,
    top_k: int = 0,
) -> VllmRun:
    """Generate for ``prompts`` (text or token ids) with vLLM, optionally speculating with ``draft``.

    ``enforce_eager=None``: eager on CPU only; on a GPU vLLM captures CUDA graphs as it does
    when serving, so the measured speed is the served speed. ``draft_sample_method`` is vLLM's
    ``speculative_config.draft_sample_method`` (greedy or probabilistic; they differ above
    temperature 0); ``top_k=0`` is vLLM's "off".
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    if enforce_eager is None:
        enforce_eager = current_platform.is_cpu()

    speculative_config = None
    extra: dict = {}
    if draft is not None:
        speculative_config = speculative_config_of(draft) | {  # method from the draft's config.json
            "num_speculative_tokens": num_speculative_tokens,
            "draft_sample_method": draft_sample_method,
        }
        if current_platform.is_cpu():
            # vLLM's CPU rejection sampler divides the target logits by uninitialised memory
            # instead of the temperature (see vllm_cpu_fix); the extension class patches it in
            # the worker processes, where sampling runs.
            from eagle3.evaluate import vllm_cpu_fix

            extra["worker_extension_cls"] = f"{vllm_cpu_fix.__name__}.{vllm_cpu_fix.CpuRejectionSamplerFix.__name__}"
    if _is_hybrid(model):
        # vLLM 0.32 turns prefix caching on for hybrid (linear-attention) models in its "align"
        # mode, whose state copies are a Triton kernel (none on CPU). Prefix caching does not
        # change what is generated or accepted, so measure without it.
        extra["enable_prefix_caching"] = False
    llm = LLM(
        model=model,
        speculative_config=speculative_config,
        **extra,
        max_model_len=max_model_len,
        disable_log_stats=False,
        seed=seed,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype,
    )
    # One seed per prompt: with a shared seed every request draws the same random numbers, so
    # similar prompts make the same keep/reject decisions and the sample is effectively smaller.
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    params = [SamplingParams(**sampling, max_tokens=max_tokens, seed=seed + i) for i in range(len(prompts))]
    if prompts and not isinstance(prompts[0], str):
        inputs = [{"prompt_token_ids": ids} for ids in prompts]
    else:
        inputs = prompts
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    token_ids = [list(out.outputs[0].token_ids) for out in outputs]
    run = VllmRun(
        texts=[out.outputs[0].text for out in outputs],
        token_ids=token_ids,
        seconds=seconds,
        generated_tokens=sum(len(ids) for ids in token_ids),
        **(_spec_decode_counters(llm.get_metrics()) if draft is not None else {}),
        device=str(current_platform.device_type),
        speculative_config=_engine_speculative_config(llm),
        sampling=sampling,
        enforce_eager=enforce_eager,
        pid=os.getpid(),
    )
    del llm
    gc.collect()
    return run


def run_vllm_in_subprocess(model: str, prompts: list[str] | list[list[int]], **kwargs) -> VllmRun:
    """``run_vllm`` in a fresh process (this module's command line): one engine per process."""
    with tempfile.TemporaryDirectory(prefix="eagle3-vllm-") as workdir:
        prompts_path, out_path = Path(workdir) / "prompts.json", Path(workdir) / "run.json"
        prompts_path.write_text(json.dumps(prompts))
        command = [sys.executable, "-m", "eagle3.evaluate.vllm_bench", "--model", str(model), "--single"]
        command += ["--prompts", str(prompts_path), "--json", str(out_path)]
        draft = kwargs.pop("draft", None)
        if draft is not None:
            command += ["--draft", str(draft)]
        flags = {"max_tokens": "--max-tokens", "max_model_len": "--max-model-len"}
        for key, value in kwargs.items():
            if value is None:
                continue
            flag = flags.get(key, "--" + key.replace("_", "-"))
            if isinstance(value, bool):
                command.append(flag if value else "--no-" + flag[2:])
            else:
                command += [flag, str(value)]
        result = subprocess.run(command)  # vLLM's log goes to the user's terminal
        if result.returncode != 0 or not out_path.exists():
            engine = "speculative" if draft is not None else "target-only"
            raise RuntimeError(f"the {engine} vLLM engine failed (exit {result.returncode}); its log is above")
        data = json.loads(out_path.read_text())
    data.pop("acceptance_length", None)
    data.pop("tokens_per_second", None)
    return VllmRun(**data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="target model (folder or hub id)")
    parser.add_argument(
        "--draft", action="append", default=[], help="EAGLE-3 draft folder (repeatable); leave out for target-only"
    )
    parser.add_argument("--baseline", action="store_true", help="also run target-only and compare outputs")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of strings or of token-id lists")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off (vLLM's convention)")
    parser.add_argument(
        "--draft-sample-method",
        default="greedy",
        choices=DRAFT_SAMPLE_METHODS,
        help="vLLM's speculative_config.draft_sample_method (matters above temperature 0)",
    )
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--dtype", default="auto", help="vLLM's dtype (auto: the checkpoint's, bf16 for fp32 on CPU)")
    parser.add_argument("--single", action="store_true", help="one engine; write its run as the JSON (no nesting)")
    parser.add_argument("--json", required=True, help="where to write the results")
    args = parser.parse_args(argv)
    with open(args.prompts) as handle:
        prompts = json.load(handle)
    common = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_model_len=args.max_model_len,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        dtype=args.dtype,
    )
    if args.single:
        draft = args.draft[0] if args.draft else None
        run = run_vllm(
            args.model,
            prompts,
            draft=draft,
            num_speculative_tokens=args.num_speculative_tokens,
            draft_sample_method=args.draft_sample_method,
            **common,
        )
        with open(args.json, "w") as handle:
            json.dump(run.to_dict(), handle, indent=1)
        return
    results: dict = {}
    if args.baseline or not args.draft:
        results["baseline"] = run_vllm(args.model, prompts, **common).to_dict()
    results["drafts"] = {
        draft: run_vllm(
            args.model,
            prompts,
            draft=draft,
            num_speculative_tokens=args.num_speculative_tokens,
            draft_sample_method=args.draft_sample_method,
            **common,
        ).to_dict()
        for draft in args.draft
    }
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
