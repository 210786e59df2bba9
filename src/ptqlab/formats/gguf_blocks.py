"""llama.cpp's block layouts: a run's codes and FP16 block parameters packed into GGUF tensor bytes.

Each function takes a linear's integer codes (rows, cols) and its per-block parameters and returns the
tensor's bytes as uint8 (rows, bytes per row), blocks in column order, the layout gguf-py's dequantizers
(and llama.cpp's) read:

- Q8_0: ``d`` (FP16) then 32 int8 values ``q - 128``.
- Q4_0 / Q4_1: ``d`` (and ``m`` for Q4_1), then 16 bytes: byte ``k`` holds element ``k`` in its low nibble
  and element ``k + 16`` in its high nibble.
- Q5_0 / Q5_1: ``d`` (and ``m``), 4 bytes of the elements' fifth bits (element ``i`` at bit ``i``, little
  endian), then the low nibbles as in Q4_0.
- Q4_K: per super-block of 256, ``d`` and ``dmin`` (FP16), 12 bytes of 6-bit scales and minimums (bytes
  0-3: ``sc[j]`` with the top two bits of ``sc[j+4]`` above; 4-7: the same for the minimums; 8-11: the low
  nibbles of ``sc[j+4]`` and ``mn[j+4]``), then 4 runs of 32 bytes, run ``c`` holding block ``2c`` in the
  low nibbles and block ``2c + 1`` in the high nibbles.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant.gguf import BLOCK, SUPER_BLOCK, k_superblock_factors


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """(rows, blocks) float32 values that are FP16-exact, as (rows, blocks, 2) little-endian bytes."""
    return x.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _blocks(codes: torch.Tensor) -> np.ndarray:
    """Codes (rows, cols) as uint8 (rows, blocks, 32)."""
    rows, cols = codes.shape
    return codes.to(torch.uint8).numpy().reshape(rows, cols // BLOCK, BLOCK)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) values below 16 as (..., 16) bytes: element k low, element k + 16 high."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """(..., 32) 5-bit values: their fifth bits as (..., 4) bytes, element i at bit i."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _rows(*parts: np.ndarray) -> np.ndarray:
    """Concatenate per-block byte parts and flatten each row."""
    out = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(out.reshape(out.shape[0], -1))


def pack(ggml: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """The bytes of one tensor in block type ``ggml``.

    Args:
        ggml: ``Q8_0``, ``Q4_0``, ``Q5_0``, ``Q4_1``, ``Q5_1`` or ``Q4_K``.
        codes: Integer codes (rows, cols) in the type's range.
        scale: Per-block steps (rows, cols / 32), FP16-exact (Q4_K: FP16 factor times 6-bit integer).
        zero: Per-block zero points (symmetric types) or offsets (rows, cols / 32).

    Returns:
        uint8 (rows, bytes per row).

    Raises:
        ValueError: Q4_K steps or offsets that are not an FP16 factor times 6-bit integers.

    """
    q = _blocks(codes)
    d = _fp16_bytes(scale)
    if ggml == "Q8_0":
        return _rows(d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    if ggml == "Q4_0":
        return _rows(d, _nibbles(q))
    if ggml == "Q4_1":
        return _rows(d, _fp16_bytes(zero), _nibbles(q))
    if ggml == "Q5_0":
        return _rows(d, _fifth_bits(q), _nibbles(q))
    if ggml == "Q5_1":
        return _rows(d, _fp16_bytes(zero), _fifth_bits(q), _nibbles(q))
    if ggml == "Q4_K":
        return _pack_q4_k(q, scale, zero)
    raise ValueError(f"no packer for GGML type {ggml}")


def _pack_q4_k(q: np.ndarray, scale: torch.Tensor, offset: torch.Tensor) -> np.ndarray:
    rows = q.shape[0]
    per = SUPER_BLOCK // BLOCK
    d, sc = k_superblock_factors(scale.reshape(rows, -1, per))
    dmin, mn = k_superblock_factors((-offset).reshape(rows, -1, per))
    sc_u = sc.to(torch.uint8).numpy()
    mn_u = mn.to(torch.uint8).numpy()
    low = (sc_u[..., :4] & 0x3F) | ((sc_u[..., 4:] >> 4) << 6)
    mid = (mn_u[..., :4] & 0x3F) | ((mn_u[..., 4:] >> 4) << 6)
    high = (sc_u[..., 4:] & 0x0F) | ((mn_u[..., 4:] & 0x0F) << 4)
    sub = q.reshape(rows, -1, per // 2, 2, BLOCK)  # (rows, super-blocks, 4 runs, 2 blocks, 32)
    qs = (sub[..., 0, :] | (sub[..., 1, :] << 4)).reshape(rows, -1, SUPER_BLOCK // 2)
    return _rows(_fp16_bytes(d[..., 0]), _fp16_bytes(dmin[..., 0]), low, mid, high, qs)
