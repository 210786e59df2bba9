"""A model that is not resident: its skeleton on the meta device and its tensors read from safetensors shards.

A :class:`Checkpoint` indexes a Hugging Face directory's safetensors files by tensor name (the index's
``weight_map``, or the headers of the files) and checks, before any work, that every file is there and
holds every byte its header promises (a missing or truncated shard is named with a tensor it holds).
:func:`skeleton` builds the model from its config with parameters on the meta device (buffers such as
RoPE tables are real). :func:`materialize` gives a module its tensors from the checkpoint and
:func:`release` sends them back to the meta device, so only the modules being worked on occupy memory.
A :class:`ShardWriter` writes a model shard by shard into a directory that appears only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ptqlab.errors import ConfigError, ModelLoadError
from ptqlab.models.adapter import Adapter
from ptqlab.models.registry import get_adapter

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
"""The file that lists a sharded checkpoint's tensors and the shard holding each."""


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name.

    Raises:
        ModelLoadError: The file cannot be read, is not JSON, or has no ``weight_map`` of names to file names.

    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"corrupt safetensors index {index}: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelLoadError(f"corrupt safetensors index {index}: its weight_map is not tensor names -> file names")
    return weight_map


def _header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > path.stat().st_size - 8:
                raise ValueError(f"its header claims {size} bytes, the file has {path.stat().st_size}")
            header = json.loads(f.read(size))
            if not isinstance(header, dict) or not all(
                    isinstance(m, dict) and "data_offsets" in m for k, m in header.items() if k != "__metadata__"):
                raise ValueError("its header is not a safetensors header")
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"corrupt or unreadable safetensors file {path}: {exc}") from exc
    header.pop("__metadata__", None)
    return {"size": 8 + size, "tensors": header}


class Checkpoint:
    """The safetensors tensors of a Hugging Face model directory, by name, read on demand.

    Args:
        directory: A directory with ``config.json`` and safetensors weights (sharded with an index, or not).

    Raises:
        ModelLoadError: No weights, an index naming a missing shard or a tensor its shard lacks, or a shard
            shorter than its header says (each error names the file and a tensor it should hold).

    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.where: dict[str, Path] = {}
        self.numel: dict[str, int] = {}
        index = self.directory / INDEX
        if index.is_file():
            listed = {name: self.directory / file for name, file in read_index(index).items()}
            files = sorted(set(listed.values()))
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            listed = {}
        if not files:
            raise ModelLoadError(f"{self.directory} has no *.safetensors weight files")
        for path in files:
            self._scan(path, [n for n, p in listed.items() if p == path])

    def _scan(self, path: Path, expected: list[str]) -> None:
        if not path.is_file():
            raise ModelLoadError(f"shard {path} is missing (it holds tensor {expected[0]!r}, among others)")
        head = _header(path)
        size = path.stat().st_size
        for name in expected:
            if name not in head["tensors"]:
                raise ModelLoadError(f"shard {path} lacks tensor {name!r} that {INDEX} places there")
        for name, meta in head["tensors"].items():
            end = meta["data_offsets"][1]
            if head["size"] + end > size:
                raise ModelLoadError(
                    f"shard {path} is truncated: tensor {name!r} ends at byte {head['size'] + end}, "
                    f"the file has {size}"
                )
            self.where[name] = path
            self.numel[name] = math.prod(int(d) for d in meta["shape"])

    def names(self, prefix: str = "") -> list[str]:
        """The tensor names that start with ``prefix``."""
        return [n for n in self.where if n.startswith(prefix)]

    def bytes_of(self, prefix: str, itemsize: int) -> int:
        """Bytes of the tensors under ``prefix`` at ``itemsize`` bytes per element."""
        return sum(self.numel[n] * itemsize for n in self.names(prefix))

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (each file opened once)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise ModelLoadError(f"{self.directory}: no tensor {name!r} in its safetensors files")
            by_file.setdefault(self.where[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in wanted:
                    out[name] = handle.get_tensor(name)
        return out


def skeleton(directory: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of ``directory`` built from its config, parameters on the meta device, in eval mode.

    Raises:
        ModelLoadError: The config cannot be read or built.
        UnsupportedModelError: The model's class has no family adapter.

    """
    # accelerate puts only the parameters on the meta device; torch's own ``torch.device("meta")`` would put the
    # buffers there too, and those computed at construction (RoPE tables) are in no checkpoint
    from accelerate import init_empty_weights

    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"could not build the model of {directory}: {type(exc).__name__}: {exc}") from exc
    get_adapter(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model


def outer_modules(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """The modules with tensors of their own outside the decoder layers (embeddings, norms, head)."""
    layers = adapter.layers(model)
    inside = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in inside and _slots([m], recurse=False)]


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    """The state-dict prefix of ``module`` inside ``model`` (``"model.layers.3."``)."""
    for name, sub in model.named_modules():
        if sub is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")


def tied_embedding_names(model: nn.Module) -> list[str]:
    """The state-dict names of the input embedding's and the output head's matrix when they are one tensor, else []."""
    if not isinstance(model, PreTrainedModel):
        return []
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return []
    return [module_prefix(model, emb) + "weight", module_prefix(model, head) + "weight"]


def _tensor_name(model: nn.Module, full: str, ckpt: Checkpoint) -> str:
    """The checkpoint name of a parameter: its own, or for tied input and output embeddings the one stored."""
    if full in ckpt.where:
        return full
    pair = tied_embedding_names(model)
    stored = [n for n in pair if n in ckpt.where]
    if full in pair and stored:
        return stored[0]
    raise ModelLoadError(f"{ckpt.directory}: no tensor {full!r} in its safetensors files")


def _slots(modules: list[nn.Module], recurse: bool = True) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owner, name, tensor, is_parameter) of every parameter and buffer of ``modules``.

    With ``recurse`` those of their submodules too; a tensor held under several names (tied weights) is
    listed under each.
    """
    out: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
    for sub in (s for m in modules for s in (m.modules() if recurse else [m])):
        out += [(sub, n, p, True) for n, p in sub.named_parameters(recurse=False, remove_duplicate=False)]
        out += [(sub, n, b, False) for n, b in sub.named_buffers(recurse=False, remove_duplicate=False)]
    return out


@torch.no_grad()
def materialize(
    model: nn.Module, modules: nn.Module | list[nn.Module], ckpt: Checkpoint, device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Give ``modules`` (parts of ``model``) their tensors from ``ckpt`` on ``device``; floats cast to ``dtype``.

    Only tensors on the meta device are read; a tensor shared by several of them (tied embeddings) is read
    once and stays shared.
    """
    names = {id(m): f"{n}." if n else "" for n, m in model.named_modules()}
    wanted: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for owner, name, t, is_param in _slots(modules if isinstance(modules, list) else [modules]):
        if t.device.type == "meta":
            full = _tensor_name(model, names[id(owner)] + name, ckpt)
            wanted.setdefault(full, []).append((owner, name, is_param))
    tensors = ckpt.load(wanted)
    for full, owners in wanted.items():
        t = tensors.pop(full)
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        value = nn.Parameter(t, requires_grad=False)
        for owner, name, is_param in owners:
            if is_param:
                owner.register_parameter(name, value)
            else:
                setattr(owner, name, t)  # an existing buffer keeps its persistence


