"""The process that times a GGUF file in llama.cpp for :func:`ptqlab.eval.speed.llama_cpp_speed`.

Run as a script (``python -c 'runpy.run_path(...)' speed_child.py REQUEST``), never imported by ptqlab: it
imports only the standard library and llama-cpp-python, so its peak resident memory is llama.cpp's (with
the interpreter and the bindings) and not torch's. ``REQUEST`` is a JSON object (``path``, ``prompt``,
``generate``, ``repeats``, ``threads``, ``type_k`` and ``type_v`` (ggml types or null), ``cache_types``
(their names), ``flash_attn``, ``seed``); the answer is one JSON object on stdout (``pp`` and ``tg``:
tokens/s per repeat, ``peak_bytes``, ``n_ctx``, ``n_batch``, ``n_ubatch``). Anything the libraries print
goes to stderr, with llama.cpp's own log cut to its warnings and errors; a failure exits non-zero with its
reason at the end of stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import resource
import sys
from typing import Any

_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_MAX_UBATCH = 512  # llama-bench's default physical batch (-ub 512)
_KEEP: list[Any] = []  # the log callback: llama.cpp may call it until the process ends


class _Error(Exception):
    """A reason to stop, written to stderr as the last line."""


def _quiet(lib: Any) -> Any:
    """Keep llama.cpp's warnings and errors (and their continuation lines) on stderr; drop the rest."""
    kept = [False]

    def log(level: int, text: bytes, _user: Any) -> None:
        if level != _LOG_CONT:
            kept[0] = level in (0, _LOG_WARN, _LOG_ERROR)
        if kept[0]:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    callback = lib.llama_log_callback(log)
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


def _peak_rss() -> int:
    """The peak resident memory of this process in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``, the peak of this program's own memory. Not ``ru_maxrss``:
    Linux carries the parent's peak into a child across fork and exec, so a child of a process holding
    torch would report torch's memory. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on the BSDs).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _decode(lib: Any, ctx: Any, tokens: list[int]) -> None:
    """One ``llama_decode`` of ``tokens`` (one batch), then ``llama_synchronize``: the compute is counted."""
    array = (lib.llama_token * len(tokens))(*tokens)
    rc = lib.llama_decode(ctx, lib.llama_batch_get_one(array, len(tokens)))
    lib.llama_synchronize(ctx)
    if rc != 0:
        raise _Error(f"llama_decode of {len(tokens)} token(s) returned {rc}")


def _prompt(lib: Any, ctx: Any, tokens: list[int]) -> float:
    """Prompt tokens/s: ``tokens`` in one batch from an empty cache, by the context's prompt counters.

    llama.cpp counts a decode of one token as generation: a prompt of one token is read off those counters.
    """
    if len(tokens) == 1:
        return _generate(lib, ctx, tokens)
    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
    lib.llama_perf_context_reset(ctx)
    _decode(lib, ctx, tokens)
    perf = lib.llama_perf_context(ctx)
    if perf.n_p_eval != len(tokens) or perf.t_p_eval_ms <= 0:
        raise _Error(f"llama.cpp counted {perf.n_p_eval} prompt tokens in {perf.t_p_eval_ms} ms for a batch of "
                     f"{len(tokens)}")
    return len(tokens) / (perf.t_p_eval_ms / 1000.0)


def _generate(lib: Any, ctx: Any, tokens: list[int]) -> float:
    """Generation tokens/s: ``tokens`` decoded one at a time from an empty cache, by the context's eval counters."""
    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
    lib.llama_perf_context_reset(ctx)
    for token in tokens:
        _decode(lib, ctx, [token])
    perf = lib.llama_perf_context(ctx)
    if perf.n_eval != len(tokens) or perf.t_eval_ms <= 0:
        raise _Error(f"llama.cpp counted {perf.n_eval} generated tokens in {perf.t_eval_ms} ms for {len(tokens)} "
                     "single-token decodes")
    return len(tokens) / (perf.t_eval_ms / 1000.0)


def _context_params(lib: Any, request: dict[str, Any]) -> Any:
    prompt, generate, threads = int(request["prompt"]), int(request["generate"]), int(request["threads"])
    params = lib.llama_context_default_params()
    params.n_ctx = prompt + generate
    params.n_batch = prompt  # the whole prompt is one llama_decode
    params.n_ubatch = min(prompt, _MAX_UBATCH)
    params.n_seq_max = 1
    params.n_threads = threads  # single-token decodes
    params.n_threads_batch = threads  # the prompt's batch
    params.no_perf = False  # the default (True) leaves the timing counters at 0
    if request.get("type_k") is not None:
        params.type_k = int(request["type_k"])
    if request.get("type_v") is not None:
        params.type_v = int(request["type_v"])
    if request.get("flash_attn"):
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return params


def time_file(lib: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Load the file, then one warm-up and ``repeats`` timed runs of the prompt and of the generation.

    Args:
        lib: The ``llama_cpp`` module.
        request: The request (see the module's docstring).

    Returns:
        The answer (see the module's docstring), without ``peak_bytes``.

    Raises:
        _Error: The model or context could not be made, a decode failed, or the counters disagree.

    """
    path = str(request["path"])
    prompt, generate, repeats = int(request["prompt"]), int(request["generate"]), int(request["repeats"])
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
    if not model:
        raise _Error(f"llama.cpp could not load the model {path}")
    try:
        ctx = lib.llama_init_from_model(model, _context_params(lib, request))
        if not ctx:
            k, v = request.get("cache_types") or ("f16", "f16")
            raise _Error(f"llama.cpp could not create a context for {path} (K cache {k}, V cache {v}, flash "
                         f"attention {'on' if request.get('flash_attn') else 'auto'})")
        try:
            n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
            rng = random.Random(int(request["seed"]))
            pp: list[float] = []
            tg: list[float] = []
            for run in range(repeats + 1):  # run 0 is the warm-up
                tokens_pp = [rng.randrange(n_vocab) for _ in range(prompt)]
                tokens_tg = [rng.randrange(n_vocab) for _ in range(generate)]
                speed_pp = _prompt(lib, ctx, tokens_pp)
                speed_tg = _generate(lib, ctx, tokens_tg)
                if run:
                    pp.append(speed_pp)
                    tg.append(speed_tg)
            return {"pp": pp, "tg": tg, "n_ctx": int(lib.llama_n_ctx(ctx)), "n_batch": int(lib.llama_n_batch(ctx)),
                    "n_ubatch": int(lib.llama_n_ubatch(ctx))}
        finally:
            lib.llama_free(ctx)
    finally:
        lib.llama_model_free(model)


def main(argv: list[str]) -> int:
    """Time the file the request names; print the answer as JSON on stdout. Returns the exit status."""
    request = json.loads(argv[1])
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr; stdout carries the answer alone
    import llama_cpp

    _KEEP.append(_quiet(llama_cpp))
    try:
        result = time_file(llama_cpp, request)
    except _Error as exc:
        sys.stderr.write(f"\n{exc}\n")
        return 1
    result["peak_bytes"] = _peak_rss()
    answer.write(json.dumps(result))
    answer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
