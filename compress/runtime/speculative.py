"""Exact speculative decoding: a cheap draft proposes k tokens, the target checks them in one pass.

The acceptance rule (Leviathan et al. 2023; Chen et al. 2023) keeps the target's distribution
exactly: accept draft token x with probability min(1, p(x) / q(x)); at the first rejection
sample from normalize(max(0, p - q)); when all k are accepted take a bonus token from the
target's k+1-th distribution. Greedy decoding is the special case where x is accepted iff it is
the target's argmax, so the output is token for token the target's own greedy output.

Models are reached through one small protocol, a *step*: ``step(tokens [1, T], input_pos [T])
-> logits [1, T, V]``, backed by a KV cache indexed by position. A rejected draft token leaves
stale entries at positions past the accepted prefix; the next step writes those positions
again before anything reads them (attention is causal by position), so nothing is copied or
rolled back: we only remember how many positions of each cache are valid.

Drafts: another model (``ModelDraft``, any step), or prompt lookup (``PromptLookupDraft``,
n-gram matches against the text so far, no model). Batch size 1.

What makes it pay on a CPU (``generate_runtime``): the target's float32 linears are packed once
for oneDNN (``pack_for_verification``), so verifying k + 1 tokens costs about one decode step
(ATen's matmul took twice that for 2-9 rows); and a draft of the target's shape (a self-draft)
takes the target's keys and values instead of computing its own (``ModelDraft(kv_source=...)``):
no draft prefill, and it agrees with the target far more often.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.runtime.sampling import SamplingParams, logits_to_probs


class Step(Protocol):
    """A model with a position-indexed KV cache: logits for ``tokens`` placed at ``input_pos``."""

    def __call__(self, tokens: Tensor, input_pos: Tensor) -> Tensor: ...


# The runtime's sampling transform, applied alike to target and draft: the speculative output then
# follows the transformed target distribution exactly (greedy: one-hot of the argmax).
Sampling = SamplingParams
probabilities = logits_to_probs
GREEDY = Sampling()


def sample(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """One token from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """normalize(max(0, p - q)): what to sample from after rejecting a draft token.

    When p <= q everywhere (only possible up to rounding, since then p == q and rejection has
    probability zero) it falls back to p.
    """
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p


