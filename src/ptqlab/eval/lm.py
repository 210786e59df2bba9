"""ptqlab's lm-eval model: each shared context is run once, its continuations are scored from its KV cache.

lm-eval's ``HFLM`` runs every loglikelihood request as a forward of its own, so a multiple-choice item
re-runs its context once per choice. :func:`score_requests` groups the (already tokenized) requests by
identical context. A context shared by several continuations is run once (``use_cache=True``; contexts
of a batch are left-padded, with position ids that count real tokens only); its last logit scores each
continuation's first token, and the continuations, minus their last token, are run in one batch on
the context's cache, its rows selected per continuation (``Cache.batch_select_indices``), with an
attention mask over context and continuation and position ids continuing after the context. A context
with a single continuation is scored by one forward of context + continuation, as HFLM does. On CPU a
forward of a few tokens costs about as much as reading the weights once, so the number of forwards
matters as much as the tokens: ``batch_size`` contexts share one forward, and all their continuations
the next one.

Runtime quantizers (:mod:`ptqlab.nn`: activations, the KV cache, attention inputs) round values that the
forward computes, and those values carry float noise that depends on the shapes of the forward: a context
run alone or in a padded batch, on its own or with its continuation, goes through other matrix kernels
and reduction orders. Away from a rounding boundary the noise stays noise (1e-6); at one, a 4-bit code
flips and a request moves by tenths of a nat. So when :func:`split_blockers` finds a runtime quantizer on
the model, every request is scored *alone*: one unpadded forward of context + continuation[:-1], called
as lm-eval's HF model calls it at batch size 1 (``model(input_ids).logits``), so the numbers equal lm-eval's
own scoring of the same model on any machine, bit for bit. Which way a run was scored is
:func:`scoring_path`, stored with the run. Some quantizers would not even be split-exact with exact floats
(a dynamic per-tensor range or per-tensor attention inputs span the tokens of a call, K/V per channel
span the call's tokens, KV mode ``decode`` keeps the first forward in full precision): their reasons are
named too. An attention implementation registered without a mask function would get no attention mask
(sdpa then assumes a causal forward from position 0): :func:`builds_masks` checks it, and without one
requests are scored alone as well. Weight-only quantization (and FP) share contexts: the weights are
fixed, and the float noise of the split passes through smooth functions only (within 1e-4 nats).

``PtqlabLM`` tokenizes as HFLM does (BOS handling, empty contexts, left truncation to ``max_length``)
and takes the scoring function as an argument, so that a model that is not resident can supply its own.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from lm_eval.api.model import TemplateLM
from torch import nn

from ..nn.kv_cache import cache_kwarg
from ..nn.runtime import installed_runtime
from ..nn.specs import KVSpec
from ..threads import fit_threads
from .perplexity import model_device

log = logging.getLogger(__name__)

Request = tuple[Sequence[int], Sequence[int]]
"""Context token ids and continuation token ids (both non-empty)."""
Score = tuple[float, bool]
"""Sum of the continuation's log-probabilities, and whether greedy decoding would produce it."""

SCORING_TEXT = "lm_eval.scoring"
"""The run text that says how its loglikelihood requests were scored (:func:`scoring_path`)."""
DEFAULT_MAX_LENGTH = 2048  # HFLM's default when neither the config nor the tokenizer names one


class Scorer(Protocol):
    """Scores tokenized requests on a model (the signature of :func:`score_requests`)."""

    def __call__(self, model: Any, requests: Sequence[Request], *, batch_size: int) -> list[Score]:
        """Score each request; the result is in the order of ``requests``."""
        ...


def _kv_blockers(kv: KVSpec) -> list[str]:
    found = []
    if kv.mode == "decode":
        found.append("KV mode 'decode' keeps the first forward in full precision (a continuation would be decoding)")
    for side, spec in (("key", kv.key), ("value", kv.value)):
        if spec.enabled and spec.granularity == "channel":
            found.append(f"KV {side} ranges per channel span the tokens of a call")
    return found


