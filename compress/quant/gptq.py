"""GPTQ (Frantar et al., 2022): column-by-column quantization with second-order error feedback.

For a linear layer with weight W [out, in] and calibration inputs X [n, in], GPTQ minimizes
‖XWᵀ − XŴᵀ‖² one input column at a time: after rounding column j, the rounding error,
divided by the j-th diagonal entry of the upper Cholesky factor U of H⁻¹ (H = 2/n·XᵀX),
is propagated to the not-yet-quantized columns along row j of U. Updates are applied
lazily: inside a block of ``block_size`` columns immediately, to the columns after the
block once per block (one matrix product), which is what makes it fast.

This module follows the reference implementation (the GPTQ authors' ``gptq.py``, AutoGPTQ /
GPTQModel, llm-compressor's ``gptq_quantize.py``) in: the float32 Hessian, dead columns
(zero diagonal: weight set to 0, diagonal set to 1), dampening as a fraction of the mean
diagonal, the Cholesky inverse, and the two act-order kinds. It differs where the
reference has known rough edges:

* a Cholesky failure raises the dampening (×10 each time, up to the whole mean diagonal
  and then beyond) instead of crashing or producing NaN, and says so in ``notes``;
* group parameters are computed from the *current* (error-updated) weights of the group
  even when a group starts inside a block (the reference reads stale weights there);
* the ``static`` act-order kind computes every group's parameters on the original column
  order before permuting, so groups stay contiguous and no ``g_idx`` is needed;
* codes are produced with :mod:`compress.quant.int4` (float16-representable scales), so the
  weights GPTQ propagates errors against are exactly those export writes.

Everything here is a pure function of tensors; :class:`GPTQStage` is the thin part that
collects Hessians on the layer-by-layer engine. Its true-sequential order costs one layer
forward on Llama-family layers: the layer is walked sub-block by sub-block (:class:`_LlamaWalk`),
each group of linears quantized when the walk reaches it, and the walk's result is the
layer's output (the engine skips its own forward). Other layers are re-run from their start
for each group of linears (:meth:`GPTQStage.collect_hessians`), which gives the same result.

``float_target`` (GPTAQ, Li et al. 2025) changes what GPTQ fits: plain GPTQ makes each linear
reproduce its own outputs on the inputs the partly quantized model gives it, so the drift of
the earlier layers is taken as truth; with a float target the stage also walks a float copy of
the layer on the float model's hidden states, and fits the float model's outputs (or part of
the way towards them) instead: a change of target weight (:func:`float_target_weight`), then
the same GPTQ.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from compress.calibrate import LayerContext, empty_in_storage, to_storage, transients_on_heap
from compress.quant import int4
from compress.quant.common import QuantizingStage
from compress.quant.int4 import QuantArgs, QuantizedWeight, check_args, compute_qparams, fake_quantize_rows

log = logging.getLogger("compress")

ActOrder = Literal["none", "static", "g_idx"]
ACT_ORDERS: tuple[str, ...] = ("none", "static", "g_idx")


class GPTQError(ValueError):
    """Input GPTQ cannot work with (shapes, non-finite Hessian, bad options); one line."""


@dataclass(frozen=True)
class MSEGrid:
    """Clip search per group (the reference quantizer's ``mse`` option).

    Tries shrink factors 1, 1 − 1/grid, ... down to 1 − max_shrink and keeps, per output
    row, the one with the least Σ|w − ŵ|^norm. ``patience``: stop once that many shrinks
    in a row improved no row (llm-compressor's observer stops the same way); None tries
    them all. On the embedded model no group's best shrink lies below 0.75 (1 − 24/100),
    so the reference's 80 steps mostly go to waste: with patience 5 the search costs a
    third as much and picked the same shrink as the full search for every group of 5
    sampled layers (276,480 rows, sym and asym).
    """

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4
    patience: int | None = 5


@dataclass
class GPTQResult:
    qweight: QuantizedWeight
    damp: float  # the dampening finally added to the diagonal (absolute)
    damp_fraction: float  # ... as a fraction of the mean diagonal
    damp_increased: bool
    dead_columns: int
    loss: float  # Σ (w − q)² / U_jj² / 2: the reference's estimate of the output error increase
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Pieces shared by the blocked implementation and the slow reference in the tests
# ---------------------------------------------------------------------------


def group_qparams(w: Tensor, args: QuantArgs, mse: MSEGrid | None = None) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero of one group ``w`` [out, k], optionally searching a clip."""
    scale, zero = compute_qparams(w, args)
    if mse is None:
        return scale, zero
    w = w.float()
    best = (fake_quantize_rows(w, scale, zero, args.maxq) - w).abs_().pow_(mse.norm).sum(dim=1)
    stale = 0
    for i in range(1, int(mse.max_shrink * mse.grid)):
        s, z = compute_qparams(w, args, 1.0 - i / mse.grid)
        err = (fake_quantize_rows(w, s, z, args.maxq) - w).abs_().pow_(mse.norm).sum(dim=1)
        better = err < best
        if not bool(better.any()):
            stale += 1
            if mse.patience is not None and stale >= mse.patience:
                break
            continue
        stale = 0
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def rtn_quantize(w: Tensor, args: QuantArgs, mse: MSEGrid | None = None) -> QuantizedWeight:
    """Round to nearest per contiguous group, with the same (optional) clip search as GPTQ."""
    return int4.quantize(w, args, qparams=lambda cols, a: group_qparams(cols, a, mse))


def prepare_hessian(h: Tensor, w: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """H (float, dead diagonal set to 1; a copy unless ``overwrite``), a copy of W (dead columns
    zeroed), and the dead mask."""
    if h.dim() != 2 or h.shape[0] != h.shape[1] or h.shape[0] != w.shape[1]:
        raise GPTQError(f"Hessian of shape {tuple(h.shape)} does not fit a weight of shape {tuple(w.shape)}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    if not torch.isfinite(h).all():
        raise GPTQError("the Hessian has non-finite entries (inf or NaN calibration activations)")
    h = h.to(dtype, copy=not overwrite)
    w = w.to(dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return h, w, dead


_DAMP_TRIES = 12


def _raised_dampings(h: Tensor, damp_fraction: float, mean_diag: float, restore: bool = False) -> Iterator[float]:
    """Damp ``h`` in place, λ = fraction · mean_diag, for fraction = damp_fraction, ×10, ... (12
    tries); yields each fraction with H's diagonal set to its undamped values plus λ. Dampening only
    touches the diagonal, so H itself is the damped matrix (n x n buffers are the stage's largest
    transients: down_proj's 1536²), its undamped diagonal kept for the retries. ``restore``: put
    the undamped diagonal back when the generator is done or closed."""
    diag = h.diagonal()
    undamped = diag.clone()
    fraction = damp_fraction
    try:
        for _ in range(_DAMP_TRIES):
            diag.copy_(undamped).add_(fraction * mean_diag)
            yield fraction
            fraction *= 10.0
    finally:
        if restore:
            diag.copy_(undamped)


def inverse_cholesky(h: Tensor, damp_fraction: float) -> tuple[Tensor, float, float, int]:
    """Upper Cholesky factor of (H + λI)⁻¹, with λ = damp_fraction · mean(diag H).

    When a factorization fails (H singular or badly conditioned in float32) λ grows ×10
    until it succeeds. Returns (U, λ, the fraction used, retries). ``h`` is damped in place:
    its diagonal is left with λ added (the caller's copy is spent).
    """
    mean_diag = torch.diag(h).mean().item()  # a contiguous copy: the strided view sums in another order
    if not mean_diag > 0:
        mean_diag = 1.0
    for attempt, fraction in enumerate(_raised_dampings(h, damp_fraction, mean_diag)):
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info.item() == 0 and torch.isfinite(upper).all() and (torch.diag(upper) > 0).all():
                return upper, fraction * mean_diag, fraction, attempt
    raise GPTQError("Cholesky factorization failed even with dampening 10^11 × the requested one")


def act_order_permutation(h: Tensor) -> Tensor:
    """Columns by decreasing Hessian diagonal (stable, so equal diagonals keep their order)."""
    return torch.argsort(torch.diag(h), descending=True, stable=True)


def float_target_weight(
    weight: Tensor, hessian: Tensor, cross: Tensor, damp_fraction: float, strength: float = 1.0
) -> Tensor:
    """The weight GPTQ should aim at when this linear's inputs have drifted from the float model's.

    GPTAQ (Li et al., 2025), as a change of target. With X the float model's inputs of the
    linear, X̃ those it receives in the partly quantized model, H = 2/n·X̃ᵀX̃ and
    ``cross`` = 2/n·X̃ᵀ(X − X̃), the minimizer of ‖X̃W'ᵀ − XWᵀ‖² + λ‖W' − W‖² (2/n-scaled) is

        W' = W + W·crossᵀ·(H + λI)⁻¹,   λ = damp_fraction · mean(diag H),

    and for every Ŵ that objective is (Ŵ − W')(H + λI)(Ŵ − W')ᵀ summed over rows, plus a
    constant: exactly the loss GPTQ with dampening λ minimizes. So GPTQ on (W', H) fits the
    *float* model's outputs from the inputs the quantized model really gives this linear,
    instead of re-fitting its own drifted outputs. With X̃ = X (cross = 0), W' = W.

    ``strength`` α scales the cross term: the target outputs become X̃Wᵀ + α(X − X̃)Wᵀ, from the
    quantized model's own (α = 0: plain GPTQ) to the float model's (α = 1). Less than 1 keeps the
    least-squares correction from fitting the calibration tokens' noise (GPTQModel's GPTAQ
    defaults to 0.25 for the same reason).

    Returns W' in float32 (float64 for a float64 weight); ``hessian`` is left unchanged.
    """
    if hessian.shape != cross.shape or hessian.dim() != 2 or hessian.shape[0] != weight.shape[1]:
        raise GPTQError(
            f"Hessian {tuple(hessian.shape)} and cross term {tuple(cross.shape)} do not fit a weight "
            f"of shape {tuple(weight.shape)}"
        )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if not (torch.isfinite(hessian).all() and torch.isfinite(cross).all()):
        raise GPTQError("the Hessian or the cross term has non-finite entries")
    w = weight.to(dtype)
    mean_diag = torch.diag(hessian).mean().item()
    if not mean_diag > 0 or strength == 0:  # no input at all, or no correction asked
        return w.clone()
    # Damped in place and restored after (one n x n buffer less) when H is already of this dtype.
    in_place = hessian.dtype == dtype
    damped = hessian if in_place else hessian.to(dtype)
    cross_w = cross.to(dtype) @ w.T
    dampings = _raised_dampings(damped, damp_fraction, mean_diag, restore=in_place)  # as inverse_cholesky
    try:
        for _ in dampings:
            chol, info = torch.linalg.cholesky_ex(damped)
            if info.item() == 0:
                correction = torch.cholesky_solve(cross_w, chol)  # (H + λI)⁻¹ · cross · Wᵀ
                if strength != 1.0:
                    correction.mul_(strength)
                if torch.isfinite(correction).all():
                    return w + correction.T
    finally:
        dampings.close()
    raise GPTQError("Cholesky factorization failed even with dampening 10^11 × the requested one")


# ---------------------------------------------------------------------------
# The blocked algorithm
# ---------------------------------------------------------------------------


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    args: QuantArgs,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: ActOrder = "static",
    mse: MSEGrid | bool | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [out, in] given the Hessian [in, in] of its inputs."""
    return run_gptq(weight, hessian, args, damp_percent, block_size, act_order, mse).qweight


def run_gptq(
    weight: Tensor,
    hessian: Tensor,
    args: QuantArgs,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: ActOrder = "static",
    mse: MSEGrid | bool | None = None,
    overwrite_hessian: bool = False,
    cuda_graphs: SweepGraphs | bool = True,
) -> GPTQResult:
    """:func:`gptq_quantize` with what happened on the way (dampening, dead columns, loss).

    ``overwrite_hessian``: work in the caller's (float32) Hessian buffer instead of a copy,
    leaving it permuted and damped: one n x n buffer less for a caller that is done with it.
    ``cuda_graphs``: on a GPU, replay the sweep's blocks from CUDA graphs when the group
    parameters are fixed beforehand (act-order 'static', or one group per row): True captures
    them for this call, a :class:`SweepGraphs` reuses its captures across calls, False sweeps
    eagerly. The result is the same."""
    check_args(args)
    if act_order not in ACT_ORDERS:
        raise GPTQError(f"act_order must be one of {', '.join(ACT_ORDERS)}, got '{act_order}'")
    if not 0 < damp_percent < 1:
        raise GPTQError(f"damp_percent must be between 0 and 1, got {damp_percent}")
    if block_size < 1:
        raise GPTQError(f"block_size must be positive, got {block_size}")
    if mse is True:
        mse = MSEGrid()
    elif mse is False:
        mse = None
    if cuda_graphs is True:
        cuda_graphs = SweepGraphs() if weight.is_cuda else None
    graphs = cuda_graphs or None
    with _one_thread_on_cpu(weight.device):
        return _run_gptq(weight, hessian, args, damp_percent, block_size, act_order, mse, overwrite_hessian, graphs)


def _run_gptq(
    weight: Tensor,
    hessian: Tensor,
    args: QuantArgs,
    damp_percent: float,
    block_size: int,
    act_order: ActOrder,
    mse: MSEGrid | None,
    overwrite_hessian: bool = False,
    graphs: SweepGraphs | None = None,
) -> GPTQResult:
    h, w, dead = prepare_hessian(hessian, weight, overwrite_hessian)
    out_features, columns = w.shape
    width = args.group_width(columns)
    groups = args.num_groups(columns)
    notes: list[str] = []

    # Group parameters fixed before any error feedback: one group per row, or act-order
    # 'static' (computed on the original column order, so groups stay contiguous).
    fixed_params = args.group_size == -1 or act_order == "static"
    scales = torch.empty(out_features, groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out_features, groups, dtype=torch.int32, device=w.device)
    if fixed_params:
        for g in range(groups):
            s, z = group_qparams(w[:, g * width : min((g + 1) * width, columns)], args, mse)
            scales[:, g], zeros[:, g] = s, z

    perm = act_order_permutation(h) if act_order != "none" else None
    # The sweep works on Wᵀ in processing order (see _blocked_updates), made in one copy; W is done.
    wt = (w.T if perm is None else w.T.index_select(0, perm)).contiguous()
    del w
    if perm is not None:
        rows = h.index_select(0, perm)
        torch.index_select(rows, 1, perm, out=h)  # into H's own buffer: two n x n live, not three
        del rows
    # group_of[j]: group of the j-th processed column.
    if fixed_params:
        original = perm if perm is not None else torch.arange(columns, device=wt.device)
        group_of = (original // width).tolist()
    else:
        group_of = [j // width for j in range(columns)]

    hinv, damp, fraction, retries = inverse_cholesky(h, damp_percent)
    del h
    if retries:
        notes.append(
            f"dampening raised from {damp_percent:g} to {fraction:g} of the mean Hessian diagonal "
            "(Cholesky failed: Hessian singular or badly conditioned)"
        )
    if dead.any():
        notes.append(f"{int(dead.sum())} dead input column(s) (never active in calibration): weights set to 0")

    losses = torch.zeros(out_features, dtype=torch.float32, device=wt.device)
    codes_t = _blocked_updates(
        wt, hinv, losses, scales, zeros, group_of, fixed_params, width, args, mse, block_size, graphs
    ).to(torch.uint8)  # whole numbers 0..maxq: exact, and a quarter of the float32 buffer from here on

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes_t = codes_t.index_select(0, inverse)
        if not fixed_params:
            # Column perm[j] was quantized j-th, in group j // width of the processing order.
            g_idx = (inverse // width).to(torch.int32)
    codes = codes_t.T.contiguous()
    qweight = QuantizedWeight(codes, scales, zeros, args.bits, args.group_size, args.symmetric, g_idx)
    return GPTQResult(qweight, damp, fraction, retries > 0, int(dead.sum()), float(losses.sum()), notes)


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """GPTQ on CPU is thousands of small operations and a few modest factorizations:
    thread hand-offs cost more than they save (on 2 busy shared cores, 15x more), so
    run it on one thread. Hessian accumulation (the big products) keeps every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _blocked_updates(
    wt: Tensor,
    hinv: Tensor,
    losses: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_of: list[int],
    fixed_params: bool,
    width: int,
    args: QuantArgs,
    mse: MSEGrid | None,
    block_size: int,
    graphs: SweepGraphs | None = None,
) -> Tensor:
    """The GPTQ sweep over the rows of ``wt`` (Wᵀ, columns of W in processing order; updated in
    place); fills losses, scales and zeros and returns the codes, transposed as ``wt``.

    With ``fixed_params`` False, a group's scale and zero are computed when its first
    column is reached, from the weights as updated so far. With them fixed and ``graphs``
    given, each block's column loop runs on its buffers (on a GPU: replayed from a CUDA graph).

    Works on Wᵀ: column j of W is then the contiguous row j, so each step's reads, writes
    and the rank-1 update of the block's remaining columns run on contiguous memory (about
    3x faster than on strided columns), and each column's codes and error are written in
    place instead of copied.
    """
    columns, out_features = wt.shape
    maxq = args.maxq
    codes_t = torch.empty(columns, out_features, dtype=torch.float32, device=wt.device)
    # Per-group parameters as contiguous rows, looked up once per column.
    scales_t = scales.T.contiguous()
    zeros_t = zeros.T.float().contiguous()
    dequantized = torch.empty(out_features, dtype=torch.float32, device=wt.device)
    code_rows, scale_rows, zero_rows = codes_t.unbind(0), scales_t.unbind(0), zeros_t.unbind(0)
    # One copy to the device for the whole weight (a copy from Python waits for the GPU).
    group_index = torch.tensor(group_of, device=wt.device) if graphs is not None and fixed_params else None
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        hinv1 = hinv[i1:i2, i1:i2]
        if group_index is not None:
            err1 = graphs.sweep(wt[i1:i2], hinv1, scales_t, zeros_t, group_index[i1:i2], codes_t[i1:i2], maxq)
        elif fixed_params:
            err1 = torch.empty_like(wt[i1:i2])
            _sweep_block(
                wt[i1:i2],  # a view: the in-block updates land in wt
                hinv1,
                _divisors(hinv1),
                [scale_rows[g] for g in group_of[i1:i2]],
                [zero_rows[g] for g in group_of[i1:i2]],
                code_rows[i1:i2],
                err1.unbind(0),
                dequantized,
                maxq,
            )
        else:
            err1 = _sweep_block_finding_groups(
                wt, hinv, i1, i2, code_rows, scales_t, zeros_t, dequantized, width, args, mse, maxq
            )
        losses += (err1 * err1).sum(dim=0).float() / 2
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1
    scales.copy_(scales_t.T)
    zeros.copy_(zeros_t.T.to(torch.int32))
    return codes_t


def _divisors(hinv1: Tensor) -> list:
    """The block's diagonal of U, one divisor per column: Python floats on the CPU (the fastest
    there); 0-dim tensors on a GPU, where dividing by a Python float multiplies by its
    reciprocal instead (one bit apart), so that eager and graph-replayed sweeps agree."""
    diag = torch.diag(hinv1)
    return diag.tolist() if diag.device.type == "cpu" else list(diag.unbind(0))


def _quantize_column(col: Tensor, scale: Tensor, zero: Tensor, divisor, maxq: int, code_out: Tensor,
                     dequantized: Tensor, err_out: Tensor) -> Tensor:
    """Codes of one column into ``code_out``; returns its scaled error (w − ŵ) / U_jj in ``err_out``.
    The arithmetic of int4.quantize_codes / dequantize_codes, in place."""
    c = torch.div(col.float(), scale, out=code_out).round_().add_(zero).clamp_(0, maxq)
    q = torch.sub(c, zero, out=dequantized).mul_(scale)
    return torch.sub(col, q, out=err_out).div_(divisor)


def _sweep_block(w1: Tensor, hinv1: Tensor, divisors, scale_rows, zero_rows, code_rows, err_rows,
                 dequantized: Tensor, maxq: int) -> None:
    """The column loop of one block whose group parameters are known (one row per column):
    quantize column i, then push its error into the block's later columns (a rank-1 update).
    Allocates nothing, so it can be captured in a CUDA graph (:class:`SweepGraphs`)."""
    n = w1.shape[0]
    # Row views made once per block: indexing a tensor costs more than the small ops here.
    w_rows, h_rows = w1.unbind(0), hinv1.unbind(0)
    for i in range(n):
        err = _quantize_column(
            w_rows[i], scale_rows[i], zero_rows[i], divisors[i], maxq, code_rows[i], dequantized, err_rows[i]
        )
        if i + 1 < n:
            w1[i + 1 :].addr_(h_rows[i][i + 1 :], err, alpha=-1)


def _sweep_block_finding_groups(wt: Tensor, hinv: Tensor, i1: int, i2: int, code_rows, scales_t: Tensor,
                                zeros_t: Tensor, dequantized: Tensor, width: int, args: QuantArgs,
                                mse: MSEGrid | None, maxq: int) -> Tensor:
    """The column loop of one block when each group's parameters are computed as its first column
    is reached, from the weights updated so far (act-order 'none' or 'g_idx'); returns the block's
    errors."""
    columns = wt.shape[0]
    w1 = wt[i1:i2]  # a view: the in-block updates land in wt
    err1 = torch.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    divisors = _divisors(hinv1)
    w_rows, err_rows, h_rows = w1.unbind(0), err1.unbind(0), hinv1.unbind(0)
    scale_rows, zero_rows = scales_t.unbind(0), zeros_t.unbind(0)
    for i in range(i2 - i1):
        j = i1 + i
        g = j // width
        if j % width == 0:
            current = _current_group(wt, err1, hinv, i1, i2, j, min(j + width, columns))
            s, z = group_qparams(current.T, args, mse)
            scales_t[g], zeros_t[g] = s, z.float()  # in place: the row views see it
        err = _quantize_column(
            w_rows[i], scale_rows[g], zero_rows[g], divisors[i], maxq, code_rows[j], dequantized, err_rows[i]
        )
        if i + 1 < i2 - i1:
            w1[i + 1 :].addr_(h_rows[i][i + 1 :], err, alpha=-1)
    return err1


class SweepGraphs:
    """CUDA graphs of :func:`_sweep_block`, one per block shape, replayed for every block of that
    shape. On a GPU the sweep is thousands of tiny kernels (nine per column), each costing more
    to launch from Python than to run; a replay launches a block's worth at once (1.5x faster
    GPTQ on the embedded model on an H200). Results are bit-identical to the eager sweep (the
    same kernels in the same order, on copies of the same numbers). Keep one for a run: a
    capture costs about as much as the block itself. Every shape's buffers (a block of weights,
    codes, errors and per-column parameters) are views of one arena sized for the largest, since
    only one block is swept at a time: 8 MB on the embedded model instead of 18 for its six
    shapes (by their sizes). Off a GPU, or if a capture fails (then with a log line), the same buffers are swept
    eagerly, which is how the tests check this path on the CPU."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}
        self._arenas: dict[str, Tensor] = {}
        self.failed = False

    def sweep(
        self, w1: Tensor, hinv1: Tensor, scales_t: Tensor, zeros_t: Tensor, groups: Tensor, codes_out: Tensor, maxq: int
    ) -> Tensor:
        """The sweep of one block: its codes into ``codes_out``; returns the block's errors (a
        buffer of this object's, valid until its next call). ``w1`` itself is left as it was."""
        key = (tuple(w1.shape), w1.dtype, w1.device, maxq)
        if key not in self._entries:
            buffers = self._buffers(key)  # may grow the arenas, which drops every other entry
            self._entries[key] = (self._capture(key, buffers), buffers)
        graph, buffers = self._entries[key]
        w, h, diag, s, z, codes, err, _ = buffers
        w.copy_(w1)
        h.copy_(hinv1)
        diag.copy_(torch.diagonal(hinv1))
        torch.index_select(scales_t, 0, groups, out=s)
        torch.index_select(zeros_t, 0, groups, out=z)
        if graph is not None:
            graph.replay()
        else:
            self._run(buffers, maxq)
        codes_out.copy_(codes)
        return err

    def _buffers(self, key: tuple) -> tuple:
        """Views of the arenas for blocks of this shape (weights, H block, its diagonal, scales,
        zeros, codes, errors, one dequantized column), the weights' dtype or float32."""
        (n, out), dtype, device, _ = key
        main = self._arena("main", [n * out, n * n, n, n * out], dtype, device)
        params = self._arena("params", [n * out, n * out, n * out, out], torch.float32, device)
        w, h, diag, err = main
        s, z, codes, dequantized = params
        for t in (w, h, err, z, codes, dequantized):
            t.zero_()
        diag.fill_(1.0)  # the warm-up divides by it
        s.fill_(1.0)
        blocks = (t.view(n, out) for t in (w, s, z, codes, err))
        w, s, z, codes, err = blocks
        return w, h.view(n, n), diag, s, z, codes, err, dequantized

    def _arena(self, role: str, sizes: list[int], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Consecutive flat views of the given sizes in the arena for ``role``; a larger arena
        replaces one too small or of another dtype or device, and the entries made on the old
        one are dropped (captured again when next needed)."""
        arena = self._arenas.get(role)
        if arena is None or arena.numel() < sum(sizes) or arena.dtype != dtype or arena.device != device:
            self._entries.clear()
            self._arenas.pop(role, None)
            arena = self._arenas[role] = torch.empty(sum(sizes), dtype=dtype, device=device)
        views, start = [], 0
        for size in sizes:
            views.append(arena[start : start + size])
            start += size
        return views

    @staticmethod
    def _run(buffers: tuple, maxq: int) -> None:
        w, h, diag, s, z, codes, err, dequantized = buffers
        divisors = list(diag.unbind(0))  # 0-dim tensors: see _divisors
        _sweep_block(w, h, divisors, s.unbind(0), z.unbind(0), codes.unbind(0), err.unbind(0), dequantized, maxq)

    def _capture(self, key: tuple, buffers: tuple) -> torch.cuda.CUDAGraph | None:
        """The graph of a block's sweep on ``buffers`` (None off a GPU, or if capturing fails)."""
        device, maxq = key[2], key[3]
        if device.type != "cuda" or self.failed:
            return None
        try:
            # Warm up on a side stream first, as torch.cuda.graphs asks.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._run(buffers, maxq)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run(buffers, maxq)
        except Exception as e:  # any failure: the eager sweep is always right
            self.failed = True
            log.warning("GPTQ: CUDA graph capture failed (%s); sweeping eagerly", e)
            return None
        return graph


def _current_group(wt: Tensor, err1: Tensor, hinv: Tensor, i1: int, i2: int, start: int, end: int) -> Tensor:
    """Weights of processed columns [start, end) with every update so far applied, as rows.

    Inside the block they are up to date in ``wt``; past the block, ``wt`` still lacks the
    updates of the block's columns already quantized (applied lazily at the block's end).
    """
    inside = wt[start : min(end, i2)]
    if end <= i2:
        return inside
    done = start - i1
    beyond = wt[i2:end] - hinv[i1:start, i2:end].T @ err1[:done]
    return torch.cat([inside, beyond], dim=0)


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Records for consecutive row ranges of ``qw`` (one per stacked linear)."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(
            QuantizedWeight(
                qw.codes[rows].clone(),
                qw.scales[rows].clone(),
                qw.zeros[rows].clone(),
                qw.bits,
                qw.group_size,
                qw.symmetric,
                None if qw.g_idx is None else qw.g_idx.clone(),
            )
        )
        start += n
    return out


class PackedCodesWeight(QuantizedWeight):
    """A :class:`QuantizedWeight` keeping 4-bit codes two to a byte.

    A run holds every linear's record until export: as uint8 codes that is a byte per
    weight (106 MB on the embedded model, a fifth of the float32 model), half of it waste.
    ``codes`` unpacks on access (read-only: a write to the unpacked tensor is not kept), so
    to every consumer this is a QuantizedWeight.
    """

    @property
    def codes(self) -> Tensor:
        packed = self._packed_codes
        both = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
        return both[:, : self._columns]

    @codes.setter
    def codes(self, value: Tensor) -> None:
        if value.dtype != torch.uint8 or value.dim() != 2 or (value.numel() and int(value.max()) > 15):
            raise GPTQError("packed codes need a 2-D uint8 tensor of 4-bit values")
        self._columns = value.shape[1]
        if value.shape[1] % 2:
            value = torch.nn.functional.pad(value, (0, 1))
        pairs = value.reshape(value.shape[0], -1, 2)
        self._packed_codes = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return (self._packed_codes.shape[0], self._columns)

    @classmethod
    def of(cls, qw: QuantizedWeight) -> QuantizedWeight:
        """``qw`` with packed codes when it has 4 bits; otherwise ``qw`` itself."""
        if qw.bits != 4 or isinstance(qw, cls):
            return qw
        return cls(qw.codes, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.symmetric, qw.g_idx)


def hessian_from_inputs(x: Tensor) -> Tensor:
    """H = 2/n · Σ x xᵀ over the n rows of ``x`` [..., in], in float32."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2.0 / x.shape[0] * (x.T @ x)


# ---------------------------------------------------------------------------
# The stage: Hessians from the layer-by-layer engine, true-sequential order
# ---------------------------------------------------------------------------


class HessianAccumulator:
    """Running Σ x xᵀ (float32) and token count for one input; :meth:`hessian` gives 2/n·Σ.

    Only the blocks on and above the diagonal are accumulated (rows in bands of
    ``band`` features, each against the columns from its own on): the product is
    symmetric, so this saves up to half the work (46% of the products at 1536 features, 38%
    at 576, in bands of 128: narrower ones multiply no faster on one CPU thread), and the
    mirrored result is exactly symmetric.
    """

    band = 128

    def __init__(self, features: int, device: torch.device):
        self.sum: Tensor | None = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        features = x.shape[1]
        for i in range(0, features, self.band):
            rows = slice(i, min(i + self.band, features))
            self.sum[rows, i:].addmm_(x[:, rows].T, x[:, i:])
        self.tokens += x.shape[0]

    def hessian(self) -> Tensor:
        """2/n·Σ x xᵀ; built in the accumulator's own buffer, which it hands over (call once)."""
        if self.tokens == 0:
            raise GPTQError("no calibration tokens reached this linear")
        if self.sum is None:
            raise GPTQError("hessian() already taken from this accumulator")
        h, self.sum = self.sum, None
        h.triu_()
        return h.add_(h.triu(diagonal=1).T).mul_(2.0 / self.tokens)


class CrossAccumulator:
    """Running Σ x̃ (x − x̃)ᵀ (float32) over the tokens of two aligned inputs of one linear:
    x̃ as the partly quantized model gives it, x as the float model does. :meth:`value`
    gives 2/n·Σ, the ``cross`` of :func:`float_target_weight`.

    ``product_dtype`` (e.g. bfloat16): each call's product is made in that dtype (x̃ and the
    drift rounded to it, the drift formed in float32 first) and summed in float32; about twice
    as fast where the hardware multiplies it natively. The drift term only corrects the target
    (scaled by α), so its rounding (2⁻⁹ relative) is far below its sampling noise."""

    def __init__(self, features: int, device: torch.device, product_dtype: torch.dtype | None = None):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.product_dtype = None if product_dtype == torch.float32 else product_dtype

    def add(self, x_quantized: Tensor, x_float: Tensor, float_is_spare: bool = False) -> None:
        """``float_is_spare``: ``x_float`` is a float32 copy nothing else reads, so the drift
        x − x̃ is formed in it (one input-sized buffer less)."""
        if x_quantized.shape != x_float.shape:
            raise GPTQError(f"inputs of shapes {tuple(x_quantized.shape)} and {tuple(x_float.shape)} do not align")
        xq = x_quantized.reshape(-1, x_quantized.shape[-1])
        x_float = x_float.reshape(-1, x_float.shape[-1])
        if float_is_spare and x_float.dtype == torch.float32:
            drift = x_float.sub_(xq)
        else:
            drift = x_float.float() - xq.float()
        if self.product_dtype is None:
            self.sum.addmm_(xq.float().T, drift)
        else:
            self.sum.add_(xq.to(self.product_dtype).T @ drift.to(self.product_dtype))
        self.tokens += xq.shape[0]

    def value(self) -> Tensor:
        if self.tokens == 0:
            raise GPTQError("no calibration tokens reached this linear")
        return self.sum.mul_(2.0 / self.tokens)

    def take(self) -> Tensor:
        """:meth:`value`, handing over the accumulator's buffer (so that it can be freed as soon
        as its user is done with it)."""
        value = self.value()
        self.sum = None
        return value


class _StopLayer(Exception):
    pass


# Lower precisions the calibration forward may run its products in (autocast only lowers precision).
ComputeDtype = Literal["bfloat16", "float16"]
COMPUTE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast(fn: Callable, device: torch.device, dtype: torch.dtype | None) -> Callable:
    """``fn`` run under autocast to ``dtype`` on ``device``'s type (None: ``fn`` itself)."""
    if dtype is None:
        return fn

    def autocast_fn(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            return fn(*args, **kwargs)

    return autocast_fn


def _row_chunks(batch: Tensor, chunk: int | None) -> list[slice]:
    """Slices of ``batch``'s rows (windows), ``chunk`` at a time (None: one slice, the whole batch)."""
    windows = batch.shape[0] if batch.dim() >= 3 else 1
    if chunk is None or windows <= chunk:
        return [slice(None)]
    return [slice(k, k + chunk) for k in range(0, windows, chunk)]


def _first_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _batch_rows(obj, batch: int, rows: slice):
    """``obj`` (layer arguments) with every tensor of ≥ 2 dims and ``batch`` rows cut to ``rows``."""
    if isinstance(obj, Tensor):
        return obj[rows] if obj.dim() >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_batch_rows(o, batch, rows) for o in obj)
    if isinstance(obj, dict):
        return {k: _batch_rows(v, batch, rows) for k, v in obj.items()}
    return obj


def _input_of(module: nn.Module, call) -> Tensor:
    """Run ``call()`` up to the moment ``module`` is called; return that call's input."""
    seen: list[Tensor] = []

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _StopLayer

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        call()
    except _StopLayer:
        pass
    finally:
        handle.remove()
    if not seen:
        raise GPTQError(f"the forward never reached {type(module).__name__}")
    return seen[0]


def _llama_names(ctx: LayerContext) -> dict[str, str] | None:
    """Sub-module names of a pre-norm attention + gated-MLP layer, or None if it is not one."""
    a = ctx.arch
    seq = a.sequential
    if len(seq) != 4 or set(seq[0]) != {a.q_proj, a.k_proj, a.v_proj} or seq[1] != (a.o_proj,) or len(seq[3]) != 1:
        return None
    if not all(n.startswith(a.mlp + ".") for n in (*seq[2], *seq[3])):
        return None
    names = {
        "input_norm": a.input_norm,
        "attention": a.attention,
        "o_proj": a.o_proj,
        "post_norm": a.post_attention_norm,
        "mlp": a.mlp,
        "down": seq[3][0],
    }
    try:
        for n in names.values():
            ctx.submodule(n)
    except AttributeError:
        return None
    return names


class _LlamaWalk:
    """The forward of a Llama-family decoder layer, cut where GPTQ needs to act:

        x1 = input_norm(h)                     -> q/k/v        (their input)
        a  = attention(x1) up to o_proj        -> o_proj
        h1 = h + o_proj(a);  x2 = post_norm(h1) -> gate/up
        m  = mlp(x2) up to down_proj           -> down_proj
        out = h1 + down_proj(m)

    Each piece calls the layer's own sub-modules in the layer's order, so the result is the
    layer's forward (bit for bit on CPU; checked at run time by the stage). ``step(names,
    inputs)`` is called at each cut with every batch's input, before the walk goes on, so it
    can quantize those linears and the rest of the walk sees them quantized.
    """

    def __init__(
        self,
        ctx: LayerContext,
        hidden: list[Tensor],
        kwargs: list[dict],
        drop_inputs: bool = False,
        window_chunk: int | None = 1,
        overwrite_inputs: bool = False,
        compute_dtype: torch.dtype | None = None,
    ):
        """``drop_inputs``: set each entry of ``hidden`` to None once its residual is formed (the
        caller no longer needs the inputs); ``overwrite_inputs``: besides, nothing else reads those
        tensors, so the residual may be written over them. ``window_chunk``: run each sub-block
        this many windows at a time (None: whole batches), so that its transients (the MLP's
        1536-wide gate, up and their product; attention's queries, rotations, scores) are a few
        windows' worth, not a batch's; the result is the same (see :meth:`_by_window`)."""
        names = _llama_names(ctx)
        if names is None:
            raise GPTQError(f"{ctx.name} is not a Llama-family layer")
        self.m = {k: ctx.submodule(v) for k, v in names.items()}
        self.seq = ctx.arch.sequential
        self.hidden, self.kwargs = hidden, kwargs
        # Offloaded activations (a GPU run): every tensor the walk keeps lives where the inputs
        # do (CPU memory); each window is brought to the device for its sub-block.
        self.device = ctx.device
        self.storage = next((h.device for h in hidden if h is not None), ctx.device)
        self.drop_inputs = drop_inputs
        self.overwrite_inputs = overwrite_inputs and drop_inputs
        self.window_chunk = window_chunk
        # Autocast dtype for the sub-blocks' arithmetic (None: the layer's own dtype).
        self.compute_dtype = compute_dtype
        self.outputs: list[Tensor] = []
        # Hand down_proj's inputs over one batch at a time, each batch's output made on the way,
        # instead of keeping every batch's (1536-wide) input: for a walk whose layer the step
        # does not change (the float walk of ``float_target``).
        self.stream_down = False

    def run(self, step) -> list[Tensor]:
        for names, xs in self.steps():
            step(names, xs)
        return self.outputs

    def steps(self) -> Iterator[tuple[tuple[str, ...], list[Tensor]]]:
        """The walk as a generator: yields (linear names, every batch's input) at each cut and
        goes on when resumed; the layer's outputs are then in ``self.outputs``. Lets two walks
        (the float layer's and the quantized one's) advance cut by cut side by side."""
        m, seq = self.m, self.seq
        on = self._on_device
        xs = [self._by_window(lambda rows, h=h: m["input_norm"](on(h[rows])), h) for h in self.hidden]
        yield seq[0], xs
        attn, o_proj = m["attention"], m["o_proj"]
        for i, kw in enumerate(self.kwargs):
            x = xs[i]
            xs[i] = self._by_window(
                lambda rows, x=x, kw=kw: _input_of(
                    o_proj, lambda: attn(hidden_states=on(x[rows]), **_batch_rows(kw, x.shape[0], rows))
                ),
                x,
                into=x,
            )
            del x
        yield seq[1], xs
        # residual + attention output, as the layer adds them; one batch at a time, each
        # batch's attention output (and input, if allowed) freed as its residual is made.
        residual = []
        for i in range(len(xs)):
            h, x = self.hidden[i], xs[i]
            into = h if self.overwrite_inputs else None
            residual.append(self._by_window(lambda rows, h=h, x=x: on(h[rows]) + o_proj(on(x[rows])), x, into=into))
            del h
            if self.drop_inputs:
                self.hidden[i] = None
            xs[i] = self._by_window(lambda rows, r=residual[i]: m["post_norm"](on(r[rows])), x, into=x)
            del x
        yield seq[2], xs
        if self.stream_down:
            streamed = _StreamedDownInputs(self, xs, residual)
            yield seq[3], streamed
            self.outputs = streamed.finish()
            return
        for i in range(len(xs)):
            x = xs[i]
            xs[i] = None
            xs[i] = self._down_input(x)
            del x
        yield seq[3], xs
        out = []
        for i in range(len(xs)):
            out.append(self._layer_output(residual[i], xs[i]))
            xs[i] = residual[i] = None  # free as we go: the outputs replace them
        self.outputs = out

    def _down_input(self, x: Tensor) -> Tensor:
        """down_proj's input for the batch ``x`` (the MLP up to down_proj)."""
        mlp, down = self.m["mlp"], self.m["down"]
        return self._by_window(lambda rows: _input_of(down, lambda: mlp(self._on_device(x[rows]))), x)

    def _layer_output(self, residual: Tensor, down_input: Tensor) -> Tensor:
        down, on = self.m["down"], self._on_device
        return self._by_window(lambda rows: on(residual[rows]) + down(on(down_input[rows])), down_input, into=residual)

    def _on_device(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)  # asynchronous from page-locked storage

    def _by_window(self, make: Callable[[slice], Tensor], batch: Tensor, into: Tensor | None = None) -> Tensor:
        """``make(rows)`` for the whole batch, computed ``window_chunk`` windows (rows of ``batch``)
        at a time and gathered: the same result, with each sub-block's transients a few windows'
        worth instead of a batch's. They then fit under :func:`transients_on_heap`'s threshold and
        reuse freed heap memory, where whole-batch ones would each be fresh pages from the kernel
        (their page faults were a tenth of the walk's CPU time on the embedded model). The result
        is kept in the walk's storage (offloaded: CPU memory).

        ``into``: a tensor of the batch's that is no longer needed except by ``make`` for the same
        rows; the result is written over it when it has the result's shape (no fresh pages)."""
        make = _autocast(make, self.device, self.compute_dtype)
        first, *rest = _row_chunks(batch, self.window_chunk)
        if not rest:
            return to_storage(make(first), self.storage)
        part = make(first)
        fits = into is not None and into.shape[1:] == part.shape[1:] and into.dtype == part.dtype
        if fits and into.device == self.storage:
            out = into
        else:  # made before the heap-only loop: it lives on
            out = empty_in_storage(part, (batch.shape[0], *part.shape[1:]), self.storage)
        out[first].copy_(part, non_blocking=True)
        del part
        with transients_on_heap():
            for rows in rest:
                out[rows].copy_(make(rows), non_blocking=True)
        return out


class _StreamedDownInputs:
    """down_proj's inputs of a :class:`_LlamaWalk`, made batch by batch as they are iterated;
    each batch's layer output is made at the same time, so only one batch's input is alive."""

    def __init__(self, walk: _LlamaWalk, xs: list[Tensor | None], residual: list[Tensor | None]):
        self.walk, self.xs, self.residual = walk, xs, residual
        self.outputs: list[Tensor | None] = [None] * len(xs)

    def __len__(self) -> int:
        return len(self.xs)

    def _make(self, i: int) -> Tensor:
        x = self.walk._down_input(self.xs[i])
        self.outputs[i] = self.walk._layer_output(self.residual[i], x)
        self.xs[i] = self.residual[i] = None
        return x

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self.xs)):
            if self.outputs[i] is None:
                yield self._make(i)

    def finish(self) -> list[Tensor]:
        for i in range(len(self.xs)):
            if self.outputs[i] is None:
                self._make(i)
        return self.outputs


class GPTQStage(QuantizingStage):
    """GPTQ on the layer-by-layer engine: Hessians of each linear's inputs, in true-sequential
    order (each group of linears sees the earlier ones quantized), shared by linears that
    read the same input (q/k/v, gate/up: one stacked GPTQ run)."""

    name = "gptq"
    needs_calibration = True
    # The step-by-step walk moves each window to the device as it works on it (run_layerwise).
    reads_offloaded_inputs = True

    def __init__(
        self,
        args: QuantArgs,
        ignore: list[str] | None = None,
        damp_percent: float = 0.01,
        block_size: int = 128,
        act_order: ActOrder = "static",
        mse: bool = False,
        true_sequential: bool = True,
        float_target: float = 0.0,
        float_target_windows: int | None = None,
        compute_dtype: ComputeDtype | None = None,
    ):
        """``float_target`` α in [0, 1]: fit each linear's outputs α of the way from the quantized
        model's own towards the float model's (GPTAQ; see :func:`float_target_weight`), walking the
        float layer beside the quantized one; 0 is plain GPTQ. Needs ``true_sequential`` and a
        Llama-family layer (others are quantized without it, with a note).
        ``float_target_windows``: walk the float model on only the first this many calibration
        windows (rounded up to whole batches; None: all) and estimate the drift term from them; the
        Hessians still use every window. Cuts the float walk's time and memory in proportion.
        ``compute_dtype``: run the calibration forward's matrix products in this dtype (autocast;
        None: the model's own). "bfloat16" runs a float32 model's products 2-3x faster where the
        hardware multiplies bfloat16 natively (AVX512-BF16/AMX CPUs, tensor-core GPUs); the
        float target's drift term is multiplied in it too (summed in float32); the residual
        stream, the Hessians and the GPTQ sweep stay float32."""
        super().__init__(args, ignore)
        self.damp_percent = damp_percent
        self.block_size = block_size
        self.act_order = act_order
        self.mse = MSEGrid() if mse else None
        self.true_sequential = true_sequential
        if not 0.0 <= float_target <= 1.0:
            raise GPTQError(f"float_target must be between 0 and 1, got {float_target}")
        self.float_target = float(float_target)
        if float_target_windows is not None and float_target_windows < 1:
            raise GPTQError(f"float_target_windows must be at least 1, got {float_target_windows}")
        self.float_target_windows = float_target_windows
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise GPTQError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.compute_dtype = COMPUTE_DTYPES[compute_dtype] if compute_dtype is not None else None
        # The float model's inputs of the next layer (float_target), and that layer's index.
        self._float_hidden: list[Tensor] | None = None
        self._float_hidden_layer: int | None = None
        # One-pass true-sequential for Llama-family layers; False forces the re-running method.
        self.stepwise = True
        # Windows at a time for each sub-block of the walk (None: whole batches; "auto": see _window_chunk).
        self.window_chunk: int | str | None = "auto"
        # float_target: the float walk hands down_proj's inputs over batch by batch (see _LlamaWalk).
        self.stream_float_down = True
        self._stepwise_ok: dict[type, bool] = {}
        # On a GPU, replay the sweep from CUDA graphs (captured once per block shape, reused over the run).
        self.cuda_graphs = True
        self._sweep_graphs = SweepGraphs()
        self.notes: list[str] = []
        self.losses: dict[str, float] = {}

    @classmethod
    def from_recipe(cls, entry) -> GPTQStage:
        return cls(
            QuantArgs(entry.bits, entry.group_size, entry.symmetric),
            entry.ignore,
            damp_percent=entry.damp_percent,
            block_size=entry.block_size,
            act_order=entry.act_order,
            mse=entry.mse,
            true_sequential=entry.true_sequential,
            float_target=entry.float_target,
            float_target_windows=entry.float_target_windows,
            compute_dtype=entry.compute_dtype,
        )

    def apply_layer(self, ctx: LayerContext) -> None:
        if self.true_sequential and self.stepwise and self._stepwise_fits(ctx):
            self._apply_layer_stepwise(ctx)
            return
        ctx.inputs_to_device()  # the re-running method runs the layer on them as they are
        if self.float_target > 0:
            self._float_hidden = None  # the float stream cannot go through this layer
            message = f"{ctx.name}: float target needs the step-by-step walk; quantized against its own inputs"
            self.notes.append(message)
            log.warning(message)
        steps = ctx.arch.sequential if self.true_sequential else (ctx.arch.linears,)
        for names in steps:
            targets = list(self.targets(ctx, names))
            if not targets:
                continue
            hessians = self.collect_hessians(ctx, [short for short, _ in targets])
            # Linears reading the same input (q/k/v, gate/up) share H, hence U: GPTQ treats
            # rows independently, so one run on their stacked rows gives each one's result
            # with one factorization and a third of the column steps.
            shared: dict[int, list[tuple[str, nn.Linear]]] = {}
            for short, module in targets:
                shared.setdefault(id(hessians[short]), []).append((short, module))
            for members in shared.values():
                self.quantize_linears(ctx.name, members, hessians[members[0][0]])

    # -- true-sequential in one pass (Llama-family layers) ------------------------------

    def _stepwise_fits(self, ctx: LayerContext) -> bool:
        """Whether the layer is a pre-norm Llama-family block the one-pass walk reproduces.

        Checked once per layer class: the walk (without quantizing) must give the layer's own
        output on the first batch; otherwise the re-running method is used, with a note.
        """
        key = type(ctx.layer)
        if key not in self._stepwise_ok:
            self._stepwise_ok[key] = _llama_names(ctx) is not None and self._walk_matches_forward(ctx)
            if not self._stepwise_ok[key]:
                message = f"{key.__name__}: true-sequential re-runs the layer (step-by-step walk not applicable)"
                self.notes.append(message)
                log.info(message)
        return self._stepwise_ok[key]

    @torch.no_grad()
    def _walk_matches_forward(self, ctx: LayerContext) -> bool:
        # The first window is enough to tell; its batch's other arguments cut to match.
        hidden, kwargs = ctx.inputs.hidden[0], ctx.inputs.kwargs[0]
        if hidden.shape[0] > 1:
            hidden, kwargs = hidden[:1], _batch_rows(kwargs, hidden.shape[0], slice(0, 1))
        try:
            walked = _LlamaWalk(ctx, [hidden], [kwargs]).run(lambda names, xs: None)[0].to(ctx.device)
        except Exception as e:  # any mismatch in structure means: use the general method
            log.info("step-by-step walk failed on %s: %s", type(ctx.layer).__name__, e)
            return False
        expected = _first_output(ctx.layer(hidden.to(ctx.device), **kwargs))
        return walked.shape == expected.shape and torch.allclose(walked, expected, rtol=1e-5, atol=1e-6)

    @torch.no_grad()
    def _apply_layer_stepwise(self, ctx: LayerContext) -> None:
        """True-sequential at the cost of one layer forward: the layer is walked sub-block by
        sub-block, each sub-block's input kept, so every group of linears is quantized before
        the forward reaches it and no part of the layer runs twice. The walk's end result is
        the quantized layer's output, handed to the engine (which then skips its forward).

        With ``float_target``, a float copy of the layer fed the float model's hidden states is
        walked cut by cut beside it, and each group of linears also gets the cross term of its
        quantized-model inputs with the float ones."""
        float_walk = self._float_walk(ctx) if self.float_target > 0 else None
        # The float walk may read the same input tensors (first layer): then neither writes over them.
        shared = float_walk is not None and not float_walk.overwrite_inputs
        walk = _LlamaWalk(
            ctx,
            ctx.inputs.hidden,
            ctx.inputs.kwargs,
            drop_inputs=ctx.inputs_disposable,
            window_chunk=self._window_chunk(ctx.device),
            overwrite_inputs=ctx.inputs_overwritable and not shared,
            compute_dtype=self.compute_dtype,
        )
        float_steps = float_walk.steps() if float_walk is not None else itertools.repeat((None, None))
        for (names, xs), (_, float_xs) in zip(walk.steps(), float_steps):
            targets = list(self.targets(ctx, names))
            if not targets:
                continue
            acc = HessianAccumulator(xs[0].shape[-1], ctx.device)
            cross = None
            if float_xs is not None:
                cross = CrossAccumulator(xs[0].shape[-1], ctx.device, self.compute_dtype)
            # The float walk covers the first len(float_xs) batches (float_target_windows): in step.
            float_batches = iter(float_xs) if float_xs is not None else iter(())
            for batch in xs:
                float_batch = next(float_batches, None)
                # On a GPU a few windows at a time, as the walk: offloaded, a whole batch would be the
                # largest thing on the device (down_proj's 1536-wide inputs, twice with a float target),
                # and kept there too, so that offloading changes where tensors live, not the sums.
                offloaded = batch.device != ctx.device
                chunk = walk.window_chunk if ctx.device.type != "cpu" else None
                for rows in _row_chunks(batch, chunk):
                    x, x_float = batch[rows].to(ctx.device, non_blocking=True), None
                    acc.add(x)
                    if float_batch is not None:
                        # A copy of its own when offloaded: the drift may be formed in it.
                        x_float = float_batch[rows].to(ctx.device, non_blocking=True)
                        cross.add(x, x_float, float_is_spare=offloaded)
                    del x, x_float
            hessian = acc.hessian()
            del acc
            self.quantize_linears(ctx.name, targets, hessian, None if cross is None else cross.take())
            del hessian, cross
        ctx.outputs = walk.outputs
        if float_walk is not None:
            for _ in float_steps:  # finish the float layer's forward (its outputs feed the next layer)
                pass
            self._float_hidden, self._float_hidden_layer = float_walk.outputs, ctx.index + 1

    def _float_walk(self, ctx: LayerContext) -> _LlamaWalk:
        """The walk of a float copy of ``ctx``'s layer on the float model's hidden states: those the
        previous layer's float walk left, or this layer's inputs at the first layer (or, with a
        note, at the first layer of a resumed run that did not keep them)."""
        own = self._float_hidden is not None and self._float_hidden_layer == ctx.index
        if own:
            float_hidden = self._float_hidden
        else:
            if ctx.index != 0:
                message = f"{ctx.name}: float target starts here, from the quantized model's inputs (resumed run?)"
                self.notes.append(message)
                log.warning(message)
            float_hidden = ctx.inputs.hidden[: self._float_batches(ctx.inputs.hidden)]  # a new list
        self._float_hidden = None
        float_ctx = dataclasses.replace(ctx, layer=copy.deepcopy(ctx.layer), log=[])
        kwargs = ctx.inputs.kwargs[: len(float_hidden)]
        chunk = self._window_chunk(ctx.device)
        walk = _LlamaWalk(
            float_ctx, float_hidden, kwargs, True, chunk, overwrite_inputs=own, compute_dtype=self.compute_dtype
        )
        walk.stream_down = self.stream_float_down
        return walk

    def _window_chunk(self, device: torch.device) -> int | None:
        """Windows at a time for the walk's sub-blocks: one on a CPU (each sub-block's transients
        then fit under transients_on_heap's threshold); four on a GPU, where a sub-block of one
        512-token window is launch-bound (four: 1.3x faster offloaded, 1.5x kept on the device, on an H200)."""
        if self.window_chunk == "auto":
            return 1 if device.type == "cpu" else 4
        return self.window_chunk

    def _float_batches(self, hidden: list[Tensor]) -> int:
        """How many of the leading batches hold ``float_target_windows`` windows (all without it)."""
        if self.float_target_windows is None:
            return len(hidden)
        windows = 0
        for i, h in enumerate(hidden):
            windows += h.shape[0] if h.dim() >= 3 else 1
            if windows >= self.float_target_windows:
                return i + 1
        return len(hidden)

    def resume_state(self) -> dict:
        """The float model's hidden states for the next layer (float_target), so that a resumed
        run goes on with them (compress/resume.py)."""
        if self.float_target == 0 or self._float_hidden is None:
            return {}
        return {"float_hidden": list(self._float_hidden), "float_hidden_layer": self._float_hidden_layer}

    def load_resume_state(self, state: dict) -> None:
        if self.float_target > 0 and "float_hidden" in state:
            self._float_hidden = list(state["float_hidden"])
            self._float_hidden_layer = int(state["float_hidden_layer"])

    def quantize_linears(
        self, prefix: str, members: list[tuple[str, nn.Linear]], hessian: Tensor, cross: Tensor | None = None
    ) -> None:
        """One GPTQ run on the stacked rows of ``members`` (which share ``hessian``); with
        ``cross``, towards their float-target weight (:func:`float_target_weight`)."""
        weights = [module.weight.data for _, module in members]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        if cross is not None:
            with _one_thread_on_cpu(weight.device):
                weight = float_target_weight(weight, hessian, cross, self.damp_percent, self.float_target)
            del cross
        result = run_gptq(
            weight,
            hessian,
            self.args,
            self.damp_percent,
            self.block_size,
            self.act_order,
            self.mse,
            overwrite_hessian=True,
            cuda_graphs=self._sweep_graphs if self.cuda_graphs else False,
        )
        label = f"{prefix}." + "+".join(short for short, _ in members)
        for note in result.notes:
            message = f"{label}: {note}"
            self.notes.append(message)
            log.warning(message)
        self.losses[label] = result.loss
        parts = split_rows(result.qweight, [w.shape[0] for w in weights])
        for (short, module), qw in zip(members, parts, strict=True):
            self.record(f"{prefix}.{short}", module, PackedCodesWeight.of(qw))

    @torch.no_grad()
    def collect_hessians(self, ctx: LayerContext, names: list[str]) -> dict[str, Tensor]:
        """Hessians of the inputs of ``names``, running the (partly quantized) layer.

        Linears that read the same tensor (q/k/v; gate/up) share one Hessian. Each batch's
        forward stops as soon as every wanted input has been seen: what comes after cannot
        change them, so quantizing q/k/v costs no attention and o_proj no MLP.
        """
        accumulators: dict[str, HessianAccumulator] = {}
        alias: dict[str, str] = {}  # name -> the name whose (identical) input it shares
        batch_inputs: list[tuple[Tensor, str]] = []
        batch_seen: set[str] = set()
        wanted = set(names)

        def make_hook(name: str):
            def hook(module: nn.Module, inputs: tuple, output) -> None:
                x = inputs[0]
                owner = next((n for t, n in batch_inputs if t is x), None)
                if owner is not None and owner != name:
                    alias[name] = owner
                else:
                    batch_inputs.append((x, name))
                    if name not in accumulators:
                        accumulators[name] = HessianAccumulator(x.shape[-1], x.device)
                    accumulators[name].add(x)
                batch_seen.add(name)
                if batch_seen >= wanted:
                    raise _StopLayer

            return hook

        layer = _autocast(ctx.layer, ctx.device, self.compute_dtype)
        with ctx.hooked({n: make_hook(n) for n in names}):
            for hidden, kwargs in zip(ctx.inputs.hidden, ctx.inputs.kwargs, strict=True):
                batch_inputs.clear()
                batch_seen.clear()
                try:
                    layer(hidden, **kwargs)
                except _StopLayer:
                    pass
        out: dict[str, Tensor] = {}
        for n in names:
            source = alias.get(n, n)
            if source not in accumulators:
                raise GPTQError(f"{ctx.name}: the layer's forward never reached {n}")
            if source not in out:
                out[source] = accumulators[source].hessian()
            out[n] = out[source]
        return out
