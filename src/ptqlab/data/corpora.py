r"""Perplexity corpora vendored with ptqlab, cut into evaluation windows under the GPTQ protocols.

Every corpus reads files shipped in ``ptqlab/assets/data`` (see its ``PROVENANCE.md``), so evaluation
needs no network and no data outside the package.

Corpora (``CORPORA``):
    ``wikitext2``: wikitext-2-raw-v1 test rows joined with ``"\n\n"`` (also ``wikitext2_new``: the
    GPTQ "new-eval" variant of wikitext2 is the same text).
    ``ptb``: Penn Treebank VALIDATION lines, stripped, joined with ``"\n\n"`` (GPTQ default).
    ``ptb_new``: Penn Treebank TEST lines, stripped, joined with ``" "`` (GPTQ new-eval, ZeroQuant-V2).
    ``c4local``: GPTQ's default C4 protocol on the local 2000-document C4 validation sample: 256 random
    windows from random documents 0-1099 that have at least ``seqlen`` tokens.
    ``c4local_new``: documents 0-1099 joined with ``" "``, truncated to ``256 * seqlen`` tokens.

The local C4 sample's document order against the official validation shard is unknown, so ``c4local``
numbers are not comparable with published C4 numbers; documents 1100-1999 are kept for calibration.

Tokenization follows the GPTQ reference: ``tokenizer(text, return_tensors="pt")`` with the tokenizer's
default special tokens. A tokenizer that adds a BOS token (Llama, stories260k) therefore puts one BOS at
the very start of a joined corpus (only the first window starts with it) and one at the start of every
C4 document. The "sequence longer than the model maximum" warning transformers logs for long texts is
harmless here: texts are cut into windows of ``seqlen`` before any model sees them.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
"""Folder of the vendored data files (inside the installed package)."""

WIKITEXT2_JOINED = "wikitext-2-raw-v1/wikitext-2-raw-v1.test.joined.txt"
WIKITEXT2_ROWS = "wikitext-2-raw-v1/wikitext-2-raw-v1.test.rows.json"
PTB_VALID = "ptb/ptb.valid.txt"
PTB_TEST = "ptb/ptb.test.txt"
C4_PARQUET = "c4/c4_validation_2k.parquet"
TINYSTORIES_SAMPLE = "tinystories/cs336_tinystories_sample.txt"

C4_EVAL_DOCS = range(0, 1100)
"""Local C4 documents used for evaluation (``c4local``, ``c4local_new``)."""
C4_CALIBRATION_DOCS = range(1100, 2000)
"""Local C4 documents reserved for calibration; evaluation never reads them."""
C4_EVAL_WINDOWS = 256
"""Number of windows of the GPTQ C4 protocols (random windows, or ``256 * seqlen`` tokens)."""

CorpusKind = Literal["joined", "c4_random"]


@dataclass(frozen=True)
class CorpusSpec:
    """One perplexity corpus.

    Attributes:
        name: Canonical name (what aliases resolve to).
        kind: ``joined`` (one text tokenized once, cut into consecutive windows) or ``c4_random``
            (GPTQ's random windows from random long-enough C4 documents).
        protocol: How windows are made, in words.
        max_windows_of_tokens: For joined corpora, truncate the tokens to this many windows' worth
            before windowing (``c4local_new``: 256, GPTQ's ``256 * seqlen``); None keeps all.

    """

    name: str
    kind: CorpusKind
    protocol: str
    max_windows_of_tokens: int | None = None


_SPECS = (
    CorpusSpec(
        "wikitext2",
        "joined",
        "wikitext-2-raw-v1 test rows joined with '\\n\\n', tokenized once, floor(N/seqlen) "
        "non-overlapping windows (GPTQ)",
    ),
    CorpusSpec(
        "ptb",
        "joined",
        "PTB validation lines stripped and joined with '\\n\\n', tokenized once, floor(N/seqlen) "
        "non-overlapping windows (GPTQ default)",
    ),
    CorpusSpec(
        "ptb_new",
        "joined",
        "PTB test lines stripped and joined with ' ', tokenized once, floor(N/seqlen) non-overlapping "
        "windows (GPTQ new-eval)",
    ),
    CorpusSpec(
        "c4local",
        "c4_random",
        "local C4 validation sample, documents 0-1099, random.Random(seed): 256 windows, each from a "
        "random document with >= seqlen tokens at a random start (GPTQ default C4 protocol; not "
        "comparable with published C4 numbers)",
    ),
    CorpusSpec(
        "c4local_new",
        "joined",
        "local C4 validation sample, documents 0-1099 joined with ' ', truncated to 256*seqlen tokens, "
        "floor(N/seqlen) non-overlapping windows (GPTQ new-eval C4 protocol; not comparable with "
        "published C4 numbers)",
        C4_EVAL_WINDOWS,
    ),
)
_ALIASES = {"wikitext2_new": "wikitext2"}

_BY_NAME = {spec.name: spec for spec in _SPECS}
CORPORA: Mapping[str, CorpusSpec] = MappingProxyType(
    {**_BY_NAME, **{alias: _BY_NAME[target] for alias, target in _ALIASES.items()}}
)
"""Every accepted corpus name (aliases included) and its specification."""


@dataclass(frozen=True)
class EvalWindows:
    """Token windows of one corpus, ready for :func:`ptqlab.eval.perplexity.perplexity`.

    Attributes:
        input_ids: Token ids, shape ``(windows, seqlen)``, int64.
        name: Canonical corpus name (``wikitext2_new`` gives ``wikitext2``).
        protocol: How the windows were made, in words.
        total_tokens: Tokens of the tokenized source before windowing: the whole joined text (before the
            ``256 * seqlen`` truncation of ``c4local_new``), or all documents 0-1099 for ``c4local``.
        note: Anything a report should mention (a shortfall, few long documents); empty when nothing.

    """

    input_ids: torch.Tensor
    name: str
    protocol: str
    total_tokens: int
    note: str = ""

    @property
    def windows(self) -> int:
        """Number of windows."""
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        """Tokens per window."""
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class _TokenizerHandle:
    """A tokenizer with a hashable identity, so that cached helpers can key on it.

    Two tokenizers loaded from the same place with the same settings share a key; a tokenizer built in
    memory (no ``name_or_path``) keys on its object identity, which the cache keeps alive.
    """

    key: tuple[object, ...]
    tokenizer: PreTrainedTokenizerBase = field(compare=False, hash=False)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> _TokenizerHandle:
        """Build the handle of ``tokenizer``."""
        name = str(getattr(tokenizer, "name_or_path", "") or "")
        probe = tuple(tokenizer("a b")["input_ids"])  # catches BOS/EOS settings that change the ids
        identity = None if name else id(tokenizer)
        key = (type(tokenizer).__name__, name, len(tokenizer), tokenizer.vocab_size, probe, identity)
        return cls(key, tokenizer)


def asset_path(relative: str) -> Path:
    """Return the path of a vendored data file.

    Args:
        relative: Path inside ``ptqlab/assets/data``, e.g. ``"ptb/ptb.test.txt"``.

    Returns:
        The absolute path.

    Raises:
        DataError: The file is missing (an installation without package data).

    """
    path = ASSETS_DIR / relative
    if not path.is_file():
        raise DataError(f"vendored data file {path} is missing; reinstall ptqlab with its package data")
    return path


def resolve_corpus(name: str) -> CorpusSpec:
    """Return the specification of a corpus name or alias.

    Raises:
        DataError: Unknown name (the message lists the valid names).

    """
    try:
        return CORPORA[name]
    except KeyError:
        raise DataError(f"unknown corpus {name!r}; valid names: {', '.join(sorted(CORPORA))}") from None


def _read_text(relative: str) -> str:
    """Read a vendored UTF-8 text file exactly (no newline translation)."""
    with asset_path(relative).open(encoding="utf-8", newline="") as handle:
        return handle.read()


def _stripped_lines(relative: str) -> list[str]:
    """Lines of a vendored text file, each stripped of surrounding white space."""
    return [line.strip() for line in _read_text(relative).splitlines()]


def wikitext2_rows() -> list[str]:
    """Return the wikitext-2-raw-v1 test rows as the Hugging Face dataset holds them (4358 rows)."""
    rows = json.loads(_read_text(WIKITEXT2_ROWS))
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise DataError(f"{asset_path(WIKITEXT2_ROWS)} is not a JSON list of strings")
    return rows


@functools.lru_cache(maxsize=1)
def c4_documents() -> tuple[str, ...]:
    """Return the texts of the local 2000-document C4 validation sample, in file order."""
    import pyarrow.parquet as pq

    texts = pq.read_table(asset_path(C4_PARQUET), columns=["text"]).column("text").to_pylist()
    if len(texts) < C4_CALIBRATION_DOCS.stop:
        raise DataError(f"{asset_path(C4_PARQUET)} holds {len(texts)} documents, expected 2000")
    return tuple(texts)


@functools.lru_cache(maxsize=8)
def _load_text_cached(name: str) -> str:
    if name == "wikitext2":
        return _read_text(WIKITEXT2_JOINED)
    if name == "ptb":
        return "\n\n".join(_stripped_lines(PTB_VALID))
    if name == "ptb_new":
        return " ".join(_stripped_lines(PTB_TEST))
    if name == "c4local_new":
        docs = c4_documents()
        return " ".join(docs[C4_EVAL_DOCS.start : C4_EVAL_DOCS.stop])
    raise DataError(f"corpus {name!r} is not one joined text; use eval_windows() for it")


def load_text(name: str) -> str:
    """Return the text of a "joined text" corpus, before tokenization.

    Args:
        name: ``wikitext2`` (or ``wikitext2_new``), ``ptb``, ``ptb_new`` or ``c4local_new``.

    Returns:
        The joined text, exactly as the GPTQ protocol tokenizes it.

    Raises:
        DataError: Unknown name, or ``c4local`` (random windows of documents, no single text).

    """
    return _load_text_cached(resolve_corpus(name).name)


@functools.lru_cache(maxsize=16)
def _joined_ids(name: str, handle: _TokenizerHandle) -> torch.Tensor:
    """Token ids of a joined corpus, 1-D int64 (shared: callers must not modify it)."""
    ids = handle.tokenizer(load_text(name), return_tensors="pt")["input_ids"][0]
    return ids.to(torch.int64)


@functools.lru_cache(maxsize=8)
def _document_ids(start: int, stop: int, handle: _TokenizerHandle) -> tuple[torch.Tensor, ...]:
    """Token ids of local C4 documents ``start..stop-1``, one 1-D tensor each (shared, read-only)."""
    docs = list(c4_documents()[start:stop])
    encoded = handle.tokenizer(docs)["input_ids"]
    return tuple(torch.tensor(ids, dtype=torch.int64) for ids in encoded)


def c4_document_ids(docs: range, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, ...]:
    """Return the token ids of local C4 documents, each tokenized on its own (cached per tokenizer).

    Args:
        docs: Document indices, e.g. :data:`C4_CALIBRATION_DOCS`.
        tokenizer: The tokenizer; each document gets its default special tokens (BOS where it adds one).

    Returns:
        One 1-D int64 tensor per document. The tensors are shared with the cache: do not modify them.

    """
    return _document_ids(docs.start, docs.stop, _TokenizerHandle.of(tokenizer))


def clear_cache() -> None:
    """Forget every cached text and tokenization (they are kept for the life of the process)."""
    for cached in (c4_documents, _load_text_cached, _joined_ids, _document_ids):
        cached.cache_clear()


def draw_document_windows(
    doc_ids: Sequence[torch.Tensor],
    count: int,
    seqlen: int,
    rng: random.Random,
    min_tokens: int,
    source: str = "documents",
) -> tuple[torch.Tensor, list[int]]:
    """Draw windows the way GPTQ does: a random document long enough, then a random start in it.

    Each draw picks ``rng.randint(0, len(doc_ids) - 1)`` until the document has at least ``min_tokens``
    tokens, then starts at ``rng.randint(0, n - seqlen - 1)`` (a document of exactly ``seqlen`` tokens
    is taken whole without drawing a start). With ``random.Random(0)`` the calls match the reference's
    ``random.seed(0)`` and ``random.randint`` exactly.

    Args:
        doc_ids: Token ids per document.
        count: Number of windows.
        seqlen: Tokens per window.
        rng: The random generator (advanced by the draws).
        min_tokens: Least tokens a document needs: ``seqlen`` for evaluation, ``seqlen + 1`` for
            calibration (the reference's strict ``>``). Must be at least ``seqlen``.
        source: What the documents are, for the error message.

    Returns:
        The windows ``(count, seqlen)`` int64 and the document index of each window.

    Raises:
        DataError: No document has ``min_tokens`` tokens.
        ConfigError: ``min_tokens`` below ``seqlen``.

    """
    if min_tokens < seqlen:
        raise ConfigError(f"min_tokens ({min_tokens}) must be at least seqlen ({seqlen})")
    if not any(ids.numel() >= min_tokens for ids in doc_ids):
        raise DataError(f"none of the {len(doc_ids)} {source} has {min_tokens} tokens or more; "
                        f"use a seqlen below {seqlen}")
    windows = torch.empty(count, seqlen, dtype=torch.int64)
    picked: list[int] = []
    for row in range(count):
        while True:
            index = rng.randint(0, len(doc_ids) - 1)
            n = doc_ids[index].numel()
            if n >= min_tokens:
                break
        start = 0 if n == seqlen else rng.randint(0, n - seqlen - 1)
        windows[row] = doc_ids[index][start : start + seqlen]
        picked.append(index)
    return windows, picked


def _check_sizes(seqlen: int, max_windows: int | None) -> None:
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ConfigError(f"max_windows must be None or an integer >= 1, got {max_windows!r}")


def _joined_windows(
    spec: CorpusSpec, tokenizer: PreTrainedTokenizerBase, seqlen: int, max_windows: int | None
) -> EvalWindows:
    ids = _joined_ids(spec.name, _TokenizerHandle.of(tokenizer))
    total = int(ids.numel())
    notes = []
    if spec.max_windows_of_tokens is not None:
        limit = spec.max_windows_of_tokens * seqlen
        if total < limit:
            notes.append(f"{spec.name} has {total} tokens, short of {spec.max_windows_of_tokens} x "
                         f"{seqlen} = {limit}: used all")
        ids = ids[:limit]
    available = int(ids.numel()) // seqlen
    if available == 0:
        raise DataError(f"corpus {spec.name!r} has {total} tokens, fewer than one window of {seqlen}")
    n = available if max_windows is None else min(available, max_windows)
    if max_windows is not None and max_windows > available:
        notes.append(f"asked for {max_windows} windows, only {available} exist")
    windows = ids[: n * seqlen].reshape(n, seqlen).clone()
    return EvalWindows(windows, spec.name, spec.protocol, total, "; ".join(notes))


def _c4_random_windows(
    spec: CorpusSpec, tokenizer: PreTrainedTokenizerBase, seqlen: int, max_windows: int | None, seed: int
) -> EvalWindows:
    doc_ids = c4_document_ids(C4_EVAL_DOCS, tokenizer)
    total = sum(int(ids.numel()) for ids in doc_ids)
    long_docs = sum(1 for ids in doc_ids if ids.numel() >= seqlen)
    note = ""
    if 0 < long_docs < C4_EVAL_WINDOWS:
        note = (f"only {long_docs} of documents 0-1099 have >= {seqlen} tokens: the {C4_EVAL_WINDOWS} "
                "windows reuse documents")
        log.warning("c4local: %s", note)
    windows, _ = draw_document_windows(
        doc_ids, C4_EVAL_WINDOWS, seqlen, random.Random(seed), seqlen, "c4local documents 0-1099"
    )
    if max_windows is not None:
        windows = windows[:max_windows].clone()
    return EvalWindows(windows, spec.name, f"{spec.protocol}; seed {seed}", total, note)


def eval_windows(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    seqlen: int,
    max_windows: int | None = None,
    seed: int = 0,
) -> EvalWindows:
    """Cut a corpus into perplexity windows under its GPTQ protocol.

    Joined corpora are tokenized once and cut into ``floor(N / seqlen)`` consecutive non-overlapping
    windows (``c4local_new`` first truncated to ``256 * seqlen`` tokens; a shortfall is noted), of which
    the first ``max_windows`` are kept. ``c4local`` draws 256 windows from documents 0-1099 with
    ``random.Random(seed)`` (see :func:`draw_document_windows`) and keeps the first ``max_windows``, so
    a smaller ``max_windows`` is a prefix of the full protocol. Tokenizations are cached in memory per
    corpus and tokenizer for the life of the process.

    Args:
        name: A name of :data:`CORPORA`.
        tokenizer: The model's tokenizer, called with its defaults (see the module docstring on BOS).
        seqlen: Tokens per window (2048 in the papers).
        max_windows: Keep at most this many windows; None keeps all.
        seed: Seed of ``c4local``'s random windows (GPTQ uses 0); other corpora ignore it.

    Returns:
        The windows and what describes them.

    Raises:
        DataError: Unknown corpus name (the message lists the valid ones), or a text too short for one
            window.
        ConfigError: ``seqlen`` below 2 or ``max_windows`` below 1.

    """
    spec = resolve_corpus(name)
    _check_sizes(seqlen, max_windows)
    if spec.kind == "c4_random":
        result = _c4_random_windows(spec, tokenizer, seqlen, max_windows, seed)
    else:
        result = _joined_windows(spec, tokenizer, seqlen, max_windows)
    log.info("%s: %d windows of %d tokens (%d tokens in source)", result.name, result.windows, seqlen,
             result.total_tokens)
    return result
