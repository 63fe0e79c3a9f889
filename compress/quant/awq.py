"""AWQ: activation-aware weight scaling before quantization.

For each scaling pair ``prev → linears`` (a norm or linear feeding one or more linears),
multiplying the input columns of the linears by ``s`` and dividing the output channels of
``prev`` by ``s`` changes no float output. It changes the quantization error, though: input
channels that carry large activations get relatively finer quantization steps. AWQ picks

    s = x_mean^α                          (or  x_mean^α / w_mean^(1-α), "duo" scaling)

with α on a grid, minimizing the output error of the module that contains the linears
(``pair.inspect``) when the scaled linears are fake-quantized by the target quantizer.
An optional clipping search then shrinks each group's range where that lowers the output
error of the group.

AWQ is a transform only: it rewrites float weights; the following RTN or GPTQ stage
quantizes them.

GQA-aware v → o: with grouped KV heads one value channel (KV head k, dim d) feeds the
o_proj input column of dim d of every query head in group k. Dividing that v_proj row
(and bias) by s divides all of those attention-output columns by s, so all of the
corresponding o_proj columns are multiplied by s: one scale per value channel, expanded
over the heads of its group. The reference implementations skip this pair when heads
are grouped.

Pure math first (functions on tensors and single modules), the stage wrapper after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compress.arch import ScalingPair, head_counts
from compress.calibrate import LayerContext
from compress.quant import int4
from compress.quant.common import is_ignored
from compress.quant.int4 import QuantArgs

# Floors the reference implementations use to keep scales finite.
_EPS_W = 1e-4
_MIN_SCALE = 1e-4


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


class ChannelMeanAbs:
    """Running per-channel mean of |x| over every token seen (x: [..., channels])."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        s = flat.abs().sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += flat.shape[0]

    @property
    def mean(self) -> Tensor:
        if self.total is None:
            raise ValueError("no activations seen")
        return self.total / self.count


def channel_mean_abs(x: Tensor) -> Tensor:
    """Per-channel mean |x| over all tokens of ``x`` [..., channels]."""
    return x.detach().reshape(-1, x.shape[-1]).float().abs().mean(0)


def weight_mean(weights: list[Tensor], group_size: int) -> Tensor:
    """Per input channel mean of |w| normalized by the max |w| of its quantization group.

    ``weights`` are [out_i, in] matrices sharing an input; the result is [in].
    """
    w = torch.cat([x.detach().float() for x in weights], dim=0).abs()
    cols = w.shape[1]
    width = cols if group_size == -1 else group_size
    normalized = torch.empty_like(w)
    for start in range(0, cols, width):
        g = w[:, start : start + width]
        normalized[:, start : start + width] = g / g.amax(dim=1, keepdim=True).clamp(min=1e-12)
    return normalized.mean(0)


def alpha_grid(grid: int) -> list[float]:
    """α values searched: 0, 1/grid, ..., (grid-1)/grid (the reference grid)."""
    return [i / grid for i in range(grid)]


def awq_scales(x_mean: Tensor, w_mean: Tensor | None, alpha: float, duo: bool) -> Tensor:
    """Candidate scales for one α, normalized so that sqrt(max·min) = 1.

    Without duo scaling α = 0 gives exactly unit scales.
    """
    s = x_mean.float().pow(alpha)
    if duo:
        if w_mean is None:
            raise ValueError("duo scaling needs w_mean")
        s = s / (w_mean.float().pow(1 - alpha) + _EPS_W)
    s = s.clamp(min=_MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


# ---------------------------------------------------------------------------
# Grouped KV heads
# ---------------------------------------------------------------------------


def kv_group(heads: int, kv_heads: int) -> int:
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} KV groups")
    return heads // kv_heads


def expand_kv_scales(s: Tensor, heads: int, kv_heads: int) -> Tensor:
    """Per value-channel scales [kv_heads·d] → per o_proj input column [heads·d].

    Query head h reads KV head h // group, so its columns repeat that KV head's scales.
    """
    group = kv_group(heads, kv_heads)
    return s.reshape(kv_heads, -1).repeat_interleave(group, dim=0).reshape(-1)


def reduce_to_kv(stat: Tensor, heads: int, kv_heads: int) -> Tensor:
    """Per o_proj input column statistic [heads·d] → per value channel [kv_heads·d] (mean over the group)."""
    group = kv_group(heads, kv_heads)
    return stat.reshape(kv_heads, group, -1).mean(1).reshape(-1)