def builds_masks(model: nn.Module) -> bool:
    """Whether transformers builds an attention mask for ``model``'s attention implementation.

    An implementation registered without a mask function (ptqlab's quantized attention inputs) gets no
    mask: padding is not masked and a forward on a cache attends as if it started at position 0.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    impl = _attention_implementation(model)
    return impl is None or impl in ALL_MASK_ATTENTION_FUNCTIONS


def _attention_implementation(model: nn.Module) -> str | None:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


RUNTIME_ROUNDING = "runtime quantizers round what the forward computes (another split would flip roundings)"


def split_blockers(model: nn.Module) -> list[str]:
    """Why scoring requests other than alone, as lm-eval does, could change the numbers on ``model``.

    The runtime quantizers ptqlab installs (activations, the KV cache, the attention inputs) are read
    from the model's registry (:func:`ptqlab.nn.runtime.installed_runtime`). Any of them is a reason
    (:data:`RUNTIME_ROUNDING`: a shared or batched forward has other float noise under its roundings); a
    quantizer whose range spans the tokens of a forward call, or an attention implementation without
    masks, adds its own.

    Args:
        model: The causal LM, with or without runtime quantization.

    Returns:
        The reasons, sorted and without duplicates; empty when the split is exact.

    """
    found: set[str] = set()
    if not builds_masks(model):
        impl = _attention_implementation(model)
        found.add(f"attention implementation {impl!r} gets no attention mask (a cached forward would be misaligned)")
    rt = installed_runtime(model)
    if rt is None or not rt.installed:
        return sorted(found)
    found.add(RUNTIME_ROUNDING)
    if rt.attention is not None and rt.attention.spec.granularity == "tensor":
        found.add("attention inputs quantized per tensor (one range over the tokens of a call)")
    quantizers = rt.activations.quantizers.values() if rt.activations is not None else ()
    if any(q.act.dynamic and q.act.spec.granularity == "tensor" for q in quantizers):
        found.add("dynamic per-tensor activation ranges (one range over the tokens of a call)")
    if rt.kv is not None:
        found.update(_kv_blockers(rt.kv.kv))
    return sorted(found)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def _pad(seqs: Sequence[Sequence[int]], device: torch.device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) padded with 0 and their mask (1 for real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def score_logits(logits: torch.Tensor, cont: Sequence[int]) -> Score:
    """Score a continuation from the logits that predict its tokens, as HFLM does.

    Args:
        logits: (len(cont), V): row j is the model's output before token ``cont[j]``.
        cont: The continuation's token ids.

    Returns:
        The sum of the tokens' log-probabilities (log-softmax in the logits' dtype), and whether every
        token is the argmax.

    """
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(list(cont), dtype=torch.long, device=logits.device)
    greedy = bool((logp.argmax(dim=-1) == target).all())
    return float(logp.gather(-1, target[:, None]).sum()), greedy


def _full_batches(requests: Sequence[Request], indices: list[int], batch_size: int, pad: bool) -> Iterator[list[int]]:
    """Batches of requests, longest first; only requests of one length share a batch when ``pad`` is False."""
    order = sorted(indices, key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    batch: list[int] = []
    for i in order:
        same = not batch or len(requests[i][0]) + len(requests[i][1]) == sum(map(len, requests[batch[0]]))
        if len(batch) == max(1, batch_size) or not (pad or same):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _score_full(model: Any, requests: Sequence[Request], indices: list[int], batch_size: int,
                params: set[str], out: list[Score | None], pad: bool = True) -> None:
    """One forward of context + continuation[:-1] per request, right-padded batches, longest first."""
    device = model_device(model)
    for chunk in _full_batches(requests, indices, batch_size, pad):
        fit_threads()
        seqs = [[*requests[i][0], *requests[i][1]][:-1] for i in chunk]
        ids, mask = _pad(seqs, device, left=False)
        first = min(len(requests[i][0]) - 1 for i in chunk)  # the first position whose logit is read
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = ids.shape[1] - first
        else:
            first = 0
        logits = model(input_ids=ids, **kwargs).logits
        for row, i in enumerate(chunk):
            ctx, cont = requests[i]
            start = len(ctx) - 1 - first
            out[i] = score_logits(logits[row, start : start + len(cont)], cont)


def _score_alone(model: Any, requests: Sequence[Request], indices: list[int], out: list[Score | None]) -> None:
    """One unpadded forward per request, called as lm-eval's HF model calls it at batch size 1."""
    device = model_device(model)
    for i in indices:
        fit_threads()
        ctx, cont = requests[i]
        ids = torch.tensor([[*ctx, *cont][:-1]], dtype=torch.long, device=device)  # (1, T)
        logits = model(ids).logits[0]  # (T, V)
        out[i] = score_logits(logits[len(ctx) - 1 : len(ctx) - 1 + len(cont)], cont)


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _score_shared(model: Any, requests: Sequence[Request], groups: list[tuple[tuple[int, ...], list[int]]],
                  batch_size: int, params: set[str], out: list[Score | None]) -> list[int]:
    """Score groups of requests that share a context; return the requests left for full forwards."""
    device = model_device(model)
    positions = "position_ids" in params
    # without position ids a padded context would be mispositioned: one context per forward then
    step = batch_size if positions else 1
    cache_name = cache_kwarg(model)
    left: list[int] = []

    def longest_first(group: tuple[tuple[int, ...], list[int]]) -> tuple[int, int]:
        # continuations outnumber contexts: a batch of similar continuation lengths pads least
        return -max(len(requests[i][1]) for i in group[1]), -len(group[0])

    for chunk in _batches(sorted(groups, key=longest_first), step):
        fit_threads()
        ctx_ids, ctx_mask = _pad([c for c, _ in chunk], device, left=True)
        kwargs: dict[str, Any] = {"attention_mask": ctx_mask, "use_cache": True}
        if positions:
            kwargs["position_ids"] = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        output = model(input_ids=ctx_ids, **kwargs)
        last = output.logits[:, -1:]  # (B, 1, V): the logit after each context
        rows = [(b, i) for b, (_, idx) in enumerate(chunk) for i in idx if len(requests[i][1]) > 1]
        cache = _cache_of(output)
        if rows and cache is None:
            log.debug("the model returned no cache: its continuations are scored in full forwards")
            left.extend(i for _, idx in chunk for i in idx)
            continue
        rest: dict[int, torch.Tensor] = {}  # request -> logits after its continuation's tokens but the last
        if rows:  # one forward for all (a forward of a few tokens costs about as much as reading the weights)
            select = torch.tensor([b for b, _ in rows], dtype=torch.long, device=device)
            cache.batch_select_indices(select)  # in place: the cache is not used again
            cont_ids, cont_mask = _pad([list(requests[i][1])[:-1] for _, i in rows], device, left=False)
            kwargs = {"attention_mask": torch.cat([ctx_mask[select], cont_mask], dim=1), cache_name: cache,
                      "use_cache": True}
            if positions:
                lengths = ctx_mask.sum(-1)[select]
                kwargs["position_ids"] = lengths[:, None] + torch.arange(cont_ids.shape[1], device=device)
            logits = model(input_ids=cont_ids, **kwargs).logits
            rest = {i: logits[r, : len(requests[i][1]) - 1] for r, (_, i) in enumerate(rows)}
        for b, (_, idx) in enumerate(chunk):
            for i in idx:
                out[i] = score_logits(torch.cat([last[b], rest[i]]) if i in rest else last[b], requests[i][1])
    return left


