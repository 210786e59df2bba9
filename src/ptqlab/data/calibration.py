"""Calibration windows for calibrated quantization methods (GPTQ, AWQ, SmoothQuant ...).

Two sources work offline:
    ``c4local``: documents 1100-1999 of the vendored C4 validation sample (evaluation reads only 0-1099),
    drawn under the GPTQ protocol: ``random.Random(seed)`` picks a random document with more than
    ``seqlen`` tokens, then a random window inside it. With the GPT-2 tokenizer 246 of those 900 documents
    have more than 512 tokens but only 32 more than 2048, so calibrate at seqlen 512 here; at 2048 the
    windows reuse documents (a warning says so).
    ``file``: any UTF-8 text file, tokenized whole, ``samples`` random windows drawn with the seed.

The original GPTQ calibration set (C4 train) and the train splits of wikitext2 and PTB are not vendored.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, DataError
from .corpora import C4_CALIBRATION_DOCS, CORPORA, c4_document_ids, draw_document_windows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CALIBRATION_DATASETS = ("c4local", "file")
"""Calibration sources available offline."""


def _check_sizes(samples: int, seqlen: int) -> None:
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"calibration samples must be an integer >= 1, got {samples!r}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"calibration seqlen must be an integer >= 2, got {seqlen!r}")


def _c4local_windows(
    tokenizer: PreTrainedTokenizerBase, samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """GPTQ calibration windows from local C4 documents 1100-1999."""
    doc_ids = c4_document_ids(C4_CALIBRATION_DOCS, tokenizer)
    long_docs = sum(1 for ids in doc_ids if ids.numel() > seqlen)
    if 0 < long_docs < samples:
        log.warning(
            "c4local calibration: only %d of documents 1100-1999 have more than %d tokens, fewer than "
            "the %d samples: windows will reuse documents (seqlen 512 avoids this)",
            long_docs, seqlen, samples,
        )
    windows, picked = draw_document_windows(
        doc_ids, samples, seqlen, random.Random(seed), seqlen + 1, "c4local calibration documents 1100-1999"
    )
    log.info("calibration c4local: %d x %d tokens from %d distinct documents (%d long enough), seed %d",
             samples, seqlen, len(set(picked)), long_docs, seed)
    return windows


def _read_calibration_file(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"calibration file {path} does not exist (or is not a file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"calibration file {path} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise DataError(f"calibration file {path} cannot be read: {exc}") from None


def _file_windows(
    tokenizer: PreTrainedTokenizerBase, path: Path, samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``samples`` random windows of a whole tokenized text file."""
    text = _read_calibration_file(path)
    if not text.strip():
        raise DataError(f"calibration file {path} is empty or only white space (0 tokens)")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0].to(torch.int64)
    n = int(ids.numel())
    if n < seqlen + 1:
        raise DataError(
            f"calibration file {path} has {n} tokens, fewer than the {seqlen + 1} one window of "
            f"seqlen {seqlen} needs"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(samples)]
    log.info("calibration file %s: %d tokens, %d windows of %d, seed %d", path, n, samples, seqlen, seed)
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str = "c4local",
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    path: str | Path | None = None,
) -> torch.Tensor:
    """Return calibration token windows.

    ``c4local`` follows the GPTQ protocol on documents 1100-1999 (see the module docstring); a text file
    is tokenized whole and cut at ``samples`` random starts drawn with ``random.Random(seed)``. Both call
    the tokenizer with its defaults, so a tokenizer that adds BOS puts it at the start of each C4
    document and of the file (only windows that start at 0 begin with it).

    Args:
        tokenizer: The model's tokenizer.
        dataset: ``c4local`` or ``file``.
        samples: Number of windows.
        seqlen: Tokens per window.
        seed: Seed of the random draws.
        path: A UTF-8 text file; giving it selects the file source (``dataset`` must then be ``file``
            or left at ``c4local``).

    Returns:
        Token ids, shape ``(samples, seqlen)``, int64.

    Raises:
        DataError: Unknown dataset, a corpus whose train split is not vendored, a missing, unreadable,
            empty or too short file (the message names the file and its token count), or no C4
            document long enough.
        ConfigError: ``file`` without a path, a path with another dataset, bad sizes.

    """
    _check_sizes(samples, seqlen)
    if path is not None:
        if dataset not in CALIBRATION_DATASETS:
            raise ConfigError(f"calibration path {path} given with dataset {dataset!r}; use dataset 'file'")
        return _file_windows(tokenizer, Path(path), samples, seqlen, seed)
    if dataset == "file":
        raise ConfigError("calibration dataset 'file' needs a path")
    if dataset == "c4local":
        return _c4local_windows(tokenizer, samples, seqlen, seed)
    if dataset in CORPORA:
        raise DataError(
            f"calibration dataset {dataset!r} is not available offline: its train split is not vendored "
            "(only evaluation text, which calibration must not read); only 'c4local' (C4 documents "
            "1100-1999) and 'file' with a path are available"
        )
    raise DataError(f"unknown calibration dataset {dataset!r}; valid: {', '.join(CALIBRATION_DATASETS)}")


def calibration_fingerprint(ids: torch.Tensor) -> str:
    """Return a short content hash of calibration windows.

    Args:
        ids: Token ids (any shape; hashed as contiguous int64 in row-major order).

    Returns:
        The first 16 hex digits of the sha256 of the ids' int64 bytes.

    """
    data = ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
