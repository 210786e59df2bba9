"""The kl signal's forwards that start at a unit's layer give the floats of a whole forward."""

from __future__ import annotations

import torch

from ptqlab.eval import divergence as div
from ptqlab.models.loading import load_model
from ptqlab.models.registry import get_adapter
from ptqlab.models.weights import set_weight_matrix, weight_matrix
from ptqlab.search.signal import _BaseInputs


def test_a_forward_from_the_units_layer_equals_the_whole_forward() -> None:
    lm = load_model("stories260k", "float32", "cpu", False)
    model, layers = lm.model, get_adapter(lm.model).layers(lm.model)
    ids = torch.randint(0, lm.model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    tops = [div.window_reference(div.logprob_chunks(model, ids[w : w + 1]), ids[w], 8) for w in range(3)]
    ref = div.TopKReference.stack(ids, tops)
    prefix = _BaseInputs(model, layers, ref.ids)  # the base: here the FP model itself
    assert prefix.divergence(model, 0, ref).kl == div.divergence(model, ref).kl == 0.0
    for start in range(len(layers)):
        module = layers[start].mlp.down_proj
        before = weight_matrix(module).detach().clone()
        noise = torch.randn(before.shape, generator=torch.Generator().manual_seed(start))
        set_weight_matrix(module, before + 0.02 * noise)
        whole, from_layer = div.divergence(model, ref), prefix.divergence(model, start, ref)
        assert whole.kl > 0 and from_layer.kl == whole.kl and from_layer.top1 == whole.top1
        set_weight_matrix(module, before)
