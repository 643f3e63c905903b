"""run_eval.py: bad input is refused with a clear message before any model is loaded;
the in-process speculative decoder is lossless at temperature 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.cli import new_draft
from eagle3.evaluate.run import EvalInputError, evaluate, parse_args
from eagle3.evaluate.speculative import SpeculativeDecoder
from eagle3.modeling import Eagle3Qwen3ForCausalLM
from eagle3.testing import build_tiny_target, synthetic_conversations, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", synthetic_conversations(3, seed=7))


@pytest.fixture(scope="module")
def fresh_draft(random_target, tmp_path_factory):
    return new_draft(random_target, tmp_path_factory.mktemp("draft") / "draft")


def test_missing_draft(random_target, prompts_file, tmp_path):
    args = parse_args(
        ["--model", str(random_target), "--draft", str(tmp_path / "nope"), "--dataset", str(prompts_file)]
    )
    with pytest.raises(EvalInputError, match="no draft there"):
        evaluate(args)


def test_draft_for_another_target(fresh_draft, prompts_file, tmp_path):
    other = build_tiny_target(tmp_path / "other", num_layers=2, hidden_size=192)
    args = parse_args(["--model", str(other), "--draft", str(fresh_draft), "--dataset", str(prompts_file)])
    with pytest.raises(EvalInputError, match="another target") as error:
        evaluate(args)
    assert "hidden_size" in str(error.value)


def test_empty_prompt_file(random_target, fresh_draft, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = parse_args(["--model", str(random_target), "--draft", str(fresh_draft), "--dataset", str(empty)])
    with pytest.raises(EvalInputError, match="no usable conversations"):
        evaluate(args)


def test_cli_reports_errors_with_exit_code(random_target, prompts_file, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "run_eval.py"),
            "--model",
            str(random_target),
            "--draft",
            str(tmp_path / "missing"),
            "--dataset",
            str(prompts_file),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--draft" in result.stderr and "config.json missing" in result.stderr


def test_hf_report_files(random_target, fresh_draft, prompts_file, tmp_path):
    args = parse_args(
        [
            "--model",
            str(random_target),
            "--draft",
            str(fresh_draft),
            "--dataset",
            str(prompts_file),
            "--max-new-tokens",
            "12",
            "--output",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    report = evaluate(args)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rounds"] == report.rounds > 0
    assert data["acceptance_length"] == pytest.approx(1 + report.accepted_tokens / report.rounds)
    assert data["lossless"] is True
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acceptance length" in report.table()


def test_speculation_is_lossless_when_drafts_are_accepted(random_target, fresh_draft):
    """Make the draft's lm_head put all mass on the target's own greedy continuation by
    overriding compute_logits, so proposals are partly accepted, partly rejected."""
    target = AutoModelForCausalLM.from_pretrained(random_target)
    draft = Eagle3Qwen3ForCausalLM.from_pretrained(fresh_draft)
    draft.load_target_embeddings(target.get_input_embeddings().weight)
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=3)
    prompt = [1, 5, 9, 14, 3]
    reference, _ = decoder.generate_target_only(prompt, 30)
    full = prompt + reference
    calls = {"n": 0}

    def oracle_logits(normed):
        # Propose the true next token except on every 4th call, so rounds mix accepts and rejects.
        calls["n"] += 1
        logits = torch.zeros(normed.shape[0], normed.shape[1], draft.config.draft_vocab_size)
        produced = oracle_logits.position
        next_token = full[produced] if produced < len(full) and calls["n"] % 4 else 0
        logits[..., next_token] = 1.0
        return logits

    original_step = draft.draft_step

    def tracking_step(hidden, embeds, positions, cache):
        # The draft at rope position p predicts the token at index p + 2 of the sequence.
        oracle_logits.position = int(positions[0, -1]) + 2
        return original_step(hidden, embeds, positions, cache)

    draft.compute_logits = oracle_logits
    draft.draft_step = tracking_step
    result = decoder.generate(prompt, 30)
    decoder.close()
    assert result.output_ids == reference
    assert 0 < result.accepted < 3 * result.rounds  # both accepted and rejected proposals happened
    assert result.acceptance_length > 1.5


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decoder_puts_every_input_on_the_models_device(random_target, fresh_draft, temperature):
    """With the default device set to 'meta', any tensor built without the models' device
    lands on meta and the forward fails: on a GPU that is the CPU/CUDA mix-up."""
    target = AutoModelForCausalLM.from_pretrained(random_target)
    draft = Eagle3Qwen3ForCausalLM.from_pretrained(fresh_draft)
    draft.load_target_embeddings(target.get_input_embeddings().weight)
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=3, temperature=temperature)
    reference = decoder.generate([1, 5, 9], 10).output_ids
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=3, temperature=temperature)
    with torch.device("meta"):
        result = decoder.generate([1, 5, 9], 10)
        decoder.generate_target_only([1, 5, 9], 4)
    decoder.close()
    assert result.output_ids == reference


def test_unusable_device_is_refused_before_loading(random_target, fresh_draft, prompts_file):
    args = parse_args(
        ["--model", str(random_target), "--draft", str(fresh_draft), "--dataset", str(prompts_file)]
        + ["--device", "cuda:7" if not torch.cuda.is_available() else "cuda:999"]
    )
    with pytest.raises(EvalInputError, match="--device"):
        evaluate(args)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_runs_each_engine_in_its_own_process(random_target, fresh_draft, prompts_file, tmp_path):
    """run_eval's vLLM path end to end: it never imports vLLM itself (each engine gets a process
    of its own; one engine here to keep CI short), eager on CPU. Sampled as Qwen3 recommends with
    probabilistic drafting: the engine's own speculative config (read back from it) says so."""
    code = (
        "import json, sys\n"
        "from eagle3.evaluate.run import evaluate, parse_args\n"
        "report = evaluate(parse_args(sys.argv[1:]))\n"
        # `eagle3 check` (run before evaluating) imports vLLM's rope to compare it; what must stay out
        # of this process is the engine: vLLM's LLM class
        "print(json.dumps({'vllm_here': 'vllm.entrypoints.llm' in sys.modules, **report.to_dict()}))\n"
    )
    args = ["--model", str(random_target), "--draft", str(fresh_draft), "--dataset", str(prompts_file)]
    args += ["--backend", "vllm", "--num-prompts", "2", "--max-new-tokens", "8", "--no-baseline"]
    args += ["--temperature", "0.6", "--top-p", "0.95", "--top-k", "20", "--draft-sampling", "probabilistic"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["vllm_here"] is False
    assert report["device"] == "cpu" and report["rounds"] > 0 and report["generated_tokens"] > 0
    assert report["speculative_config"]["draft_sample_method"] == "probabilistic"
    assert report["speculative_config"]["method"] == "eagle3"
    assert (report["temperature"], report["top_p"], report["top_k"]) == (0.6, 0.95, 20)