def scoring_path(model: Any) -> dict[str, Any]:
    """How :func:`score_requests` scores requests on ``model`` by default, and why (stored with a run).

    Returns:
        ``{"path": "alone" | "shared", "reasons": [...]}``: ``alone`` is one unpadded forward per request
        (lm-eval's own scoring at batch size 1, bit for bit); ``shared`` runs each shared context once.

    """
    reasons = split_blockers(model) if isinstance(model, nn.Module) else []
    return {"path": "alone" if reasons else "shared", "reasons": reasons}


@torch.no_grad()
def score_requests(model: Any, requests: Sequence[Request], *, batch_size: int = 1,
                   split: bool | None = None) -> list[Score]:
    """Score tokenized (context, continuation) requests, running each shared context once where that is exact.

    Requests must fit the model: ``len(context) + len(continuation) - 1`` at most its maximum length
    (:func:`truncate` does what HFLM does).

    Args:
        model: A causal LM in memory (a transformers model: ``input_ids``, ``attention_mask``, a cache).
        requests: (context ids, continuation ids) pairs, both non-empty.
        batch_size: Requests per forward when scored whole; distinct contexts per forward when shared
            (their continuations then run together in one more forward).
        split: Score continuations on their context's cache (True), in one padded forward per request
            (False), or decide from the runtime quantizers installed on the model (None, see
            :func:`scoring_path`: each request alone when there is one, else shared contexts).

    Returns:
        ``(sum of the continuation's log-probabilities, whether it is the greedy continuation)`` per
        request, in order.

    """
    if any(not ctx or not cont for ctx, cont in requests):
        raise ValueError("score_requests: every request needs a non-empty context and continuation")
    out: list[Score | None] = [None] * len(requests)
    if split is None:
        how = scoring_path(model)
        if how["path"] == "alone":
            log.debug("each request is scored alone: %s", "; ".join(how["reasons"]))
            _score_alone(model, requests, list(range(len(requests))), out)
            return [s for s in out if s is not None]
        split = True
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    shared = [(ctx, idx) for ctx, idx in groups.items() if split and len(idx) > 1]
    whole = [i for idx in groups.values() if not (split and len(idx) > 1) for i in idx]
    params = set(inspect.signature(model.forward).parameters)
    whole += _score_shared(model, requests, shared, batch_size, params, out)
    pad = builds_masks(model) if isinstance(model, nn.Module) else True
    _score_full(model, requests, whole, batch_size, params, out, pad)
    log.debug("scored %d requests: %d shared contexts, %d whole", len(requests), len(shared), len(whole))
    return [s for s in out if s is not None]


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """Left-truncate a request as HFLM does: context + continuation[:-1] keeps at most ``max_length`` tokens.

    Raises:
        ValueError: The continuation alone is longer than ``max_length``.

    """
    if len(continuation) > max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens is longer than max_length {max_length}")
    whole = [*context, *continuation][-(max_length + 1) :]
    return whole[: len(whole) - len(continuation)], list(continuation)


