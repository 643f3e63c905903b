"""The vLLM server commands of collection: the extraction server (``extract_hidden_states`` + our
connector, ``--print-server-command``) and a plain generation server (``--print-server-command
generate``), with the length both serve. The connector (inside the server) takes ``SKIP_SAVE``
from here, not from the client; nothing here imports vLLM.
"""

from __future__ import annotations

import shlex
import sys

from eagle3.collect.args import CollectArgs
from eagle3.collect.generation_servers import launcher, plain_server_command
from eagle3.config import to_vllm_layer_ids

# Loaded inside the server by module path (this module must not import vLLM: the client may
# run where only the server's files are visible, without vLLM installed).
CONNECTOR_MODULE = "eagle3.collect.vllm_connector"
CONNECTOR_CLASS = "Eagle3HiddenStatesConnector"
SKIP_SAVE = "eagle3_skip_save"  # kv_transfer_params flag: the connector saves nothing for this request


def capture_layer_ids(layers: list[int], num_layers: int) -> list[int]:
    """vLLM ids the server must capture: the aux layers plus L (the last hidden state)."""
    return sorted(set(to_vllm_layer_ids(layers)) | {num_layers})


def server_command(
    model: str,
    layer_ids: list[int],
    storage_path: str,
    port: int = 8000,
    host: str | None = None,
    extra_args: str = "",
    max_model_len: int | None = None,
    hybrid: bool = False,
) -> list[str]:
    """The exact vLLM server command for collecting these layer ids (``extra_args``: more vLLM flags,
    a ``--max-model-len`` there wins over ``max_model_len``).

    ``hybrid`` (Qwen3-Next / Qwen3.5: linear-attention layers): vLLM 0.32 turns prefix caching on
    for these in its "align" mode, which requires chunked prefill (and a Triton kernel); captures
    need neither (each request is prefilled whole, once), so prefix caching is switched off."""
    import json
    import shlex

    speculative = {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": layer_ids}},
    }
    transfer = {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": storage_path},
    }
    extra = shlex.split(extra_args)
    command = launcher(model) + ["--port", str(port)]
    if host:
        command += ["--host", host]
    if max_model_len is not None and not any(a.split("=")[0] == "--max-model-len" for a in extra):
        command += ["--max-model-len", str(max_model_len)]
    if hybrid:
        command.append("--no-enable-prefix-caching")
    return command + [
        "--no-enable-chunked-prefill",
        "--speculative-config",
        json.dumps(speculative, separators=(",", ":")),
        "--kv-transfer-config",
        json.dumps(transfer, separators=(",", ":")),
        *extra,
    ]


def served_max_length(max_length: int, config) -> int:
    """--max-length capped so that a capture (max_length + 1 tokens) fits the target's positions,
    which is the most a vLLM server serves: the printed server and the client then agree."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length + 1 > positions:
        print(
            f"run_collect.py: --max-length {max_length} capped at {positions - 1}: the target has "
            f"{positions} positions and a capture needs max_length + 1 of them.",
            file=sys.stderr,
        )
        return positions - 1
    return max_length


def server_command_for(args: CollectArgs, port: int | None = None) -> list[str]:
    """The extraction server's command (``--print-server-command``)."""
    from eagle3.collect.loop import resolve_layers
    from eagle3.target import load_target_config, target_family

    config = load_target_config(args.model)
    layers = resolve_layers(args, config.num_hidden_layers)
    ids = capture_layer_ids(layers, config.num_hidden_layers)
    return server_command(
        args.model,
        ids,
        args.hidden_states_dir,
        port=args.port if port is None else port,
        host=args.host,
        extra_args=args.server_args,
        max_model_len=served_max_length(args.max_length, config) + 1,
        hybrid=target_family(config).hybrid,
    )


def generate_command_for(args: CollectArgs, port: int | None = None) -> list[str]:
    """A plain generation server's command (``--print-server-command generate``): room for
    --max-length tokens (as capped for the extraction server, so the two always agree)."""
    from eagle3.target import load_target_config

    return plain_server_command(
        args.model,
        port=args.port if port is None else port,
        host=args.host,
        extra_args=args.server_args,
        max_model_len=served_max_length(args.max_length, load_target_config(args.model)),
        served_name=args.generate_model,
    )


def printed_server_commands(args: CollectArgs) -> str:
    """What ``--print-server-command`` prints: one command as one line (``SERVE=$(...)`` scripts eval
    it), or both, each under a ``#`` line naming it, the generation server on --port + 1."""
    which = args.print_server_command
    if which == "auto":
        which = "both" if args.generate_url else "extract"
    if which == "extract":
        return shlex.join(server_command_for(args))
    if which == "generate":
        return shlex.join(generate_command_for(args))
    return (
        f"# extraction server (capture: --server-url http://HOST:{args.port})\n"
        f"{shlex.join(server_command_for(args))}\n"
        f"# generation server (regeneration: --generate-url http://HOST:{args.port + 1})\n"
        f"{shlex.join(generate_command_for(args, port=args.port + 1))}"
    )
