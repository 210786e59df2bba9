"""Reruns agree to the bit: the one-pass layer loop adds chunk statistics in chunk order, always."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from ptqlab.api import quantize
from ptqlab.methods.base import HessianAccumulator
from ptqlab.models.registry import get_adapter
from ptqlab.nn.capture import capture_inputs
from ptqlab.pipeline.sequential import run_layer_pass
from ptqlab.testing import tiny_model

CAL = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(11))
IDS = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(12))


def _group_inputs_plain(layer, groups, hidden, calls) -> dict[int, list[torch.Tensor]]:
    """Each group's input per chunk, from a plain forward of each chunk in chunk order (no threads)."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for g, mods in enumerate(groups):
        def hook(_m, args, g=g):
            if len(seen.setdefault(g, [])) < chunk[0] + 1:
                seen[g].append(args[0].detach().clone())
        handles.append(mods[0].register_forward_pre_hook(hook))
    chunk = [0]
    try:
        with torch.inference_mode():
            for c, (x, call) in enumerate(zip(hidden, calls, strict=True)):
                chunk[0] = c
                layer(x, *call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon"])
def test_one_pass_hessians_equal_a_plain_sequential_accumulation(family: str) -> None:
    model = tiny_model(family).eval()
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    groups = [[layer.get_submodule(rel) for rel in g.linears] for g in adapter.groups]
    captured = capture_inputs(model, adapter.layers(model), list(CAL.split(1)))  # 8 chunks of one window
    plain = {}
    for g, xs in _group_inputs_plain(layer, groups, captured.hidden, captured.calls[0]).items():
        acc = HessianAccumulator(xs[0].shape[-1])
        for x in xs:
            acc.add(x)
        plain[g] = acc.H
    for _ in range(3):  # any scheduling of the chunk threads gives the same floats
        accs: dict[int, HessianAccumulator] = {}

        def observe(g: int, x: torch.Tensor, accs=accs) -> None:
            accs.setdefault(g, HessianAccumulator(x.shape[-1])).add(x)

        run_layer_pass(layer, groups, list(captured.hidden), captured.calls[0], observe, lambda g: None)
        assert set(accs) == set(plain)
        for g, acc in accs.items():
            assert torch.equal(acc.H, plain[g]), (family, g)


def _quantized_state(recipe: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model = tiny_model("llama").eval()
    quantize(model, {"weight": {"bits": 3, "granularity": "channel"}}, recipe, CAL, progress=False)
    with torch.no_grad():
        logits = model(IDS).logits
    return {k: v.clone() for k, v in model.state_dict().items()}, logits


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_reruns_in_one_process_are_bit_identical(method: str) -> None:
    (a, la), (b, lb) = _quantized_state([{method: {}}]), _quantized_state([{method: {}}])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(la, lb)


_SCRIPT = """
import hashlib, json, sys, torch
from ptqlab.api import quantize
from ptqlab.eval.perplexity import perplexity
from ptqlab.testing import tiny_model
cal = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(11))
ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(12))
out = {}
for method in ("gptq", "awq"):
    model = tiny_model("llama").eval()
    quantize(model, {"weight": {"bits": 3, "granularity": "channel"}}, [{method: {}}], cal, progress=False)
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    out[method] = [digest.hexdigest(), perplexity(model, ids, progress=False).ppl.hex()]
g = torch.Generator().manual_seed(13)  # shapes large enough for torch to split the work between threads
x, w = torch.randn(4, 512, 1024, generator=g), torch.randn(3072, 1024, generator=g)
from ptqlab.methods.base import HessianAccumulator
acc = HessianAccumulator(1024, x.device)
acc.add(x)
# a k/v projection of a 2048-wide model: MKL splits its sums by thread unless in strict reproducible mode
xk, wk = torch.randn(2048, 2048, generator=g), torch.randn(256, 2048, generator=g)
big = [torch.nn.functional.linear(x, w), acc.H, torch.softmax(x, -1).sum(-1), torch.nn.functional.linear(xk, wk)]
out["big"] = [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in big]
from ptqlab.threads import strict_blas
out["strict"] = strict_blas()
out["threads"] = torch.get_num_threads()
json.dump(out, sys.stdout)
"""


def test_reruns_in_two_processes_are_bit_identical_whatever_the_thread_count() -> None:
    """Two processes agree, and so does one on a single thread (ptqlab fits its threads to the free cores)."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", _SCRIPT], check=True, capture_output=True, text=True,
                                      env={**os.environ, "PTQLAB_THREADS": n}).stdout) for n in ("2", "2", "1")]
    assert [r.pop("threads") for r in runs] == [2, 2, 1]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0]["gptq"][0] != runs[0]["awq"][0]
    digest = hashlib.sha256()
    state, _ = _quantized_state([{"gptq": {}}])
    for name, value in sorted(state.items()):
        digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == runs[0]["gptq"][0]  # this process agrees with both


def test_mkl_run_before_ptqlab_is_reported() -> None:
    """Strict mode can only be switched on before MKL's first product: otherwise a warning says so."""
    from ptqlab.threads import _mkl

    if _mkl() is None:
        pytest.skip("torch has no MKL here")
    script = ("import torch; torch.randn(64, 64) @ torch.randn(64, 64)\n"
              "import logging; logging.basicConfig()\n"
              "from ptqlab.threads import strict_blas; print(strict_blas())")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "False"
    assert "MKL ran before ptqlab was imported" in done.stderr
    fine = subprocess.run([sys.executable, "-c", script.replace("torch.randn(64, 64) @ torch.randn(64, 64)", "")],
                          check=True, capture_output=True, text=True, env=env)
    assert fine.stdout.strip() == "True"
