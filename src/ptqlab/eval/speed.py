"""Speed, peak memory and file size of a model in the runtime that serves it: llama.cpp or torch.

Both timers measure what ``llama-bench`` reports: ``pp<N>``, the tokens/s of a prompt of N random tokens
processed in one batch from an empty KV cache, and ``tg<N>``, the tokens/s of N tokens decoded one at a
time from an empty KV cache, each after one warm-up and then ``repeats`` times. The metrics
(:meth:`SpeedSample.metrics`) are the median over the repeats with the standard error of the mean.

:func:`llama_cpp_speed` times a GGUF file in a child process (a fresh interpreter that imports only
llama-cpp-python: the peak memory is llama.cpp's, and a crash in llama.cpp is an error here, not the end of
the caller) with llama.cpp's own timing counters. :func:`torch_speed` times the model in memory as ptqlab
holds it (fake-quantized, its hooks on): what fake quantization costs, not what a kernel would.
:func:`llama_cpp_cache_types` maps a ``scheme.kv_cache`` section to llama.cpp's cache types where they
are the same format.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from ..memory import resident_bytes
from ..metrics import Metric, file_size_name, peak_memory_name, speed_name
from ..nn.kv_cache import cache_kwarg
from ..nn.specs import kv_specs
from ..quant.spec import QuantSpec
from ..schema import KVCacheScheme
from ..threads import fit_threads
from .perplexity import model_device

log = logging.getLogger(__name__)

CACHE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20,
                               "q5_0": 6, "q5_1": 7}
"""llama.cpp's KV cache types (``--cache-type-k`` / ``--cache-type-v``) -> their ``ggml_type`` values."""