# ---------------------------------------------------------------------------
# Quantizer simulation and folding
# ---------------------------------------------------------------------------


def fake_quantize(w: Tensor, args: QuantArgs) -> Tensor:
    """RTN quantize-dequantize per group; same result as ``int4.fake_quantize``, vectorized."""
    out_features, in_features = w.shape
    width = args.group_width(in_features)
    if in_features % width:
        return int4.fake_quantize(w, args)
    rows = w.float().reshape(-1, width)
    scale, zero = int4.compute_qparams(rows, args)
    return int4.fake_quantize_rows(rows, scale, zero, args.maxq).reshape(out_features, in_features).to(w.dtype)


def quantized_scaled(w: Tensor, s_in: Tensor, args: QuantArgs) -> Tensor:
    """Q(w·s)/s: the effective weight seen by the unscaled input once s is folded."""
    wf = w.float()
    return fake_quantize(wf * s_in, args) / s_in


@torch.no_grad()
def scale_output_channels(module: nn.Module, s: Tensor) -> None:
    """Divide the output channels of a linear (rows, bias) or a norm (weight, bias) by ``s``."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"cannot fold scales into {type(module).__name__}: it has no weight")
    if isinstance(module, nn.Linear):
        weight.data = (weight.data.float() / s.unsqueeze(1)).to(weight.dtype)
    elif weight.dim() == 1:
        # Norms whose weight is an offset (Gemma's 1 + w) would need another rule.
        if "gemma" in type(module).__name__.lower():
            raise ValueError(f"cannot fold scales into {type(module).__name__} (offset weight)")
        weight.data = (weight.data.float() / s).to(weight.dtype)
    else:
        raise ValueError(f"cannot fold scales into {type(module).__name__}")
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data = (bias.data.float() / s).to(bias.dtype)


@torch.no_grad()
def scale_input_columns(linear: nn.Linear, s: Tensor) -> None:
    w = linear.weight
    w.data = (w.data.float() * s.unsqueeze(0)).to(w.dtype)


def fold_scales(prev: nn.Module, linears: list[nn.Linear], s_prev: Tensor, s_in: Tensor | None = None) -> None:
    """Fold a pair's scales: ``prev`` outputs / s_prev, linears' inputs · s_in (default s_prev).

    ``s_in`` differs from ``s_prev`` only for grouped v → o (see :func:`expand_kv_scales`).
    """
    s_in = s_prev if s_in is None else s_in
    device = prev.weight.device
    scale_output_channels(prev, s_prev.to(device))
    for lin in linears:
        scale_input_columns(lin, s_in.to(lin.weight.device))


# ---------------------------------------------------------------------------
# Scale search
# ---------------------------------------------------------------------------


@dataclass
class ScaleSearch:
    """Outcome of one pair's search: scales per ``prev`` output channel."""

    scales: Tensor
    alpha: float | None  # None: unit scales won (no α beat them)
    error: float
    unit_error: float
    errors: dict[float, float] = field(default_factory=dict)


