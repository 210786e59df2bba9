"""Content-addressed identities (run ids, quantized-model keys) and provenance."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..memory import physical_memory

if TYPE_CHECKING:  # annotations only: importing the store stays light (no pydantic, no torch)
    from ..schema import RunConfig

_PACKAGES = ("ptqlab", "torch", "transformers", "safetensors", "gguf", "accelerate", "numpy", "pydantic")
_NOT_IDENTITY = ("model", "device", "trust_remote_code", "runtime", "export")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_ADDED_KEYS: tuple[tuple[str, str, Any], ...] = (
    ("scheme", "outliers", None),
    ("evaluate", "dialogue", None),
    ("evaluate", "judge", None),
    ("calibration", "layer_errors", False),
    ("evaluate", "speed", None),
    ("scheme", "embedding", None),
)
"""Keys added after stores of runs existed, with their defaults: left out of a config at their default, so
configs written before them keep their run ids and weights keys (a new key left at its default changes no
number)."""


def normalized(cfg: RunConfig) -> dict[str, Any]:
    """The configuration with every default filled in, as plain JSON data (but :data:`_ADDED_KEYS` at default)."""
    data = cfg.model_dump(mode="json")
    for section, key, default in _ADDED_KEYS:
        part = data.get(section)
        if isinstance(part, dict) and key in part and part[key] == default:
            del part[key]
    return data


def run_id(cfg: RunConfig, fingerprint: str) -> str:
    """Hash of the normalized config with the model's fingerprint in place of its path (16 hex)."""
    data = {k: v for k, v in normalized(cfg).items() if k not in _NOT_IDENTITY}
    return _digest({"config": data, "model": fingerprint})[:16]


def qmodel_key(cfg: RunConfig, fingerprint: str) -> str:
    """Key of the quantized model alone (model, dtype, scheme, recipe, calibration): evaluations reuse it."""
    data = normalized(cfg)
    keep = {k: data[k] for k in ("dtype", "scheme", "recipe", "calibration")}
    return _digest({"q": keep, "model": fingerprint})[:16]


def weights_key(cfg: RunConfig, fingerprint: str, foreign: str = "") -> str:
    """Key of the quantized weights alone: what decides them (activation and KV settings do not).

    The weights are quantized before any activation or KV quantizer is installed, so runs that differ only
    in those (W4 and W4A8 with the same recipe and calibration) share them. The key also holds
    :func:`code_fingerprint`: kept weights that an older version of the code quantized are not reused;
    ``foreign`` is the fingerprint of the recipe's methods registered from outside ptqlab
    (:func:`ptqlab.methods.recipe.foreign_source`), which the package's own fingerprint does not cover.
    """
    scheme = cfg.scheme
    overrides = [(o.match, o.weight if o.sets("weight") else "unset") for o in scheme.overrides]
    weight = None if scheme.weight is None else scheme.weight.model_dump(mode="json")
    data = normalized(cfg)
    keep = {"dtype": data["dtype"], "weight": weight, "overrides": overrides, "recipe": data["recipe"],
            "calibration": data["calibration"]}
    if scheme.outliers is not None:  # the FP16 columns change the weights (keys without it stay as they were)
        keep["outliers"] = scheme.outliers.model_dump(mode="json")
    if scheme.embedding is not None:  # the embedding's grid is part of the weights too
        keep["embedding"] = scheme.embedding.model_dump(mode="json")
    code = code_fingerprint() if not foreign else f"{code_fingerprint()}+{foreign}"
    return _digest({"w": keep, "model": fingerprint, "code": code})[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of ptqlab's own source files (path and bytes of every ``.py`` file of the package), 16 hex."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers, plus Python's."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
"""The x86 instruction-set extensions that choose a kernel in torch's and llama.cpp's CPU backends."""


def _cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """The CPU's model name and its flags among :data:`_ISA_FLAGS` from ``/proc/cpuinfo``'s text."""
    name: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, [f for f in _ISA_FLAGS if f in flags]


@functools.lru_cache(maxsize=1)
def machine_info() -> dict[str, object]:
    """The machine a run is computed on: CPU model, instruction-set extensions, cores, memory, OS.

    Float results (GPTQ's rounding decisions above all) and every timing depend on it, so a run records it
    with its package versions. Fields that cannot be read on this platform are left out.
    """
    out: dict[str, object] = {"system": platform.system(), "arch": platform.machine(),
                              "cores": os.cpu_count()}
    try:
        name, isa = _cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        name, isa = platform.processor() or None, []
    if name:
        out["cpu"] = name
    if isa:
        out["isa"] = isa
    with contextlib.suppress(ValueError, OSError, AttributeError):  # no sysconf names on this platform
        out["memory_bytes"] = physical_memory()
    return out


def git_revision() -> str | None:
    """The git revision of the ptqlab source tree (``-dirty`` when modified), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")