def verify(
    draft_tokens: Tensor,
    draft_probs: Tensor | None,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative acceptance for one sequence: (number of accepted draft tokens, next token).

    draft_tokens [k]; draft_probs [k, V] the distributions they were drawn from, or None for a
    deterministic draft (a point mass q = 1 at the proposed token, as for prompt lookup);
    target_probs [k + 1, V]: the target's distribution at each draft position plus one.
    The returned next token is the resampled token after the first rejection, or the bonus
    token when all k are accepted; so n + 1 tokens are produced in total.
    """
    k = draft_tokens.numel()
    idx = torch.arange(k)
    p_x = target_probs[idx, draft_tokens]
    q_x = draft_probs[idx, draft_tokens] if draft_probs is not None else torch.ones(k)
    u = torch.rand(k, generator=generator)
    # P(u < p/q) = min(1, p/q) for u uniform on [0, 1).
    rejected = (u * q_x >= p_x).nonzero()
    if rejected.numel() == 0:
        return k, sample(target_probs[k], generator)
    n = int(rejected[0])
    if draft_probs is None:
        q = torch.zeros_like(target_probs[n])
        q[draft_tokens[n]] = 1.0
    else:
        q = draft_probs[n]
    return n, sample(residual_distribution(target_probs[n], q), generator)


def verify_greedy(draft_tokens: Tensor, target_best: Tensor) -> tuple[int, int]:
    """Greedy acceptance: draft tokens are kept while they equal the target's argmax.

    ``target_best`` [k + 1]: the target's argmax at each draft position plus one.
    """
    best = target_best
    k = draft_tokens.numel()
    mismatch = (draft_tokens != best[:k]).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else k
    return n, int(best[n])


class Draft(Protocol):
    """Proposes up to k tokens that continue ``tokens``."""

    def propose(
        self, tokens: list[int], k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> tuple[list[int], Tensor | None]:
        """(proposed tokens, their draft distributions [len, V] or None for a point mass)."""
        ...

    def keep(self, valid: int) -> None:
        """Only the first ``valid`` positions of ``tokens`` are final (a later propose sees them)."""
        ...


class ModelDraft:
    """A draft model behind a step with its own position-indexed cache.

    ``valid`` counts the leading positions whose cache entries hold final tokens; each propose
    first feeds the tokens from there on (the whole prompt the first time), then k - 1 single
    tokens. Stale entries after a rejection are overwritten by that catch-up feed.

    ``kv_source``: the target model, when the draft has its shape (a self-draft: same layers,
    KV heads and head size). Instead of computing keys and values for the prompt and the accepted
    tokens itself, the draft copies the target's, which the target computed anyway: the draft's
    prefill (on CPU nearly the target's own cost) disappears, and the draft conditions on the
    target's exact context. Only the proposal changes, never the output.

    ``draft_steps``: a runtime model takes its draft's one-token path (``Transformer._draft_step``,
    rounded differently from the target's forward, ~30 operators a layer instead of 50).
    """

    def __init__(self, step: Step, device: torch.device | str = "cpu", kv_source: nn.Module | None = None,
                 draft_steps: bool = True):
        self.step = step
        if draft_steps and hasattr(step, "draft_steps"):
            # A runtime model's one-token steps as a draft's (Transformer._draft_step): fewer operators.
            step.draft_steps = True
        self.device = torch.device(device)
        self.valid = 0
        self.passes = 0
        self.kv_source = kv_source
        self.copied = 0  # positions taken from kv_source

    def reset(self) -> None:
        self.valid = 0

    def _logits(self, tokens: list[int], start: int) -> Tensor:
        self.passes += 1
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)
        return self.step(ids, pos)[0, -1]

    def propose(self, tokens, k, sampling, generator):
        if k <= 0:
            return [], None
        n = len(tokens)
        # The target's cache holds final entries for every position but the last token's.
        if self.kv_source is not None and n - 1 > self.valid:
            copy_kv(self.kv_source, self.step, self.valid, n - 1)
            self.copied += n - 1 - self.valid
            self.valid = n - 1
        logits = self._logits(tokens[self.valid :], self.valid)
        out: list[int] = []
        dists: list[Tensor] = []
        for i in range(k):
            if sampling.greedy:
                out.append(int(logits.argmax()))
            else:
                q = probabilities(logits, sampling).cpu()
                dists.append(q)
                out.append(sample(q, generator))
            if i < k - 1:
                logits = self._logits(out[-1:], n + i)
        # Positions n .. n+k-2 now hold draft tokens 0 .. k-2; the last one was never fed.
        self.valid = n + k - 1
        return out, (torch.stack(dists) if dists else None)

    def keep(self, valid: int) -> None:
        self.valid = min(self.valid, valid)


def _kv_caches(model: nn.Module) -> list[tuple[Tensor, Tensor]] | None:
    layers = getattr(model, "layers", None)
    if layers is None:
        return None
    caches = [getattr(layer.attention, "kv_cache", None) for layer in layers]
    if any(c is None for c in caches):
        return None
    return [(c.k_cache, c.v_cache) for c in caches]


def kv_compatible(target: nn.Module, draft: nn.Module) -> bool:
    """Whether ``draft`` can take ``target``'s keys and values: same layers, KV heads, head size, positions."""
    t, d = getattr(target, "args", None), getattr(draft, "args", None)
    if t is None or d is None:
        return False
    same = ("num_layers", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "sliding_window")
    return all(getattr(t, f) == getattr(d, f) for f in same)


def copy_kv(source: nn.Module, dest: nn.Module, start: int, stop: int) -> None:
    """Copy cache positions [start, stop) of every layer from ``source`` to ``dest`` (casting the dtype)."""
    src, dst = _kv_caches(source), _kv_caches(dest)
    if src is None or dst is None or len(src) != len(dst):
        raise ValueError("copy_kv needs two runtime models with set-up caches and the same number of layers")
    for (sk, sv), (dk, dv) in zip(src, dst):
        dk[:, :, start:stop].copy_(sk[:, :, start:stop])
        dv[:, :, start:stop].copy_(sv[:, :, start:stop])


def prompt_lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the text's last n-gram.

    Longest n-gram first (max_ngram down to min_ngram); among occurrences of one n-gram the
    most recent wins, since recent text predicts the continuation best.
    """
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = tokens[length - n :]
        # Start positions of candidate matches, latest first, excluding the tail itself.
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow
    return []


class PromptLookupDraft:
    """Prompt-lookup draft (n-gram match against prompt and generated text); no model, no cache."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.passes = 0

    def reset(self) -> None:
        pass

    def propose(self, tokens, k, sampling, generator):
        return prompt_lookup(tokens, k, self.max_ngram, self.min_ngram), None

    def keep(self, valid: int) -> None:
        pass


@dataclass
class SpeculativeStats:
    """Counts of one generation; rates as properties."""

    new_tokens: int = 0
    target_passes: int = 0  # verification passes after the prefill
    draft_passes: int = 0
    proposed: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    k_history: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens produced per target pass during decoding (the prefill's first token excluded)."""
        return (self.new_tokens - 1) / self.target_passes if self.target_passes else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_passes": self.target_passes,
            "draft_passes": self.draft_passes,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_pass": self.tokens_per_pass,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "decode_tokens_per_second": self.decode_tokens_per_second,
        }


def next_k(k: int, proposed: int, accepted: int, k_min: int, k_max: int) -> int:
    """Adaptive k: one longer after a fully accepted proposal, one shorter after a rejection."""
    if proposed == 0:
        return k
    return min(k + 1, k_max) if accepted == proposed else max(k - 1, k_min)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speculative_generate(
    target: Step,
    draft: Draft,
    prompt: list[int],
    max_new_tokens: int,
    k: int = 4,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    adaptive: bool = False,
    k_max: int | None = None,
    stop_tokens: tuple[int, ...] | set[int] = (),
    max_seq_len: int | None = None,
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[int], SpeculativeStats]:
    """Generate up to ``max_new_tokens`` after ``prompt``; returns (new tokens, stats).

    The target's cache must be empty or hold garbage: it is filled from position 0. With
    ``adaptive`` the proposal length moves between 1 and ``k_max`` (default 2k).
    ``max_seq_len`` is the caches' length: proposals are cut so no position reaches it.
    """
    if not prompt:
        raise ValueError("speculative_generate needs a non-empty prompt")
    device = torch.device(device)
    stats = SpeculativeStats()
    k_max = k_max or (2 * k if adaptive else k)
    limit = max_seq_len if max_seq_len is not None else 1 << 62
    if len(prompt) + max_new_tokens > limit:
        max_new_tokens = max(0, limit - len(prompt))
    if max_new_tokens <= 0:
        return [], stats
    stop = set(stop_tokens)
    draft.keep(0)
    draft_passes_before = getattr(draft, "passes", 0)

    t0 = clock()
    logits = target(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device))[0, -1]
    if sampling.greedy:
        first = int(logits.argmax())
    else:
        first = sample(probabilities(logits, sampling).cpu(), generator)
    _sync(device)
    stats.prefill_seconds = clock() - t0

    tokens = [*prompt, first]
    new = [first]
    t0 = clock()
    while len(new) < max_new_tokens and new[-1] not in stop:
        n_ctx = len(tokens)  # the last token is not in the target's cache yet
        # n accepted + 1 produced must fit both the budget and the cache.
        budget = min(k, max_new_tokens - len(new) - 1, limit - n_ctx)
        proposal, q = draft.propose(tokens, budget, sampling, generator) if budget > 0 else ([], None)
        proposal = proposal[:budget]
        q = q[: len(proposal)] if q is not None else None
        ids = torch.tensor([tokens[-1:] + proposal], device=device)
        pos = torch.arange(n_ctx - 1, n_ctx + len(proposal), device=device)
        target_logits = target(ids, pos)[0]
        stats.target_passes += 1
        drafted = torch.tensor(proposal, dtype=torch.long)
        if sampling.greedy:
            n, nxt = verify_greedy(drafted, target_logits.argmax(-1).cpu())
        else:
            n, nxt = verify(drafted, q, probabilities(target_logits, sampling).cpu(), generator)
        stats.proposed += len(proposal)
        stats.accepted += n
        stats.k_history.append(len(proposal))
        produced = [*proposal[:n], nxt]
        for i, t in enumerate(produced):
            if t in stop:
                produced = produced[: i + 1]
                break
        tokens.extend(produced)
        new.extend(produced)
        # Target cache: positions up to the last accepted draft token are final.
        draft.keep(n_ctx + n)
        if adaptive:
            k = next_k(k, len(proposal), n, 1, k_max)
    _sync(device)
    stats.decode_seconds = clock() - t0
    stats.new_tokens = len(new)
    stats.draft_passes = getattr(draft, "passes", 0) - draft_passes_before
    return new, stats


@torch.no_grad()
def plain_generate(
    target: Step,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    stop_tokens: tuple[int, ...] | set[int] = (),
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[int], SpeculativeStats]:
    """One token per target pass, with the same sampling and statistics as the speculative loop."""
    return speculative_generate(
        target, _NoDraft(), prompt, max_new_tokens, k=0, sampling=sampling, generator=generator,
        stop_tokens=stop_tokens, device=device, clock=clock,
    )


class _NoDraft:
    passes = 0

    def propose(self, tokens, k, sampling, generator):
        return [], None

    def keep(self, valid: int) -> None:
        pass


# --------------------------------------------------------------------------- a verify pass at one step's cost

# Rows up to which a packed linear runs: a verification pass has k + 1 <= 17 rows; longer inputs
# (a prefill) keep F.linear.
PACKED_MAX_ROWS = 16
# The row count the weights are packed for: oneDNN picks one blocked layout for any count from 4 up
# (measured alike for 2 to 13 rows), so one packing serves every k and adaptive k never repacks.
PACK_ROWS = 8


def packed_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU builds with MKL-DNN)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """A float linear that also holds its weight in oneDNN's blocked layout, for passes of a few rows.

    On CPU, ATen's float32 matmul repacks the weight on every call: 2 to 9 rows cost about twice a
    one-row step, so verifying k draft tokens cost two decode steps. Packed once, k + 1 rows cost
    about one step (the weights are read once either way). One row (plain decoding) and long inputs
    (a prefill) keep ``F.linear``: those passes compute exactly what the unpacked model computes.
    ``weight`` and ``bias`` are the original tensors (shared, e.g. a head tied to the embedding).
    """

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = rows
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] == 1 or x2.shape[0] > PACKED_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def as_function(self, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """The forward of 2-D inputs as a closure (the runtime's streamlined forward takes these)."""
        weight, bias, packed, linear, pointwise = self.weight, self.bias, self.packed, F.linear, \
            torch.ops.mkldnn._linear_pointwise

        def fn(x: Tensor) -> Tensor:
            rows = x.shape[0]
            if rows == 1 or rows > PACKED_MAX_ROWS:
                return linear(x, weight, bias)
            return pointwise(x.contiguous(), packed, bias, "none", [], "")

        return fn

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, packed for {self.rows} rows"


def _model_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(holder, attribute) of every linear of a runtime Transformer: per layer q/k/v, o, gate/up, down; the head."""
    slots = []
    for layer in model.layers:
        slots += [(layer.attention, "wqkv"), (layer.attention, "wo"),
                  (layer.feed_forward, "w13"), (layer.feed_forward, "w2")]
    return [*slots, (model, "output")]


def pack_for_verification(model: nn.Module, rows: int) -> int:
    """Swap the float linears of a CPU runtime model for ``PackedLinear`` packed for ``rows`` rows.

    In place and idempotent; float32 linears only (int4 and 16-bit ones are left alone). Returns
    how many linears were (re)packed. No-op on CUDA or without oneDNN.
    """
    device = getattr(model, "device", torch.device("cpu"))
    if torch.device(device).type != "cpu" or not packed_linear_available():
        return 0
    count = 0
    for holder, name in _model_linears(model):
        module = getattr(holder, name)
        if isinstance(module, PackedLinear) and module.rows == rows:
            continue
        if not isinstance(module, (nn.Linear, PackedLinear)) or module.weight.dtype != torch.float32:
            # int4 linears (their kernel packs once already); 16-bit ones, whose one-row path the
            # runtime routes around oneDNN (a packed module would not keep that path bit for bit).
            continue
        setattr(holder, name, PackedLinear(module, rows))
        count += 1
    if count and hasattr(model, "_plan"):
        # The runtime's streamlined forwards rebuild their closures from the new modules.
        model._plan = model._draft_plan = None
    return count


# --------------------------------------------------------------------------- runtime glue and CLI

PROMPT_LOOKUP = ("prompt-lookup", "lookup")


def open_draft(spec: str, target, backend: str = "auto", head: str = "float", share_kv: bool = True):
    """(draft, draft runtime or None, description) for ``--draft``: a checkpoint or 'prompt-lookup'.

    ``head='int4'`` quantizes the draft's float output layer at load: a fifth of a small model's
    weights, and a draft only has to be fast and agree often (the output stays exact).
    ``share_kv``: a draft of the target's shape takes the target's keys and values (meant for
    drafts built from the target; an unrelated model of the same shape is better off without).
    """
    from compress.runtime.errors import RuntimeInputError

    if spec in PROMPT_LOOKUP:
        return PromptLookupDraft(), None, "prompt lookup"
    from compress.runtime.generate import load

    try:
        draft_rt = load(spec, device=target.device, backend=backend, head=head)
    except ValueError as e:  # a back end that cannot run on the device
        raise RuntimeInputError(str(e)) from e
    check_same_vocabulary(target, draft_rt)
    source = target.model if share_kv and kv_compatible(target.model, draft_rt.model) else None
    description = f"draft {spec} ({draft_rt.info.quant_format}{', target KV' if source is not None else ''})"
    return ModelDraft(draft_rt.model, target.device, kv_source=source), draft_rt, description


def check_same_vocabulary(target, draft) -> None:
    """A model draft must share the target's tokenizer: same ids for the same text."""
    from compress.runtime.errors import RuntimeInputError

    vt, vd = target.model.args.vocab_size, draft.model.args.vocab_size
    if vt != vd:
        raise RuntimeInputError(f"the draft's vocabulary has {vd} entries, the target's {vt}: they must match")
    if target.tokenizer is not None and draft.tokenizer is not None:
        if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise RuntimeInputError("the draft's tokenizer differs from the target's: they must be the same")


def cache_length(prompt_len: int, max_new_tokens: int, k: int, context: int) -> int:
    """Static cache length, rounded up to 64 so nearby requests reuse one allocation."""
    need = prompt_len + max_new_tokens + k + 1
    return min(-(-need // 64) * 64, context)


def generate_runtime(
    target,
    draft: Draft,
    draft_rt,
    prompt_ids: list[int],
    max_new_tokens: int,
    k: int = 4,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    adaptive: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[int], SpeculativeStats]:
    """Speculative generation on runtime models (``compress.runtime.load``); EOS ends it, excluded."""
    from compress.runtime.errors import RuntimeInputError

    context = target.context_length
    if draft_rt is not None:
        context = min(context, draft_rt.context_length)
    if len(prompt_ids) >= context:
        raise RuntimeInputError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}")
    k_max = 2 * k if adaptive else k
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    length = cache_length(len(prompt_ids), max_new_tokens, k_max, context)
    # Verify passes (k + 1 tokens), and a model draft's catch-up feeds (2 tokens), on packed weights.
    pack_for_verification(target.model, PACK_ROWS)
    target.model.setup_caches(1, length)
    target.model.slice_kv = True
    if draft_rt is not None:
        pack_for_verification(draft_rt.model, PACK_ROWS)
        draft_rt.model.setup_caches(1, length)
        draft_rt.model.slice_kv = True
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        tokens, stats = speculative_generate(
            target.model, draft, prompt_ids, max_new_tokens, k=k, sampling=sampling, generator=generator,
            adaptive=adaptive, k_max=k_max, stop_tokens=target.eos_ids, max_seq_len=length,
            device=target.device, clock=clock,
        )
    if tokens and tokens[-1] in target.eos_ids:
        tokens = tokens[:-1]
    return tokens, stats


def cli_generate(args, llm) -> int:
    """``compress generate CKPT --draft DRAFT|prompt-lookup [--speculate-k K]``: text, then statistics.

    Runs plain decoding first on the same prompt and settings, to report the speedup (and, when
    greedy, whether the outputs are identical, as they must be).
    """
    import sys

    from compress.runtime.errors import RuntimeInputError

    k = args.speculate_k
    if k < 1:
        raise RuntimeInputError("--speculate-k must be >= 1")
    adaptive = bool(getattr(args, "speculate_adaptive", False))
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    backend = "cpu" if args.backend == "kernel" and llm.device.type == "cpu" else args.backend
    share_kv = getattr(args, "draft_kv", "target") == "target"
    draft, draft_rt, description = open_draft(args.draft, llm, backend, getattr(args, "draft_head", "float"), share_kv)
    ids = llm.encode(args.prompt, args.chat)
    if not ids:
        raise RuntimeInputError("empty prompt")

    # Warm-up: first passes pay for allocations and kernel selection; not timed.
    llm.generate_ids([ids], 4, sampling, args.seed)
    generate_runtime(llm, draft, draft_rt, ids, 4, k, sampling, args.seed, adaptive)

    plain = llm.generate_ids([ids], args.max_new_tokens, sampling, args.seed)
    tokens, stats = generate_runtime(llm, draft, draft_rt, ids, args.max_new_tokens, k, sampling, args.seed, adaptive)
    sys.stdout.write(llm.decode(tokens) + "\n")
    plain_tps = plain.decode_tokens_per_s
    speedup = stats.decode_tokens_per_second / plain_tps if plain_tps else 0.0
    same = ""
    if sampling.greedy:
        identical = tokens == plain.tokens[0]
        same = "; output identical to plain greedy" if identical else "; OUTPUT DIFFERS from plain greedy"
    print(
        f"[speculative, {description}, k={k}{' adaptive' if adaptive else ''}] acceptance {stats.acceptance_rate:.1%}, "
        f"{stats.tokens_per_pass:.2f} tokens per target pass, decode {stats.new_tokens - 1} tokens at "
        f"{stats.decode_tokens_per_second:.1f} tok/s vs plain {plain_tps:.1f} tok/s: {speedup:.2f}x{same}",
        file=sys.stderr,
    )
    return 0
