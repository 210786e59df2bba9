"""Run-time estimates from stored timings."""

from __future__ import annotations

from typing import Any

from ptqlab.study.estimate import Estimator, Workload


def _config(recipe: str, bits: int, model: str = "m") -> dict[str, Any]:
    return {"model": model, "recipe": [{recipe: {}}], "scheme": {"weight": {"bits": bits}},
            "evaluate": {"perplexity": ["wikitext2"], "seqlen": 512, "max_windows": 4}}


def _timings(quantize_s: float) -> dict[str, float]:
    return {"total_s": quantize_s + 100.0, "load_s": 0.0, "quantize_s": quantize_s, "eval.wikitext2_tok_per_s": 20.0}


def test_a_recipe_at_unmeasured_bits_is_priced_by_its_other_bits_not_left_out() -> None:
    est = Estimator([(_config("gptq", 4), _timings(1500.0)), (_config("rtn", 3), _timings(10.0)),
                     (_config("gptq", 4, model="other"), _timings(9.0))])
    gptq3 = est.estimate(Workload(model="m", method="gptq@3", ppl_tokens=2048))
    assert gptq3.seconds["quantize"] == 1500.0 and "quantize" not in gptq3.unpriced
    assert gptq3.seconds["perplexity"] == 2048 / 20.0
    rtn4 = est.estimate(Workload(model="m", method="rtn@4", ppl_tokens=0))
    assert rtn4.seconds["quantize"] == 10.0  # rtn's own runs, never gptq's
    awq = est.estimate(Workload(model="m", method="awq@4", ppl_tokens=0))
    assert "quantize" in awq.unpriced  # no run of the recipe at any bits: named, not guessed


def test_a_recipe_never_run_on_the_model_is_priced_from_the_nearest_model_scaled() -> None:
    def timings(quantize_s: float, tok_per_s: float) -> dict[str, float]:
        return {"total_s": quantize_s + 100.0, "load_s": 1.0, "quantize_s": quantize_s,
                "eval.wikitext2_tok_per_s": tok_per_s}

    est = Estimator([(_config("rtn", 4, model="big"), timings(10.0, 10.0)),
                     (_config("awq", 4, model="mid"), timings(600.0, 40.0)),  # 4x the big model's speed
                     (_config("awq", 3, model="tiny"), timings(5.0, 400.0))])
    awq = est.estimate(Workload(model="big", method="awq@4", ppl_tokens=2048))
    assert awq.borrowed == {"quantize": "mid"}  # the nearest in seconds per token, not the tiny model
    assert awq.seconds["quantize"] == 600.0 * 4
    assert awq.total == sum(awq.seconds.values()) and not awq.unpriced
    mid_divergence = {**timings(600.0, 40.0), "divergence_s": 20.0}
    est = Estimator([(_config("rtn", 4, model="big"), timings(10.0, 10.0)),
                     ({**_config("rtn", 4, model="mid"), "evaluate": {"divergence": {"windows": 4, "seqlen": 512}}},
                      mid_divergence)])
    rtn = est.estimate(Workload(model="big", method="rtn@4", ppl_tokens=0, divergence_tokens=1024))
    assert rtn.borrowed == {"divergence": "mid"} and rtn.seconds["divergence"] == 20.0 / 2048 * 1024 * 4
    alone = Estimator([(_config("rtn", 4, model="big"), timings(10.0, 10.0))])
    gptq = alone.estimate(Workload(model="big", method="gptq@4", ppl_tokens=2048))
    assert gptq.unpriced == ["quantize"] and gptq.total is None  # a sum leaving out a phase is not a time
    assert gptq.priced == 1.0 + 2048 / 10.0
