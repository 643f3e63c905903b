"""Model card for a trained draft, and the upload of its folder to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from eagle3.dflash import is_dflash_config
from eagle3.export.serving import sampling_advice, speculative_config_for

LOGIN_HINT = "log in with `huggingface-cli login` (or `hf auth login`), or set HF_TOKEN"

CARD_TEMPLATE = """---
{metadata}
---

# {method_title} draft for {target}

A speculative-decoding draft ({method_title}) for {target_link}, trained with eagle3-qwen3 on the
target's own answers. vLLM serves it unchanged.

## Serve it with vLLM

```python
from vllm import LLM, SamplingParams

llm = LLM(
    model="{target}",
    speculative_config={{
        "model": "{draft}",
        "method": "{method}",
        "num_speculative_tokens": {k},
        "draft_sample_method": "probabilistic",  # above temperature 0: see below
    }},
)
params = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=256)  # Qwen3's recommended sampling
print(llm.generate(["Hello"], params)[0].outputs[0].text)
```

or `vllm serve {target} --speculative-config '{serve_json}'`.

{sampling_advice}

## Draft

| | |
|---|---|
| architecture | `{architecture}` (`model_type: {model_type}`), {num_layers} decoder layer(s), hidden size {hidden} |
| target layers (output of 0-based layer i, as in `--target-layers`) | {layers} |
{draft_rows}

## Training data

{data_rows}

## Evaluation (held-out split, teacher forcing, {steps} drafted positions)

{eval_rows}

`accept_len` counts, per position, the leading draft steps that match the target's greedy
token (the consecutive run), plus one; it is what selected this checkpoint. `accept_len_product`
is the usual 1 + sum_k prod_i acc_i, which overstates what vLLM measures. Measure the real
acceptance in vLLM with `run_eval.py`.
"""


def _table(rows: dict[str, object]) -> str:
    if not rows:
        return "(none recorded)"
    lines = ["| | |", "|---|---|"]
    for key, value in rows.items():
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


def render_model_card(draft_dir: str | Path, info: dict, repo_id: str | None = None) -> str:
    """Card text from the draft's config.json and the training info (eval metrics, data stats)."""
    draft_dir = Path(draft_dir)
    config = json.loads((draft_dir / "config.json").read_text())
    target = config.get("target_model_name_or_path") or "the target model"
    metrics = {k.removeprefix("eval_"): v for k, v in (info.get("metrics") or {}).items()}
    data = info.get("data") or {}
    wanted = ["accept_len", "accept_len_product", "accept_len_k3", "accept_len_product_k3", "loss"]
    wanted += sorted((k for k in metrics if k.startswith("acc_")), key=lambda k: int(k.split("_")[1]))
    eval_rows = {k: metrics[k] for k in wanted if k in metrics}
    steps = sum(1 for k in metrics if k.startswith("acc_"))
    card_data = ModelCardData(
        base_model=target if "/" in str(target) and not Path(str(target)).exists() else None,
        library_name="vllm",
        pipeline_tag="text-generation",
        tags=["dflash" if is_dflash_config(config) else "eagle3", "speculative-decoding", "draft-model", "qwen3"],
        license="apache-2.0",
    )
    serving = speculative_config_for(config, repo_id or f"./{draft_dir.name}")
    dflash = serving["method"] == "dflash"
    if dflash:
        dflash_config = config.get("dflash_config") or {}
        layers = dflash_config.get("target_layer_ids")
        draft_rows = (
            f"| block size (serve with num_speculative_tokens = block size - 1) | {config.get('block_size')} |\n"
            f"| mask token id | {dflash_config.get('mask_token_id')} |\n"
            f"| vocabulary, embedding, lm_head | the target's ({config.get('vocab_size')} tokens, shared by vLLM) |"
        )
    else:
        layers = config.get("target_layers")
        coverage = f"{data['draft_vocab_coverage']:.2%}" if "draft_vocab_coverage" in data else "n/a"
        draft_rows = (
            f"| vLLM aux layer ids (`eagle_aux_hidden_state_layer_ids`, input of layer i) | "
            f"{config.get('eagle_aux_hidden_state_layer_ids')} |\n"
            f"| draft vocabulary | {config.get('draft_vocab_size')} of {config.get('vocab_size')} target tokens "
            f"(covers {coverage} of the training answer tokens) |"
        )
    text = CARD_TEMPLATE.format(
        metadata=card_data.to_yaml(),
        method_title="DFlash" if dflash else "EAGLE-3",
        method=serving["method"],
        k=serving["num_speculative_tokens"],
        serve_json=json.dumps(serving),
        draft_rows=draft_rows,
        target=target,
        # Link Hub ids only; a local folder (absolute, ./ or existing on disk) has no page.
        target_link=f"`{target}`"
        if Path(str(target)).exists() or str(target).startswith((".", "/")) or str(target).count("/") != 1
        else f"[{target}](https://huggingface.co/{target})",
        # Without a Hub id, the folder's own name: never a path of the machine it was trained on.
        draft=repo_id or f"./{draft_dir.name}",
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=config.get("model_type"),
        num_layers=config.get("num_hidden_layers"),
        hidden=config.get("hidden_size"),
        layers=layers,
        data_rows=_table(data),
        eval_rows=_table(eval_rows),
        steps=steps,
        sampling_advice=sampling_advice(config.get("vocab_size"), serving["num_speculative_tokens"]),
    )
    return text


