#!/usr/bin/env bash
# Create (idempotently) the isolated venv for the IST-DASLab GPTQ reference runner (gptqref_gptq.py).
#
#   bash bench/peers/setup_gptqref.sh          # create or reuse
#   FORCE=1 bash bench/peers/setup_gptqref.sh  # wipe and rebuild
#
# The reference (github.com/IST-DASLab/gptq, llama.py + gptq.py + quant.py + modelutils.py) calls each
# decoder layer as `layer(x, attention_mask=..., position_ids=...)[0]`: the layer must compute RoPE itself
# from position_ids and return a tuple. transformers 4.45-4.47 still do both (4.48 made position_embeddings
# mandatory, 4.54 returns a tensor), so the venv gets transformers 4.47.1 (falls back to 4.46.3, 4.45.2).
# The venv lives at <repo>/.venv-gptqref (ignored by git via ".venv-*/").
#
# torch is installed FIRST from the local CPU wheel (torch==2.13.0 -> 2.13.0+cpu) and pinned with a
# constraints file so that no later install can swap it for a CUDA build.
#
# The reference's code itself is NOT installed or vendored here: the runner takes a checkout of it with
# --ref-dir (default /tmp/gptq-ref; e.g. `git --git-dir=<mirror of IST-DASLab/gptq> archive HEAD | tar -x -C
# /tmp/gptq-ref`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv-gptqref}"
PY_BASE="${PYTHON:-python3.11}"
command -v "$PY_BASE" >/dev/null 2>&1 || PY_BASE=python3
TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSIONS=("4.47.1" "4.46.3" "4.45.2")
VPY="$VENV/bin/python"
# shellcheck source=bench/peers/cpu_torch_venv.sh
source "$REPO/bench/peers/cpu_torch_venv.sh"

# The venv "works" when: torch is the CPU build, transformers is 4.45-4.47 and its Llama decoder layer still
# accepts the reference's call (position_ids only, returns a tuple) on a tiny random model.
check_venv() {
    [ -x "$VPY" ] || return 1
    "$VPY" - <<'EOF' 2>/dev/null
import torch, transformers, safetensors  # noqa: F401
assert torch.__version__.endswith("+cpu"), torch.__version__
major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
assert (major, minor) >= (4, 45) and (major, minor) <= (4, 47), transformers.__version__
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
m = LlamaForCausalLM(cfg).eval()
x = torch.randn(1, 8, 16)
with torch.no_grad():
    out = m.model.layers[0](x, attention_mask=None, position_ids=torch.arange(8)[None])
assert isinstance(out, tuple) and out[0].shape == (1, 8, 16)
EOF
}

report() {
    echo "== venv: $VENV"
    "$VPY" - <<'EOF'
import importlib.metadata as md
for name in ["torch", "transformers", "tokenizers", "safetensors", "numpy", "huggingface-hub"]:
    try:
        print(f"  {name:20s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:20s} (not installed)")
import torch
print("  torch build:", torch.__version__, "cuda:", torch.version.cuda)
EOF
}

if [ "${FORCE:-0}" != "1" ] && check_venv; then
    echo "gptq reference venv already works; nothing to do."
    report
    exit 0
fi

# 1-2. torch first (the CPU build from the local wheel), pinned for everything that follows.
cpu_torch_venv

# 3. An old transformers the reference's llama.py runs with, plus safetensors.
installed=""
for v in "${TRANSFORMERS_VERSIONS[@]}"; do
    if "${PIP[@]}" -c "$CONSTRAINTS" "transformers==$v" safetensors && check_venv; then
        installed="$v"
        break
    fi
    echo "transformers==$v failed to install or to pass the check; trying the next version" >&2
done
[ -n "$installed" ] || { echo "ERROR: no transformers 4.45-4.47 works here" >&2; exit 1; }

assert_cpu_torch  # not replaced by a CUDA build
echo "gptq reference venv ready (transformers==$installed)."
report
