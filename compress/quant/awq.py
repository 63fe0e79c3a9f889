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


def group_gram(x: Tensor, width: int) -> Tensor:
    """Per-group second moments of the inputs: [groups, width, width], H_g = X_g^T X_g / tokens.

    ``x`` [tokens, in]; a last group narrower than ``width`` is zero-padded (zero columns add
    nothing). With it the output error of a weight change Δ in group g, mean over tokens of
    (x_g · Δ)², is Δ H_g Δ^T: independent of the token count.
    """
    tokens, in_features = x.shape
    groups = -(-in_features // width)
    xp = torch.nn.functional.pad(x.float(), (0, groups * width - in_features)).reshape(tokens, groups, width)
    return torch.einsum("ngw,ngv->gwv", xp, xp) / max(tokens, 1)


@torch.no_grad()
def clip_search(
    w: Tensor, x: Tensor, args: QuantArgs, grid: int = 20, max_shrink: float = 0.5, row_block: int = 256
) -> tuple[Tensor, Tensor]:
    """Per (row, group) clipping bounds minimizing that group's output error on ``x``.

    ``w`` [out, in], ``x`` [tokens, in]. For each group the range (lo, hi) is shrunk by
    1 - i/grid for i < max_shrink·grid; the error of a group is the mean over tokens of
    (x_g · (Q(clamp(w_g)) - w_g))², computed as Δ H_g Δ^T from the group's input Gram
    matrix (:func:`group_gram`), for every shrink factor in one batched computation.
    Returns (lo, hi), each [out, groups]; clamping the weight to them makes the following
    quantizer use exactly the chosen range.
    """
    w = w.float()
    out_features, in_features = w.shape
    width = args.group_width(in_features)
    groups = args.num_groups(in_features)
    gram = group_gram(x.to(w.device), width)  # [G, w, w]
    # Zero-padded columns keep every range (lo <= 0 <= hi) and quantize to exactly zero.
    wp = torch.nn.functional.pad(w, (0, groups * width - in_features)).reshape(out_features, groups, width)
    steps = max(1, int(max_shrink * grid))
    factors = torch.tensor([1 - i / grid for i in range(steps)], device=w.device).view(steps, 1, 1)
    lo_best = torch.empty(out_features, groups, device=w.device)
    hi_best = torch.empty_like(lo_best)
    for r0 in range(0, out_features, row_block):
        block = wp[r0 : r0 + row_block]  # [r, G, w]
        r = block.shape[0]
        rows = block.reshape(-1, width)
        lo0, hi0 = _range_bounds(rows, args)  # [r·G]
        lo_f, hi_f = lo0.view(1, -1, 1) * factors, hi0.view(1, -1, 1) * factors  # [S, r·G, 1]
        clipped = torch.maximum(torch.minimum(rows.unsqueeze(0), hi_f), lo_f).reshape(-1, width)
        scale, zero = int4.compute_qparams(clipped, args)
        delta = (int4.fake_quantize_rows(clipped, scale, zero, args.maxq) - clipped).view(steps, r, groups, width)
        # Clamping moves w too: the error is against the unclipped weight.
        delta = delta + (clipped.view(steps, r, groups, width) - block.unsqueeze(0))
        err = (torch.einsum("srgw,gwv->srgv", delta, gram) * delta).sum(-1).reshape(steps, -1)  # [S, r·G]
        best = err.argmin(0)  # the first (least clipping) of equal errors
        f = factors.view(-1)[best]
        lo_best[r0 : r0 + r] = (lo0 * f).view(r, groups)
        hi_best[r0 : r0 + r] = (hi0 * f).view(r, groups)
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
    """Inputs and reference outputs of one module on the search subsample."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def even_positions(total: int, wanted: int) -> Tensor | None:
    """``wanted`` evenly spaced positions in ``range(total)``; None means all (wanted <= 0 or >= total)."""
    if wanted <= 0 or wanted >= total:
        return None
    return torch.linspace(0, total - 1, wanted).round().long().unique()


def pick_windows(batch_sizes: list[int], seq_len: int, wanted: int) -> list[list[int]]:
    """Evenly spaced whole windows holding at least ``wanted`` tokens, as row indices per batch.

    All windows when wanted <= 0 or there are not enough.
    """
    total = sum(batch_sizes)
    k = total if wanted <= 0 else min(total, -(-wanted // seq_len))
    chosen = {(i * total) // k for i in range(k)}
    rows, start = [], 0
    for b in batch_sizes:
        rows.append([w - start for w in range(start, start + b) if w in chosen])
        start += b
    return rows


def select_rows(obj, rows: Tensor, batch: int):
    """Rows ``rows`` of every tensor in ``obj`` (nested tuples, lists, dicts) whose first dimension is
    the batch; tensors broadcast over the batch (first dimension 1) and other values stay as they are."""
    if isinstance(obj, Tensor):
        return obj[rows.to(obj.device)] if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(select_rows(o, rows, batch) for o in obj)
    if isinstance(obj, list):
        return [select_rows(o, rows, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: select_rows(v, rows, batch) for k, v in obj.items()}
    return obj


class _TokenSampler:
    """Rows of the flattened token stream at fixed global positions, batch by batch."""

    def __init__(self, positions: Tensor | None):
        self.positions = positions
        self.offset = 0

    def take(self, x: Tensor) -> Tensor:
        """``x`` [..., C] of the current batch → the kept rows [k, C]; advances the offset."""
        flat = x.detach().reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if self.positions is None:
            rows = flat
        else:
            p = self.positions
            local = p[(p >= self.offset) & (p < self.offset + n)] - self.offset
            rows = flat[local.to(flat.device)]
        self.offset += n
        return rows.clone()


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
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


@dataclass
class _LayerRecord:
    """What one forward of a layer collects for the searches."""

    calls: dict[str, _Calls]  # inspected module → its calls on the search subsample
    x_mean: dict[str, Tensor]  # first linear of a pair → per input channel mean |x| (every token)
    clip_inputs: dict[str, Tensor]  # linear → its inputs on the clip subsample [tokens, in]


class AWQStage:
    """Searches and folds AWQ scales (and clipping) layer by layer; quantizes nothing.

    Cost control: the per-channel statistics use every calibration token, but the α search
    evaluates its loss on ``search_tokens`` of them (evenly spaced tokens for per-token
    modules, evenly spaced whole batches for attention, which needs whole sequences), and the
    clip search on ``clip_tokens``; 0 means all. One forward per layer records everything;
    inputs after folding are the recorded ones divided by the folded scales.
    """

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
        clip_tokens: int = 2048,
        coarse_step: int = 1,
        search_tokens: int = 4096,
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
        self.search_tokens = search_tokens
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
            search_tokens=entry.search_tokens,
            clip_tokens=entry.clip_tokens,
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

    def _clip_names(self, ctx: LayerContext) -> list[str]:
        # q/k are skipped as in the reference: their error passes through softmax, which the
        # per-linear output error does not model.
        if not self.clip:
            return []
        skip = {ctx.arch.q_proj, ctx.arch.k_proj}
        return [n for n in self._quantized_names(ctx, ctx.arch.linears) if n not in skip]

    # -- one layer ---------------------------------------------------------------

    @torch.no_grad()
    def apply_layer(self, ctx: LayerContext) -> None:
        pairs = self._pairs(ctx)
        clip_names = self._clip_names(ctx)
        if not pairs and not clip_names:
            return
        record = self._record(ctx, pairs, clip_names)
        heads, kv_heads, _ = head_counts(ctx.config)
        # Folding a pair preserves the float function, so the records stay valid for later
        # pairs; only the inputs of the pair's own linears change, by exactly 1/s_in.
        input_scales: dict[str, Tensor] = {}
        for pair in pairs:
            x_mean = record.x_mean[pair.linears[0]]
            s_in = self._scale_pair(ctx, pair, x_mean, record.calls[pair.inspect], heads, kv_heads)
            if s_in is not None:
                input_scales.update({n: s_in for n in pair.linears})
        for name in clip_names:
            x = record.clip_inputs.pop(name)
            if name in input_scales:
                x = x / input_scales[name].to(x.device)
            lin = ctx.submodule(name)
            lo, hi = clip_search(lin.weight.data, x, self.args, self.clip_grid, self.max_shrink)
            lin.weight.data = apply_clip(lin.weight.data, lo, hi, self.args.group_size)

    def _record(self, ctx: LayerContext, pairs: list[ScalingPair], clip_names: list[str]) -> _LayerRecord:
        """One forward: every inspected module's calls, the pairs' statistics, the clip inputs."""
        total = ctx.inputs.num_tokens
        hidden = ctx.inputs.hidden
        windows = pick_windows([h.shape[0] for h in hidden], hidden[0].shape[1], self.search_tokens)
        search_positions = even_positions(total, self.search_tokens)
        clip_positions = even_positions(total, self.clip_tokens)
        record = _LayerRecord({}, {}, {})
        handles = []
        per_token_parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {}

        for inspect in dict.fromkeys(p.inspect for p in pairs):
            module = ctx.submodule(inspect)
            calls = record.calls.setdefault(inspect, _Calls())
            if inspect == ctx.arch.attention:
                # Attention mixes tokens: keep whole windows (every argument, the mask included).
                count = [0]

                def pre(_m, args, kwargs, calls=calls, count=count):
                    rows = windows[count[0]]
                    if rows:
                        batch, index = hidden[count[0]].shape[0], torch.tensor(rows)
                        calls.args.append(select_rows(args, index, batch))
                        calls.kwargs.append(select_rows(kwargs, index, batch))

                def post(_m, args, output, calls=calls, count=count):
                    rows = windows[count[0]]
                    if rows:
                        out = _first(output).detach()
                        calls.outputs.append(select_rows(out, torch.tensor(rows), hidden[count[0]].shape[0]))
                    count[0] += 1

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post))
            else:
                # A per-token module (MLP, linear): evenly spaced tokens over every batch.
                sampler_in, sampler_out = _TokenSampler(search_positions), _TokenSampler(search_positions)
                parts = per_token_parts.setdefault(inspect, ([], []))

                def keep(_m, inp, output, parts=parts, s_in=sampler_in, s_out=sampler_out):
                    parts[0].append(s_in.take(inp[0]))
                    parts[1].append(s_out.take(_first(output)))

                handles.append(module.register_forward_hook(keep))

        stats = {pair.linears[0]: ChannelMeanAbs() for pair in pairs}
        for name, stat in stats.items():
            handles.append(ctx.submodule(name).register_forward_hook(lambda _m, i, _o, a=stat: a.add(i[0])))
        clip_parts: dict[str, list[Tensor]] = {}
        for name in clip_names:
            sampler = _TokenSampler(clip_positions)
            parts_c = clip_parts.setdefault(name, [])
            handles.append(
                ctx.submodule(name).register_forward_hook(
                    lambda _m, i, _o, s=sampler, p=parts_c: p.append(s.take(i[0]))
                )
            )

        with _hooks(handles):
            ctx.forward(keep_outputs=False)

        for inspect, (xs, ys) in per_token_parts.items():
            record.calls[inspect] = _Calls([(torch.cat(xs),)], [{}], [torch.cat(ys)])
        record.x_mean = {name: stat.mean for name, stat in stats.items()}
        record.clip_inputs = {name: torch.cat(parts) for name, parts in clip_parts.items()}
        return record

    def _scale_pair(
        self, ctx: LayerContext, pair: ScalingPair, x_mean: Tensor, calls: _Calls, heads: int, kv_heads: int
    ) -> Tensor | None:
        """Search and fold one pair's scales; returns the scales folded into the linears' inputs."""
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
        self.records.append(PairRecord(ctx.index, pair.prev, result.alpha, result.error, result.unit_error))
        ctx.log.append(f"awq {pair.prev}: alpha={result.alpha} error {result.unit_error:.3g} -> {result.error:.3g}")
        if result.alpha is None:
            return None
        s_in = to_inputs(result.scales)
        fold_scales(prev, linears, result.scales, s_in)
        return s_in


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