def search_scales(
    x_mean: Tensor,
    w_mean: Tensor | None,
    loss: Callable[[Tensor], float],
    grid: int = 20,
    duo: bool = True,
    coarse_step: int = 1,
) -> ScaleSearch:
    """Grid search of α minimizing ``loss(scales)``; unit scales are always a candidate.

    ``loss`` maps candidate scales (per ``prev`` output channel) to the module's output
    error with the scaled linears quantized. Keeping unit scales as a candidate means AWQ
    never does worse on this objective than plain quantization (with duo scaling α = 0 is
    not the identity).

    ``coarse_step`` > 1 evaluates every ``coarse_step``-th α first, then halves the step
    around the best so far (for 20 points and step 4: 9 evaluations instead of 20). On an
    error curve with one minimum over the grid it finds the same α as the full search.
    """
    unit = torch.ones_like(x_mean, dtype=torch.float32)
    unit_error = float(loss(unit))
    best = ScaleSearch(unit, None, unit_error, unit_error)
    alphas = alpha_grid(grid)

    def evaluate(i: int) -> None:
        alpha = alphas[i]
        if alpha in best.errors:
            return
        if alpha == 0 and not duo:
            best.errors[alpha] = unit_error  # x_mean^0 is the identity
            return
        s = awq_scales(x_mean, w_mean, alpha, duo)
        err = float(loss(s))
        best.errors[alpha] = err
        if err < best.error:
            best.scales, best.alpha, best.error = s, alpha, err

    step = max(1, coarse_step)
    for i in range(0, grid, step):
        evaluate(i)
    while step > 1:
        step = max(1, step // 2)
        centre = alphas.index(min(best.errors, key=best.errors.__getitem__))
        for i in (centre - step, centre + step):
            if 0 <= i < grid:
                evaluate(i)
    return best


# ---------------------------------------------------------------------------
# Clipping search
# ---------------------------------------------------------------------------


def _range_bounds(w: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor]:
    """Per-row (lo, hi) of the quantizer's range for ``w`` [rows, k] (as int4.compute_qparams)."""
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    if args.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    return lo, hi


@torch.no_grad()
def clip_search(
    w: Tensor, x: Tensor, args: QuantArgs, grid: int = 20, max_shrink: float = 0.5, row_block: int = 1024
) -> tuple[Tensor, Tensor]:
    """Per (row, group) clipping bounds minimizing that group's output error on ``x``.

    ``w`` [out, in], ``x`` [tokens, in]. For each group the range (lo, hi) is shrunk by
    1 - i/grid for i < max_shrink·grid; the error of a group is the mean over tokens of
    (x_g · (Q(clamp(w_g)) - w_g))². Returns (lo, hi), each [out, groups]; clamping the
    weight to them makes the following quantizer use exactly the chosen range.
    """
    w = w.float()
    x = x.float().to(w.device)
    out_features, in_features = w.shape
    width = args.group_width(in_features)
    groups = args.num_groups(in_features)
    lo_best = torch.empty(out_features, groups, device=w.device)
    hi_best = torch.empty_like(lo_best)
    steps = max(1, int(max_shrink * grid))
    for g in range(groups):
        cols = slice(g * width, min((g + 1) * width, in_features))
        xg = x[:, cols]
        for r0 in range(0, out_features, row_block):
            wg = w[r0 : r0 + row_block, cols]
            lo0, hi0 = _range_bounds(wg, args)
            best_err = torch.full((wg.shape[0],), float("inf"), device=w.device)
            best_f = torch.ones_like(best_err)
            for i in range(steps):
                f = 1 - i / grid
                clipped = torch.maximum(torch.minimum(wg, (hi0 * f).unsqueeze(1)), (lo0 * f).unsqueeze(1))
                scale, zero = int4.compute_qparams(clipped, args)
                dq = int4.fake_quantize_rows(clipped, scale, zero, args.maxq)
                err = (xg @ (dq - wg).T).pow(2).mean(0)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_f = torch.where(better, torch.full_like(best_f, f), best_f)
            lo_best[r0 : r0 + row_block, g] = lo0 * best_f
            hi_best[r0 : r0 + row_block, g] = hi0 * best_f
    return lo_best, hi_best


def apply_clip(w: Tensor, lo: Tensor, hi: Tensor, group_size: int) -> Tensor:
    """Clamp ``w`` [out, in] to per (row, group) bounds [out, groups]."""
    g_idx = int4.default_g_idx(w.shape[1], group_size).to(w.device)
    return torch.maximum(torch.minimum(w.float(), hi[:, g_idx]), lo[:, g_idx]).to(w.dtype)


# ---------------------------------------------------------------------------
# Stage: orchestration on one decoder layer at a time
# ---------------------------------------------------------------------------


@dataclass
class _Calls:
    """Inputs and outputs of one module over every calibration batch."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def _recording(modules: dict[str, nn.Module], calls: dict[str, _Calls]) -> Iterator[None]:
    """Keep each named module's call arguments (kwargs included) and output."""
    handles = []
    for name, module in modules.items():
        rec = calls.setdefault(name, _Calls())

        def pre(_m, args, kwargs, rec=rec):
            rec.args.append(args)
            rec.kwargs.append(kwargs)

        def post(_m, _args, output, rec=rec):
            rec.outputs.append(_first(output))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _swapped_weights(linears: list[nn.Linear], weights: list[Tensor]) -> Iterator[None]:
    saved = [lin.weight.data for lin in linears]
    try:
        for lin, w in zip(linears, weights, strict=True):
            lin.weight.data = w.to(lin.weight.dtype)
        yield
    finally:
        for lin, w in zip(linears, saved, strict=True):
            lin.weight.data = w


@torch.no_grad()
def module_error(module: nn.Module, calls: _Calls) -> float:
    """Mean squared difference between ``module``'s outputs now and the recorded ones."""
    total, count = 0.0, 0
    for args, kwargs, ref in zip(calls.args, calls.kwargs, calls.outputs, strict=True):
        out = _first(module(*args, **kwargs))
        total += float((out.float() - ref.float()).pow(2).sum())
        count += ref.numel()
    return total / max(count, 1)


@dataclass
class PairRecord:
    layer: int
    prev: str
    alpha: float | None
    error: float
    unit_error: float


class AWQStage:
    """Searches and folds AWQ scales (and clipping) layer by layer; quantizes nothing."""

    name = "awq"
    needs_calibration = True

    def __init__(
        self,
        args: QuantArgs,
        grid: int = 20,
        duo_scaling: bool = True,
        clip: bool = True,
        clip_grid: int = 20,
        max_shrink: float = 0.5,
        gqa_aware_vo: bool = True,
        ignore: list[str] | None = None,
        clip_tokens: int = 512,
        coarse_step: int = 1,
    ):
        int4.check_args(args)
        self.args = args
        self.grid = grid
        self.duo_scaling = duo_scaling
        self.clip = clip
        self.clip_grid = clip_grid
        self.max_shrink = max_shrink
        self.gqa_aware_vo = gqa_aware_vo
        self.ignore = list(ignore or [])
        self.clip_tokens = clip_tokens
        self.coarse_step = coarse_step
        self.records: list[PairRecord] = []
        self.skipped: set[str] = set()

    @classmethod
    def from_recipe(cls, entry) -> AWQStage:
        from compress.recipe import RecipeError

        missing = [n for n in ("bits", "group_size", "symmetric") if getattr(entry, n) is None]
        if missing:
            raise RecipeError(f"awq: {', '.join(missing)} unset and no quantizing stage follows")
        return cls(
            QuantArgs(entry.bits, entry.group_size, entry.symmetric),
            grid=entry.grid,
            duo_scaling=entry.duo_scaling,
            clip=entry.clip,
            clip_grid=entry.clip_grid,
            max_shrink=entry.max_shrink,
            gqa_aware_vo=entry.gqa_aware_vo,
            ignore=entry.ignore,
            coarse_step=entry.coarse_step,
        )

    # -- which pairs and linears ------------------------------------------------

    def _quantized_names(self, ctx: LayerContext, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if not is_ignored(f"{ctx.name}.{n}", self.ignore)]

    def _pairs(self, ctx: LayerContext) -> list[ScalingPair]:
        heads, kv_heads, _ = head_counts(ctx.config)
        pairs = []
        for pair in ctx.arch.scaling_pairs:
            if not self._quantized_names(ctx, pair.linears):
                continue
            if pair.kv_to_heads and heads != kv_heads and not self.gqa_aware_vo:
                self.skipped.add(f"{pair.prev} → {', '.join(pair.linears)} (grouped KV heads)")
                continue
            pairs.append(pair)
        return pairs

    # -- one layer ---------------------------------------------------------------

    @torch.no_grad()
    def apply_layer(self, ctx: LayerContext) -> None:
        pairs = self._pairs(ctx)
        if pairs:
            self._scale_layer(ctx, pairs)
        if self.clip:
            self._clip_layer(ctx)

    def _scale_layer(self, ctx: LayerContext, pairs: list[ScalingPair]) -> None:
        # One forward records every pair's inspected module and input statistics. Folding a
        # pair preserves the float function, so the records stay valid for later pairs.
        calls: dict[str, _Calls] = {}
        stats = {pair.linears[0]: ChannelMeanAbs() for pair in pairs}
        hooks = {name: (lambda _m, inp, _o, acc=acc: acc.add(inp[0])) for name, acc in stats.items()}
        inspected = {pair.inspect: ctx.submodule(pair.inspect) for pair in pairs}
        with _recording(inspected, calls):
            ctx.forward(hooks, keep_outputs=False)
        heads, kv_heads, _ = head_counts(ctx.config)
        for pair in pairs:
            self._scale_pair(ctx, pair, stats[pair.linears[0]].mean, calls[pair.inspect], heads, kv_heads)

    def _scale_pair(
        self, ctx: LayerContext, pair: ScalingPair, x_mean: Tensor, calls: _Calls, heads: int, kv_heads: int
    ) -> None:
        prev = ctx.submodule(pair.prev)
        linears = [ctx.submodule(n) for n in pair.linears]
        quantized = [ctx.submodule(n) for n in self._quantized_names(ctx, pair.linears)]
        grouped = pair.kv_to_heads and heads != kv_heads
        w_mean = weight_mean([lin.weight for lin in linears], self.args.group_size) if self.duo_scaling else None
        if grouped:
            # Search one scale per value channel; o_proj columns get it once per query head.
            x_mean = reduce_to_kv(x_mean, heads, kv_heads)
            w_mean = reduce_to_kv(w_mean, heads, kv_heads) if w_mean is not None else None

            def to_inputs(s: Tensor) -> Tensor:
                return expand_kv_scales(s, heads, kv_heads)
        else:

            def to_inputs(s: Tensor) -> Tensor:
                return s

        module = ctx.submodule(pair.inspect)
        originals = [lin.weight.data for lin in quantized]

        def loss(s: Tensor) -> float:
            s_in = to_inputs(s).to(originals[0].device)
            trial = [quantized_scaled(w, s_in, self.args) for w in originals]
            with _swapped_weights(quantized, trial):
                return module_error(module, calls)

        result = search_scales(x_mean.to(ctx.device), w_mean, loss, self.grid, self.duo_scaling, self.coarse_step)
        if result.alpha is not None:
            fold_scales(prev, linears, result.scales, to_inputs(result.scales))
        self.records.append(PairRecord(ctx.index, pair.prev, result.alpha, result.error, result.unit_error))
        ctx.log.append(f"awq {pair.prev}: alpha={result.alpha} error {result.unit_error:.3g} -> {result.error:.3g}")

    def _clip_layer(self, ctx: LayerContext) -> None:
        # q/k are skipped as in the reference: their error passes through softmax, which the
        # per-linear output error does not model.
        skip = {ctx.arch.q_proj, ctx.arch.k_proj}
        names = [n for n in self._quantized_names(ctx, ctx.arch.linears) if n not in skip]
        if not names:
            return
        # A strided subsample of tokens, as the reference does, bounds cost and memory.
        step = max(1, ctx.inputs.num_tokens // self.clip_tokens)
        inputs: dict[str, list[Tensor]] = {n: [] for n in names}

        def keep(name: str, x: Tensor) -> None:
            inputs[name].append(x.detach().reshape(-1, x.shape[-1])[::step].clone())

        hooks = {n: (lambda _m, inp, _o, n=n: keep(n, inp[0])) for n in names}
        ctx.forward(hooks, keep_outputs=False)
        for name in names:
            x = torch.cat(inputs.pop(name))[: self.clip_tokens]
            lin = ctx.submodule(name)
            lo, hi = clip_search(lin.weight.data, x, self.args, self.clip_grid, self.max_shrink)
            lin.weight.data = apply_clip(lin.weight.data, lo, hi, self.args.group_size)

    # -- resume (compress/resume.py): the cross-layer state, as plain data ---------

    def resume_state(self) -> dict:
        return {
            "records": [[r.layer, r.prev, r.alpha, r.error, r.unit_error] for r in self.records],
            "skipped": sorted(self.skipped),
        }

    def load_resume_state(self, state: dict) -> None:
        self.records = [PairRecord(*r) for r in state["records"]]
        self.skipped = set(state["skipped"])

    # -- report ------------------------------------------------------------------

    @property
    def notes(self) -> list[str]:
        if not self.records:
            return []
        by_prev: dict[str, list[PairRecord]] = {}
        for r in self.records:
            by_prev.setdefault(r.prev, []).append(r)
        parts = []
        for prev, recs in by_prev.items():
            alphas = [r.alpha for r in recs if r.alpha is not None]
            gain = sum(r.unit_error for r in recs) / max(sum(r.error for r in recs), 1e-30)
            mean_alpha = f"{sum(alphas) / len(alphas):.2f}" if alphas else "-"
            parts.append(f"{prev}: scaled {len(alphas)}/{len(recs)} layers, mean α {mean_alpha}, error ÷{gain:.2f}")
        out = ["awq: " + "; ".join(parts)]
        if self.skipped:
            out.append("awq skipped: " + "; ".join(sorted(self.skipped)))
        return out