_FLOAT_CACHE = ("f32", "f16", "bf16")  # a V cache of any other type needs flash attention in llama.cpp
_CHILD = Path(__file__).with_name("speed_child.py")
# a fresh interpreter runs the child file without ptqlab (or torch) on its path or in its memory
_LAUNCH = ("import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
_TAIL_LINES = 25
_NEEDS_LLAMA_CPP = "evaluate.speed runtime llama.cpp needs llama-cpp-python: pip install 'ptqlab[llamacpp]'"


@dataclass(frozen=True)
class SpeedSample:
    """One timing of a model in a runtime.

    Attributes:
        runtime: ``llama_cpp`` or ``torch`` (as metric names spell it).
        prompt: Prompt tokens processed in one batch.
        generate: Tokens generated one at a time.
        pp: Prompt tokens/s, one per repeat (after the warm-up).
        tg: Generation tokens/s, one per repeat.
        threads: The runtime's threads.
        peak_bytes: The peak resident memory of the process that ran the model (None: not measured).
        file_bytes: The bytes of the file the runtime loaded (the GGUF file); None for torch.

    """

    runtime: str
    prompt: int
    generate: int
    pp: tuple[float, ...]
    tg: tuple[float, ...]
    threads: int
    peak_bytes: int | None = None
    file_bytes: int | None = None

    def metrics(self) -> list[Metric]:
        """``speed.<runtime>.pp<prompt>`` and ``.tg<generate>``, ``memory.<runtime>.peak``, ``size.file.gguf``.

        Each speed is the median over the repeats, its standard error the sample standard deviation over
        sqrt(repeats) (None for one repeat).
        """
        out = [Metric(speed_name(self.runtime, "pp", self.prompt), *_median(self.pp)),
               Metric(speed_name(self.runtime, "tg", self.generate), *_median(self.tg))]
        if self.peak_bytes is not None:
            out.append(Metric(peak_memory_name(self.runtime), float(self.peak_bytes)))
        if self.file_bytes is not None:
            out.append(Metric(file_size_name("gguf"), float(self.file_bytes)))
        return out


def _median(values: tuple[float, ...]) -> tuple[float, float | None]:
    if not values:
        raise ValueError("a speed sample needs at least one repeat")
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return float(statistics.median(values)), se


def _check_sizes(prompt: int, generate: int, repeats: int, threads: int | None) -> None:
    for name, value in (("prompt", prompt), ("generate", generate), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"evaluate.speed.{name}={value} must be at least 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"evaluate.speed.threads={threads} must be at least 1 (or null: ptqlab's thread count)")


def _ggml_type(name: str | None, which: str) -> int | None:
    if name is None:
        return None
    if name not in CACHE_TYPES:
        raise ConfigError(f"{which}={name!r} is not a llama.cpp cache type; use one of {', '.join(CACHE_TYPES)}")
    return CACHE_TYPES[name]


def check_llama_cpp() -> None:
    """Refuse a llama.cpp timing where llama-cpp-python is not installed (without importing it).

    Raises:
        ConfigError: llama-cpp-python is not installed (the message names the extra that installs it).

    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(_NEEDS_LLAMA_CPP)


def llama_cpp_speed(path: Path, *, prompt: int = 512, generate: int = 128, repeats: int = 5,
                    threads: int | None = None, cache_type_k: str | None = None, cache_type_v: str | None = None,
                    seed: int = 0) -> SpeedSample:
    """Time a GGUF file in llama.cpp (llama-cpp-python's low-level API) as ``llama-bench`` does.

    A child process (a fresh interpreter, never a fork of this one) loads the file with llama.cpp's
    defaults (memory-mapped; every layer on the GPU in a GPU build) and a context of ``n_ctx = prompt +
    generate``, ``n_batch = prompt`` (the prompt is one ``llama_decode``), ``n_ubatch = min(prompt, 512)``
    (llama-bench's default physical batch), ``n_threads = n_threads_batch = threads``, ``no_perf = false``
    and the cache types given. Flash attention is llama.cpp's default (``auto``: on where the backend has
    it) unless the V cache is quantized, which llama.cpp allows only with flash attention: then it is on.

    Each run clears the KV cache (``llama_memory_clear``) and the counters (``llama_perf_context_reset``),
    then decodes ``prompt`` random token ids (drawn with ``seed`` over the whole vocabulary, no BOS) in one
    batch, or ``generate`` random ids one per ``llama_decode``, each decode followed by
    ``llama_synchronize``. The speeds come from llama.cpp's own counters (``llama_perf_context``, whose
    ``llama_perf_context_data`` in llama-cpp-python 0.3.36 has ``t_p_eval_ms``, ``n_p_eval``, ``t_eval_ms``
    and ``n_eval``): a decode of more than one token adds its compute time to
    ``t_p_eval_ms`` and its tokens to ``n_p_eval``, a single-token decode adds to ``t_eval_ms`` and one to
    ``n_eval``; pp = ``n_p_eval / t_p_eval_ms`` and tg = ``n_eval / t_eval_ms`` (in tokens/s; a prompt of
    one token, which llama.cpp counts as generation, by the latter), and the child checks that the counts
    are the tokens it decoded. One warm-up run of each comes before the ``repeats``.

    Args:
        path: The GGUF file.
        prompt: Prompt tokens.
        generate: Generated tokens.
        repeats: Timed runs of each, after the warm-up.
        threads: llama.cpp's threads; None: ptqlab's thread count (:func:`ptqlab.threads.fit_threads`).
        cache_type_k: llama.cpp's K cache type (``q8_0``, ``q4_0``, ... see :data:`CACHE_TYPES`); None: f16.
        cache_type_v: The V cache type; None: f16.
        seed: Seed of the random token ids.

    Returns:
        The sample: ``peak_bytes`` is the child process's peak resident memory (``VmHWM`` on Linux, not
        ``ru_maxrss``, which Linux carries over from this process; elsewhere ``ru_maxrss``): the model's
        pages read from the mapped file, its KV cache and compute buffers, with the interpreter and
        llama-cpp-python's bindings (about 45 MB on their own). ``file_bytes`` is the file's size.

    Raises:
        ConfigError: llama-cpp-python is not installed, a size is below 1, or a cache type is unknown.
        ModelLoadError: The child failed (the file is missing or not a model llama.cpp reads, a context or a
            decode failed, or llama.cpp crashed); the message names the file and ends with the child's
            stderr.

    """
    check_llama_cpp()
    _check_sizes(prompt, generate, repeats, threads)
    type_k, type_v = _ggml_type(cache_type_k, "cache_type_k"), _ggml_type(cache_type_v, "cache_type_v")
    n = threads if threads is not None else fit_threads()
    request = {"path": str(path), "prompt": prompt, "generate": generate, "repeats": repeats, "threads": n,
               "type_k": type_k, "type_v": type_v, "cache_types": [cache_type_k or "f16", cache_type_v or "f16"],
               "flash_attn": cache_type_v is not None and cache_type_v not in _FLOAT_CACHE, "seed": seed}
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, str(_CHILD), json.dumps(request)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise _child_error(path, proc)
    if proc.stderr.strip():
        log.debug("llama.cpp's warnings timing %s:\n%s", path, proc.stderr.strip())
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise _child_error(path, proc, f"printed no answer ({proc.stdout[-200:]!r})") from None
    sample = SpeedSample("llama_cpp", prompt, generate, tuple(float(v) for v in answer["pp"]),
                         tuple(float(v) for v in answer["tg"]), n, int(answer["peak_bytes"]), path.stat().st_size)
    log.info("llama.cpp %s: pp%d %.1f tok/s, tg%d %.1f tok/s, %d threads, cache %s/%s, peak %.1f MiB",
             path.name, prompt, statistics.median(sample.pp), generate, statistics.median(sample.tg), n,
             cache_type_k or "f16", cache_type_v or "f16", int(answer["peak_bytes"]) / 2**20)
    return sample


def _child_error(path: Path, proc: subprocess.CompletedProcess[str], what: str | None = None) -> ModelLoadError:
    if what is None:
        code = proc.returncode
        if code < 0:
            try:
                what = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"was killed by signal {-code}"
        else:
            what = f"exited with status {code}"
    lines = proc.stderr.strip().splitlines()[-_TAIL_LINES:]
    tail = "\n".join(lines) if lines else "(nothing)"
    return ModelLoadError(f"llama.cpp could not time {path}: its process {what}; its stderr ends with:\n{tail}")


def _peak_rss() -> int:
    """The peak resident memory of this process in bytes (``VmHWM`` on Linux, else ``ru_maxrss``)."""
    peak = resident_bytes(peak=True)
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)  # transformers >= 5.24
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _vocab_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size:
        return int(size)
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise ConfigError(f"{type(model).__name__} has no vocabulary size to draw random tokens from")
    return int(embeddings.num_embeddings)


def torch_speed(model: nn.Module, *, prompt: int = 512, generate: int = 128, repeats: int = 5,
                threads: int | None = None, seed: int = 0) -> SpeedSample:
    """Time the model in memory (fake-quantized, whatever hooks it has on) as ``llama-bench`` times a file.

    Under ``torch.inference_mode()``, with torch's threads set to ``threads`` and restored afterwards, each
    run is timed with ``time.perf_counter`` (after ``torch.cuda.synchronize`` on a CUDA model): pp is one
    forward of ``prompt`` random token ids (drawn with ``seed``; ``use_cache=True``, the logits of the last
    position only where the model takes ``logits_to_keep``, as llama.cpp and ``generate`` compute them),
    tg is ``generate`` forwards of one random token each from an empty cache, each passing back the KV
    cache the previous one returned (a KV quantization hook quantizes it as in any forward). One warm-up
    run of each comes before the ``repeats``.

    Args:
        model: A causal LM (transformers) as ptqlab holds it.
        prompt: Prompt tokens.
        generate: Generated tokens.
        repeats: Timed runs of each, after the warm-up.
        threads: torch's threads for the timing; None: ptqlab's thread count (:func:`ptqlab.threads.fit_threads`).
        seed: Seed of the random token ids.

    Returns:
        The sample: ``peak_bytes`` is this whole process's peak resident memory so far (``VmHWM`` on Linux,
        else ``ru_maxrss``: all that it held since it started, not the timing alone; host memory even for
        a CUDA model); ``file_bytes`` is None.

    Raises:
        ConfigError: A size below 1.

    """
    _check_sizes(prompt, generate, repeats, threads)
    before = torch.get_num_threads()
    n = threads if threads is not None else fit_threads()
    device = model_device(model)
    vocab = _vocab_size(model)
    params = set(_forward_params(model))
    cache_name = cache_kwarg(model)
    generator = torch.Generator().manual_seed(seed)
    pp: list[float] = []
    tg: list[float] = []
    torch.set_num_threads(n)
    try:
        with torch.inference_mode():
            for run in range(repeats + 1):  # run 0 is the warm-up
                ids_pp = torch.randint(0, vocab, (1, prompt), generator=generator).to(device)
                ids_tg = torch.randint(0, vocab, (generate, 1, 1), generator=generator).to(device)
                speed_pp = _time_prompt(model, ids_pp, params, device)
                speed_tg = _time_generate(model, ids_tg, cache_name, device)
                if run:
                    pp.append(speed_pp)
                    tg.append(speed_tg)
    finally:
        torch.set_num_threads(before)
    sample = SpeedSample("torch", prompt, generate, tuple(pp), tuple(tg), n, _peak_rss(), None)
    log.info("torch %s: pp%d %.1f tok/s, tg%d %.1f tok/s, %d threads", type(model).__name__, prompt,
             statistics.median(sample.pp), generate, statistics.median(sample.tg), n)
    return sample


def _forward_params(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_prompt(model: nn.Module, ids: torch.Tensor, params: set[str], device: torch.device) -> float:
    kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, **kwargs)
    _sync(device)
    return ids.shape[1] / (time.perf_counter() - start)


def _time_generate(model: nn.Module, ids: torch.Tensor, cache_name: str, device: torch.device) -> float:
    cache = None
    _sync(device)
    start = time.perf_counter()
    for token in ids:  # (1, 1) each
        kwargs: dict[str, Any] = {"use_cache": True}
        if cache is not None:
            kwargs[cache_name] = cache
        cache = _cache_of(model(input_ids=token, **kwargs))
    _sync(device)
    return ids.shape[0] / (time.perf_counter() - start)


_LLAMA_CPP_KV = ("llama.cpp's cache types are blocks of 32 along head_dim (q8_0, q4_0, q5_0 symmetric; q4_1, q5_1 "
                 "with zero_point: float)")


def llama_cpp_cache_types(kv: KVCacheScheme | None) -> tuple[str | None, str | None]:
    """llama.cpp's K and V cache types for a ``scheme.kv_cache`` section, where they are the same format.

    Each side is resolved as ptqlab quantizes it (:func:`ptqlab.nn.specs.kv_specs`: ``key`` and ``value``
    override the section's fields). A side in full precision (no bits, or 16) is None (llama.cpp's f16); a
    quantized side maps only where llama.cpp's cache holds the same layout: ``granularity: group`` with
    ``group_size: 32`` (blocks of 32 along head_dim, per token and head), K cached after RoPE
    (``where: post_rope``), everything cached quantized (``mode: all``), and 8-bit symmetric -> ``q8_0``,
    4-bit symmetric -> ``q4_0``, 5-bit symmetric -> ``q5_0``, 4-bit asymmetric with ``zero_point: float`` ->
    ``q4_1``, 5-bit asymmetric with ``zero_point: float`` -> ``q5_1``. The rounding is llama.cpp's own
    (FP16 block parameters; q4_0 and q5_0 scale by the block's signed extreme), so the numbers a llama.cpp
    run computes are close to ptqlab's, not equal.

    Args:
        kv: The section, or None.

    Returns:
        ``(cache_type_k, cache_type_v)`` for :func:`llama_cpp_speed`.

    Raises:
        ConfigError: A quantized side llama.cpp's cache cannot hold; the message names the setting.

    """
    spec = kv_specs(kv)
    if spec is None:
        return None, None
    if spec.where != "post_rope":
        raise ConfigError(f"scheme.kv_cache.where={spec.where}: llama.cpp caches K after RoPE; set where: post_rope")
    if spec.mode != "all":
        raise ConfigError(f"scheme.kv_cache.mode={spec.mode}: llama.cpp quantizes all it caches (the prompt too); "
                          "set mode: all")
    return _cache_type(spec.key), _cache_type(spec.value)


def _cache_type(spec: QuantSpec) -> str | None:
    if not spec.enabled:
        return None
    bits, symmetric = spec.nbits, spec.symmetric
    grain = f"group {spec.group_size}" if spec.granularity == "group" else str(spec.granularity)
    what = f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'} per {grain}"
    if not symmetric and bits in (4, 5):
        what += f" with zero_point: {spec.zero_point}"
    if spec.granularity != "group" or spec.group_size != 32:
        fix = "set granularity: group, group_size: 32"
    elif symmetric and bits not in (4, 5, 8):
        fix = "set bits: 4, 5 or 8"
    elif not symmetric and bits == 8:
        fix = "set symmetric: true (q8_0)"
    elif not symmetric and bits not in (4, 5):
        fix = "set bits: 4 or 5 (with zero_point: float), or bits: 4, 5 or 8 with symmetric: true"
    elif not symmetric and spec.zero_point != "float":
        fix = "set zero_point: float (q4_1, q5_1) or symmetric: true (q4_0, q5_0)"
    else:
        return f"q{bits}_0" if symmetric else f"q{bits}_1"
    raise ConfigError(f"{spec.where}: {_LLAMA_CPP_KV}, not {what}; {fix}")
