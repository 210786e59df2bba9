"""The bits per weight a model's source file stores its weights at: what its FP reference really is.

A model loaded from a GGUF file is its dequantized GGUF: the "FP" model a run is measured against already
carries the file's own quantization (SmolLM2-135M at Q4_1, Qwen2.5-Coder-1.5B at Q4_K_M). The run records the
file's bits per weight over the decoder layers' linear weights (the weights ``bits.weight`` counts), so a
report can say that a 4-bit scheme on a model stored at ~4.9 bits is not the seed papers' FP16 setting.

Only the GGUF header is read (tensor names, shapes and types; block sizes from ``gguf``'s table), not the
tensor data: a fraction of a second, once per file per process (gguf-py's ``GGUFReader`` agrees, tested, but
parses every metadata array, the vocabulary included: 2.5 to 8.5 s on the three aliases' files against 0.04 to
0.14 s here, measured on a busy 2-core machine).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import PtqlabError
from ..metrics import BITS_SOURCE, Metric
from .loading import source_gguf

__all__ = ["GGUFBits", "gguf_bits", "model_source_metrics", "source_metrics"]

log = logging.getLogger(__name__)

_MAGIC = b"GGUF"
# GGUF metadata value types: fixed sizes of the scalar ones; 8 = string, 9 = array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_LINEAR_PREFIX = "blk."


@dataclass(frozen=True)
class GGUFBits:
    """Bits per weight of a GGUF file: over the decoder layers' linear weights, and over every tensor.

    Attributes:
        linear: Bits per weight of the 2-D ``blk.*`` weights (the decoder linears), or None when there are none.
        overall: Bits per element over every tensor of the file.
        types: ``{type name: tensor count}`` of the decoder linears.

    """

    linear: float | None
    overall: float
    types: dict[str, int] = field(default_factory=dict)


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", f.read(4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", f.read(8))[0])


def _string(f: BinaryIO) -> bytes:
    return f.read(_u64(f))


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind in _SCALAR:
        f.seek(_SCALAR[kind], 1)
    elif kind == _STRING:
        f.seek(_u64(f), 1)
    elif kind == _ARRAY:
        item, count = _u32(f), _u64(f)
        if item in _SCALAR:
            f.seek(_SCALAR[item] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise ValueError(f"unknown GGUF metadata type {kind}")


_CACHE: dict[tuple[str, int, int], GGUFBits] = {}


def gguf_bits(path: Path) -> GGUFBits:
    """The bits per weight of the GGUF file ``path``, from its header (cached per file, size and mtime).

    Raises:
        ValueError: Not a GGUF file (version 2 or 3), or a tensor type ``gguf`` does not know.

    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    linear_bits = linear_n = all_bits = all_n = 0
    types: dict[str, int] = {}
    with path.open("rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        version = _u32(f)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not read here (2 or 3)")
        tensors, kvs = _u64(f), _u64(f)
        for _ in range(kvs):
            _string(f)
            _skip_value(f, _u32(f))
        for _ in range(tensors):
            name = _string(f).decode("utf-8", "replace")
            dims = [_u64(f) for _ in range(_u32(f))]
            kind = GGMLQuantizationType(_u32(f))
            _u64(f)  # offset
            block, size = GGML_QUANT_SIZES[kind]
            n = 1
            for d in dims:
                n *= d
            bits = n // block * size * 8
            all_bits, all_n = all_bits + bits, all_n + n
            if name.startswith(_LINEAR_PREFIX) and name.endswith(".weight") and len(dims) == 2:
                linear_bits, linear_n = linear_bits + bits, linear_n + n
                types[kind.name] = types.get(kind.name, 0) + 1
    found = GGUFBits(linear_bits / linear_n if linear_n else None, all_bits / all_n if all_n else 0.0, types)
    _CACHE[key] = found
    return found


def source_metrics(gguf: Path | None) -> list[Metric]:
    """``[bits.source]`` of a model read from the GGUF file ``gguf``; nothing for another source or an unreadable file.

    Never raises: the source's bits describe the run's reference, they are not needed to finish it.
    """
    if gguf is None:
        return []
    try:
        bits = gguf_bits(gguf).linear
    except (OSError, ValueError, KeyError, struct.error) as exc:
        log.warning("could not read the bits per weight of %s: %s", gguf, exc)
        return []
    return [] if bits is None else [Metric(BITS_SOURCE, bits)]


def model_source_metrics(spec: str) -> list[Metric]:
    """:func:`source_metrics` of the model ``spec`` names (an alias, a path or a hub id); never raises."""
    try:
        path = source_gguf(spec)
    except PtqlabError as exc:
        log.warning("could not find the source file of %s: %s", spec, exc)
        return []
    return source_metrics(path)