@torch.no_grad()
def release(modules: nn.Module | list[nn.Module]) -> None:
    """Send the parameters of ``modules`` back to the meta device (memory freed, shapes and ties kept)."""
    metas: dict[int, nn.Parameter] = {}
    for owner, name, t, is_param in _slots(modules if isinstance(modules, list) else [modules]):
        if is_param and t.device.type != "meta":
            if id(t) not in metas:
                metas[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
            owner.register_parameter(name, metas[id(t)])


@contextmanager
def resident(model: nn.Module, modules: list[nn.Module], ckpt: Checkpoint, device: torch.device,
             dtype: torch.dtype) -> Any:
    """Materialize ``modules`` for the duration of the block, then release them."""
    materialize(model, modules, ckpt, device, dtype)
    try:
        yield
    finally:
        release(modules)


def check_writable(directory: str | Path, what: str = "runtime.offload_dir") -> Path:
    """Create ``directory`` if needed and check that a file can be written in it.

    Raises:
        ConfigError: It cannot be created or written.

    """
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ptqlab-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write in {path}: {exc.strerror or exc}") from None
    return path


class ShardWriter:
    """Writes a model's tensors shard by shard; the directory appears, with its index, only when complete.

    Args:
        out: The directory to create (it must not exist yet).
        config_from: A model directory whose ``config.json`` (and tokenizer files) are copied beside.

    """

    def __init__(self, out: str | Path, config_from: str | Path | None = None) -> None:
        self.out = Path(out)
        check_writable(self.out.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.out.parent))
        self.weight_map: dict[str, str] = {}
        self.config_from = None if config_from is None else Path(config_from)

    def write(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (by state-dict name) as the shard file ``shard``."""
        if not tensors:
            return
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        path = self.tmp / shard
        save_file(data, str(path), metadata={"format": "pt"})
        _sync(path)
        self.weight_map.update(dict.fromkeys(data, shard))

    def close(self) -> Path:
        """Write the index (and the config), then move the directory into place."""
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1))
        if self.config_from is not None:
            for f in self.config_from.iterdir():
                if f.is_file() and (f.suffix in (".json", ".model", ".txt")) and f.name != INDEX:
                    shutil.copy2(f, self.tmp / f.name)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        """Remove what was written."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _sync(path: Path) -> None:
    """Flush a written file to disk, so its pages are clean (memory the kernel may take back at once)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