class PtqlabLM(TemplateLM):
    """An lm-eval model over a causal LM in memory, with HFLM's tokenization and shared-context scoring."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 1, max_length: int | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 scorer: Scorer = score_requests) -> None:
        """Wrap ``model`` (put in eval mode) and its tokenizer; ``scorer`` scores tokenized requests."""
        super().__init__()
        if isinstance(model, nn.Module):
            model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.add_bos_token = add_bos_token
        self.scorer = scorer
        self._max_length = max_length
        self._prefix_token_id = prefix_token_id
        self._hflm: Any = None

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token (the tokenizer's EOS)."""
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token that stands for an empty context: BOS, else EOS."""
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """The model's context length (config, else tokenizer, else 2048), as HFLM resolves it."""
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return int(resolve_max_length(getattr(self.model, "config", None), self.tokenizer, default=DEFAULT_MAX_LENGTH))

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name (fingerprints lm-eval's request caches)."""
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string``, with the tokenizer's special tokens unless it already starts with BOS."""
        special: dict[str, bool] = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **special))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``."""
        return str(self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[Score]:
        """Score tokenized requests ``(key, context ids, continuation ids)`` with the scorer."""
        pairs = [truncate(ctx, cont, self.max_length) for _, ctx, cont in requests]
        cut = sum(len(c) + len(t) > self.max_length + 1 for _, c, t in requests)
        if cut:
            log.warning("%d requests are longer than max_length %d: their contexts are left-truncated",
                        cut, self.max_length)
        scores = self.scorer(self.model, pairs, batch_size=self.batch_size)
        for (key, _, _), score in zip(requests, scores, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of ``max_length`` tokens (as HFLM)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[Any, list[int], list[int]]] = []
        owner: list[int] = []
        for n, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, by lm-eval's HFLM over the same model (made on first use)."""
        if self._hflm is None:
            from lm_eval.models.huggingface import HFLM

            self._hflm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                              max_length=self._max_length, add_bos_token=self.add_bos_token,
                              prefix_token_id=self._prefix_token_id)
        self._hflm.set_cache_hook(self.cache_hook)
        return list(self._hflm.generate_until(requests, disable_tqdm=disable_tqdm))