def require_token(token: str | None, flag: str) -> str:
    """The token an upload will use: ``token`` or the one saved by a login / HF_TOKEN.

    Only its presence is checked (no network): a missing login then stops before hours of
    training, not at the upload after them.
    """
    token = token or get_token()
    if not token:
        raise ValueError(f"{flag}: no Hugging Face token found; {LOGIN_HINT} (or pass the token with --hub_token).")
    return token


def check_repo_id(repo_id: str, flag: str) -> None:
    """A Hub repo id (``OWNER/NAME`` or a bare ``NAME``) the Hub will accept, checked locally."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{flag} {repo_id}: not a Hub repo id ({error}); give OWNER/NAME, e.g. you/my-draft."
        ) from None


def resolve_repo_id(hub_model_id: str | None, output_dir: str | Path, token: str | None = None) -> str:
    """The Hub repo the draft goes to, with its owner, as ``Trainer.push_to_hub`` names it.

    ``--hub_model_id OWNER/NAME`` is used as given (no network). A bare name, or none (then the
    output directory's name, like transformers), goes under the logged-in user, asked from the
    Hub with ``whoami``: the card then shows the id users will actually type.
    """
    name = hub_model_id or Path(output_dir).absolute().name
    check_repo_id(name, "--hub_model_id" if hub_model_id else "--push_to_hub: the --output-dir name")
    if "/" in name:
        return name
    try:
        owner = HfApi(token=token).whoami()["name"]
    except Exception as error:  # not logged in, offline, bad token: all mean "cannot name the repo"
        raise ValueError(
            f"--push_to_hub: cannot find your Hub user name to create {name!r} under ({error}). Log in "
            "(hf auth login) or pass --hub_token, or give the full --hub_model_id OWNER/NAME."
        ) from None
    return f"{owner}/{name}"


def write_model_card(draft_dir: str | Path, info: dict, repo_id: str | None = None) -> Path:
    path = Path(draft_dir) / "README.md"
    path.write_text(render_model_card(draft_dir, info, repo_id))
    return path


def upload_files(draft_dir: str | Path) -> list[Path]:
    """Exactly the files vLLM and the Hub page need; never optimizer states or checkpoints."""
    return sorted(
        p
        for p in Path(draft_dir).iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".json") or p.name == "README.md")
    )


def push_draft(
    draft_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = "Upload EAGLE-3 draft",
) -> str:
    """Create the repo if needed and upload the draft folder (weights, config, README.md)."""
    draft_dir = Path(draft_dir)
    if not (draft_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{draft_dir}: no model.safetensors to upload (did training save best_model/?)")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
    files = upload_files(draft_dir)
    commit = api.create_commit(
        repo_id=repo_url.repo_id,
        operations=[CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files],
        commit_message=commit_message or "Upload EAGLE-3 draft",
        revision=revision,
    )
    return str(getattr(commit, "commit_url", commit))
