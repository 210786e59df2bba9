#!/usr/bin/env bash
# Shared by the peers' venv scripts (setup_llmcompressor.sh, setup_gptqref.sh): sourced, not run.
#
# cpu_torch_venv: (re)create the venv $VENV (with FORCE=1, or when it has no python) and install torch
# $TORCH_VERSION FIRST, from the local CPU wheel, then pin it in $CONSTRAINTS so that no later install can
# swap it for a CUDA build (GBs of nvidia-* wheels). Sets PIP (the venv's pip install command) and
# CONSTRAINTS. Needs VENV, VPY, PY_BASE and TORCH_VERSION.
# assert_cpu_torch: fail when torch in the venv is not (or no longer) the +cpu build.

assert_cpu_torch() {
    "$VPY" -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') else 1)" \
        || { echo "ERROR: torch in $VENV is not a +cpu build" >&2; exit 1; }
}

cpu_torch_venv() {
    if [ "${FORCE:-0}" = "1" ] || [ ! -x "$VPY" ]; then
        rm -rf "$VENV"
        "$PY_BASE" -m venv "$VENV"
    fi
    PIP=("$VPY" -m pip install --disable-pip-version-check)
    "${PIP[@]}" -q --upgrade pip setuptools wheel
    "${PIP[@]}" "torch==$TORCH_VERSION"
    assert_cpu_torch
    CONSTRAINTS="$VENV/constraints.txt"
    echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
}
