"""GPTQ against RTN, against a slow column-by-column reference, and on hostile Hessians."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress import recipe as R
from compress import stages
from compress.arch import arch_for
from compress.calibrate import run_layerwise
from compress.quant import int4
from compress.quant.gptq import (
    ACT_ORDERS,
    GPTQError,
    GPTQStage,
    MSEGrid,
    SweepGraphs,
    act_order_permutation,
    gptq_quantize,
    group_qparams,
    hessian_from_inputs,
    rtn_quantize,
    run_gptq,
    split_rows,
)
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage
from tests.conftest import make_tiny_model, torch_threads

# A small clip grid keeps the MSE cases fast; the search is the same code at any size.
SMALL_MSE = MSEGrid(grid=10, max_shrink=0.5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny operations: on shared cores one thread is several times faster."""
    with torch_threads(1):
        yield


def correlated_problem(out_features=48, in_features=160, tokens=768, seed=0, dtype=torch.float32):
    """Weights and inputs whose features are strongly correlated, with uneven scales (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scale = torch.exp(torch.randn(in_features, generator=g))
    x = (torch.randn(tokens, 24, generator=g) @ torch.randn(24, in_features, generator=g)) * 0.7
    x = (x + torch.randn(tokens, in_features, generator=g) @ mix) * scale
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    return w.to(dtype), x.to(dtype)


def output_error(x, w, w_hat):
    return ((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum().item()


# ---------------------------------------------------------------------------
# The slow, obvious reference: one column at a time, float64, no blocks, no lazy updates
# ---------------------------------------------------------------------------


def slow_gptq(w, h, args, damp_percent=0.01, act_order="none", mse=None):
    """Textbook GPTQ: quantize column j, push its error onto columns > j along row j of U,
    where Uᵀ U = (H + λI)⁻¹."""
    w, h = w.double().clone(), h.double().clone()
    out_features, columns = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    width = args.group_width(columns)
    groups = args.num_groups(columns)
    scales = torch.zeros(out_features, groups)
    zeros = torch.zeros(out_features, groups, dtype=torch.int32)
    fixed = args.group_size == -1 or act_order == "static"
    if fixed:
        for g in range(groups):
            scales[:, g], zeros[:, g] = group_qparams(w[:, g * width : (g + 1) * width], args, mse)
    perm = act_order_permutation(h) if act_order != "none" else torch.arange(columns)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp_percent * torch.diag(h).mean() * torch.eye(columns, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T  # upper, Uᵀ U = H⁻¹
    codes = torch.zeros(out_features, columns, dtype=torch.uint8)
    group_of = []
    for j in range(columns):
        g = int(perm[j]) // width if fixed else j // width
        if not fixed and j % width == 0:
            scales[:, g], zeros[:, g] = group_qparams(w[:, j : j + width], args, mse)
        s, z = scales[:, g], zeros[:, g].float()
        c = torch.clamp(torch.round(w[:, j].float() / s) + z, 0, args.maxq)
        q = ((c - z) * s).double()
        codes[:, j] = c.to(torch.uint8)
        group_of.append(g)
        w[:, j:] -= torch.outer((w[:, j] - q) / u[j, j], u[j, j:])
    inverse = torch.argsort(perm)
    g_idx = torch.tensor(group_of)[inverse].to(torch.int32) if not fixed else None
    return int4.QuantizedWeight(codes[:, inverse], scales, zeros, args.bits, args.group_size, args.symmetric, g_idx)


ALL_OPTIONS = list(itertools.product((-1, 32, 64, 128), (True, False), ACT_ORDERS, (False, True)))


@pytest.mark.parametrize("group_size,symmetric,act_order,mse", ALL_OPTIONS)
def test_gptq_output_error_below_rtn_for_every_option(group_size, symmetric, act_order, mse):
    # 160 inputs: group 64 and 128 leave a ragged last group.
    w, x = correlated_problem()
    args = QuantArgs(4, group_size, symmetric)
    grid = SMALL_MSE if mse else None
    qw = gptq_quantize(w, hessian_from_inputs(x), args, act_order=act_order, mse=grid)
    gptq_err = output_error(x, w, qw.dequantize())
    rtn_err = output_error(x, w, rtn_quantize(w, args, grid).dequantize())
    assert gptq_err < 0.8 * rtn_err
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= args.maxq
    assert qw.scales.shape == (48, args.num_groups(160))
    # Scales survive the float16 round trip export makes.
    assert torch.equal(qw.scales.half().float(), qw.scales)
    assert (qw.g_idx is not None) == (act_order == "g_idx" and group_size != -1)


@pytest.mark.parametrize("group_size,symmetric,act_order,mse", ALL_OPTIONS[::3] + ALL_OPTIONS[1::7])
def test_identity_hessian_is_exactly_rtn(group_size, symmetric, act_order, mse):
    w, _ = correlated_problem(seed=1)
    args = QuantArgs(4, group_size, symmetric)
    grid = SMALL_MSE if mse else None
    qw = gptq_quantize(w, torch.eye(w.shape[1]), args, act_order=act_order, mse=grid)
    expected = rtn_quantize(w, args, grid)
    assert torch.equal(qw.codes, expected.codes)
    assert torch.equal(qw.scales, expected.scales)
    assert torch.equal(qw.zeros, expected.zeros)
    assert torch.equal(qw.group_index(), expected.group_index())
    if not mse:  # and our RTN is the shared int4 one
        assert torch.equal(qw.dequantize(), int4.quantize(w, args).dequantize())


@pytest.mark.parametrize(
    "group_size,act_order,symmetric,block_size",
    [
        (32, "none", True, 128),
        (32, "none", False, 40),  # groups straddle blocks: group params from lazily updated weights
        (128, "g_idx", True, 48),
        (64, "g_idx", False, 128),
        (64, "static", True, 37),
        (-1, "static", False, 128),
        (-1, "none", True, 16),
    ],
)
def test_blocked_agrees_with_slow_reference(group_size, act_order, symmetric, block_size):
    w, x = correlated_problem(out_features=32, in_features=160, seed=2, dtype=torch.float64)
    h = (2.0 / x.shape[0]) * (x.T @ x)  # float64, unlike hessian_from_inputs
    args = QuantArgs(4, group_size, symmetric)
    fast = gptq_quantize(w, h, args, block_size=block_size, act_order=act_order)
    slow = slow_gptq(w, h, args, act_order=act_order)
    # float64 throughout: the two orders of summation may only disagree on exact rounding ties.
    assert (fast.codes != slow.codes).float().mean().item() < 1e-3
    torch.testing.assert_close(fast.scales, slow.scales.float())
    assert torch.equal(fast.zeros, slow.zeros)
    assert torch.equal(fast.group_index(), slow.group_index())


def test_blocked_float32_matches_slow_reference_in_error():
    w, x = correlated_problem(seed=3)
    h = hessian_from_inputs(x)
    args = QuantArgs(4, 64, True)
    fast = output_error(x, w, gptq_quantize(w, h, args, act_order="g_idx").dequantize())
    slow = output_error(x, w, slow_gptq(w, h, args, act_order="g_idx").dequantize())
    assert fast == pytest.approx(slow, rel=0.02)


@pytest.mark.parametrize("act_order", ACT_ORDERS)
def test_stacked_rows_equal_separate_runs(act_order):
    """The stage quantizes q/k/v (and gate/up) as one stacked matrix: rows are independent."""
    w, x = correlated_problem(out_features=40, seed=8, dtype=torch.float64)
    h = (2.0 / x.shape[0]) * (x.T @ x)
    args = QuantArgs(4, 32, False)
    parts = split_rows(gptq_quantize(w, h, args, act_order=act_order), [24, 8, 8])
    for part, rows in zip(parts, (slice(0, 24), slice(24, 32), slice(32, 40)), strict=True):
        alone = gptq_quantize(w[rows], h, args, act_order=act_order)
        assert (part.codes != alone.codes).float().mean().item() < 1e-3
        assert torch.equal(part.group_index(), alone.group_index())


@pytest.mark.parametrize("features", [64, 300, 576])
def test_hessian_accumulator_is_the_full_product_in_batches(features):
    from compress.quant.gptq import HessianAccumulator

    g = torch.Generator().manual_seed(features)
    batches = [torch.randn(2, 37, features, generator=g) * torch.rand(features, generator=g) for _ in range(3)]
    acc = HessianAccumulator(features, torch.device("cpu"))
    for x in batches:
        acc.add(x)
    got = acc.hessian()
    x = torch.cat([b.reshape(-1, features) for b in batches]).double()
    torch.testing.assert_close(got.double(), 2.0 / x.shape[0] * (x.T @ x), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("columns", [7, 64])
def test_packed_record_is_the_record(columns):
    from compress.quant.gptq import PackedCodesWeight

    w, _ = correlated_problem(out_features=5, in_features=columns, seed=9)
    plain = int4.quantize(w, QuantArgs(4, 32, False))
    packed = PackedCodesWeight.of(plain)
    assert packed.shape == plain.shape and packed._packed_codes.numel() == 5 * ((columns + 1) // 2)
    assert torch.equal(packed.codes, plain.codes) and packed.codes.dtype == torch.uint8
    assert torch.equal(packed.dequantize(), plain.dequantize())
    assert packed.nbytes_packed() == plain.nbytes_packed()
    eight = int4.quantize(w, QuantArgs(8, 32, True))
    assert PackedCodesWeight.of(eight) is eight
    with pytest.raises(GPTQError):
        PackedCodesWeight.of(eight.__class__(eight.codes, eight.scales, eight.zeros, 4, 32, True))


def test_act_order_g_idx_groups_follow_processing_order():
    w, x = correlated_problem(seed=4)
    h = hessian_from_inputs(x)
    qw = gptq_quantize(w, h, QuantArgs(4, 32, True), act_order="g_idx")
    perm = act_order_permutation(h)
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(160) // 32)
    assert qw.has_act_order_g_idx()
    static = gptq_quantize(w, h, QuantArgs(4, 32, True), act_order="static")
    assert static.g_idx is None


@pytest.mark.parametrize("act_order", ACT_ORDERS)
def test_singular_hessians_give_finite_weights(act_order):
    w, x = correlated_problem(seed=5)
    x = x[:40].clone()  # fewer tokens than inputs: rank deficient
    x[:, 7] = x[:, 3]  # duplicate columns
    x[:, 100] = x[:, 3]
    x[:, [10, 11, 150]] = 0.0  # dead columns
    result = run_gptq(w, hessian_from_inputs(x), QuantArgs(4, 32, False), act_order=act_order)
    deq = result.qweight.dequantize()
    assert torch.isfinite(deq).all()
    assert result.dead_columns == 3
    assert torch.all(deq[:, [10, 11, 150]] == 0)
    assert any("dead" in n for n in result.notes)
    assert output_error(x, w, deq) < output_error(x, w, int4.quantize(w, QuantArgs(4, 32, False)).dequantize())


def test_indefinite_hessian_raises_dampening_and_says_so():
    w, x = correlated_problem(seed=6)
    h = hessian_from_inputs(x)
    # A Hessian accumulated badly (negative eigenvalue), on which 1% dampening is not enough.
    eigvals, eigvecs = torch.linalg.eigh(h.double())
    eigvals[0] = -0.05 * torch.diag(h).mean().double()
    bad = (eigvecs * eigvals) @ eigvecs.T
    result = run_gptq(w, bad.float(), QuantArgs(4, 64, True))
    assert result.damp_increased and result.damp_fraction >= 0.1
    assert any("dampening raised" in n for n in result.notes)
    assert torch.isfinite(result.qweight.dequantize()).all()
    # All-zero Hessian: every column dead, weights zero, still finite.
    zero = run_gptq(w, torch.zeros(160, 160), QuantArgs(4, 64, False))
    assert zero.dead_columns == 160 and torch.all(zero.qweight.dequantize() == 0)


def slow_clip_search(w, args, grid: MSEGrid):
    """Every shrink's error for every row first, then the stopping rule and a per-row argmin."""
    shrinks = [1.0 - i / grid.grid for i in range(int(grid.max_shrink * grid.grid))]
    params = [int4.compute_qparams(w, args, p) for p in shrinks]
    errors = torch.stack(
        [(int4.fake_quantize_rows(w, s, z, args.maxq) - w).abs().pow(grid.norm).sum(dim=1) for s, z in params]
    )  # [steps, rows]
    steps = len(shrinks)
    if grid.patience is not None:
        running_best = torch.cummin(errors, dim=0).values
        improved = [True] + [bool((errors[k] < running_best[k - 1]).any()) for k in range(1, steps)]
        stale = 0
        for k in range(1, steps):
            stale = 0 if improved[k] else stale + 1
            if stale == grid.patience:
                steps = k  # step k is the last one tried
                break
        steps = min(steps + 1, len(shrinks))
    best = torch.argmin(errors[:steps], dim=0)  # the first of equal minima, as the search keeps
    rows = torch.arange(w.shape[0])
    scale = torch.stack([s for s, _ in params[:steps]])[best, rows]
    zero = torch.stack([z for _, z in params[:steps]])[best, rows]
    return scale, zero, steps


@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("patience", (None, 1, 3))
def test_clip_search_agrees_with_slow_reference(symmetric, patience):
    # Heavy-tailed rows: the best clip differs from row to row.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g) * torch.exp(torch.randn(64, 1, generator=g))
    w[::5, 0] *= 6.0
    args = QuantArgs(4, 32, symmetric)
    grid = MSEGrid(grid=20, max_shrink=0.8, patience=patience)
    scale, zero = group_qparams(w, args, grid)
    expected_scale, expected_zero, steps = slow_clip_search(w, args, grid)
    assert torch.equal(scale, expected_scale) and torch.equal(zero, expected_zero)
    if patience == 1:
        assert steps < 16  # the rule did stop the search early here
    plain_scale, _ = int4.compute_qparams(w, args)
    assert (scale < plain_scale).any()  # some rows clipped


def test_bad_input_is_one_error():
    w, x = correlated_problem(seed=7)
    h = hessian_from_inputs(x)
    with pytest.raises(GPTQError, match="does not fit"):
        gptq_quantize(w, h[:10, :10], QuantArgs())
    h[0, 0] = float("nan")
    with pytest.raises(GPTQError, match="non-finite"):
        gptq_quantize(w, h, QuantArgs())
    with pytest.raises(GPTQError, match="act_order"):
        gptq_quantize(w, hessian_from_inputs(x), QuantArgs(), act_order="sideways")


# ---------------------------------------------------------------------------
# The stage on a tiny model
# ---------------------------------------------------------------------------


def _logit_error(model, reference_logits, windows):
    with torch.no_grad():
        return ((model(input_ids=windows).logits - reference_logits) ** 2).mean().item()


def _calibration(seed=0, n=16, length=48):
    g = torch.Generator().manual_seed(seed)
    # Mostly a few frequent tokens: correlated, non-isotropic activations, as in real text.
    base = torch.randint(0, 40, (n, length), generator=g)
    return torch.where(torch.rand(n, length, generator=g) < 0.2, torch.randint(0, 256, (n, length), generator=g), base)


def test_stage_quantizes_every_linear_and_beats_rtn():
    windows = _calibration(n=8)
    model = make_tiny_model(layers=2)
    arch = arch_for(model)
    with torch.no_grad():
        reference = model(input_ids=windows).logits
    args = QuantArgs(4, 32, True)
    errors = {}
    for name, stage in (("rtn", RTNStage(args, ["lm_head"])), ("gptq", GPTQStage(args, ["lm_head"]))):
        m = make_tiny_model(layers=2)
        run_layerwise(m, arch, windows, [stage], batch_size=8, progress=False)
        assert len(stage.quantized) == 2 * 7
        for full, qw in stage.quantized.items():
            # The model holds exactly the weights the record (and so the export) stands for.
            assert torch.equal(m.get_submodule(full).weight.data, qw.dequantize())
        errors[name] = _logit_error(m, reference, windows)
    assert errors["gptq"] < errors["rtn"]


def _appender(store: list):
    return lambda module, args, output: store.append(args[0])


def test_stage_true_sequential_hessians_see_quantized_earlier_linears():
    windows = _calibration(seed=1, n=6)
    model = make_tiny_model(layers=1)
    arch = arch_for(model)
    stage = GPTQStage(QuantArgs(4, 32, True), ["lm_head"])
    stage.stepwise = False  # the re-running method; the one-pass walk is checked against it below
    captured = {}

    class Spy:
        """Wraps collect_hessians to compare each Hessian with one from a plain forward."""

        name = "spy"

        def apply_layer(self, ctx):
            original = stage.collect_hessians

            def spying(ctx, names):
                inputs = {n: [] for n in names}
                hooks = {n: _appender(inputs[n]) for n in names}
                ctx.forward(hooks)
                got = original(ctx, names)
                for n in names:
                    expected = hessian_from_inputs(torch.cat(inputs[n]))
                    torch.testing.assert_close(got[n], expected, rtol=1e-4, atol=1e-6)
                    captured[n] = got[n]
                return got

            stage.collect_hessians = spying
            stage.apply_layer(ctx)

    run_layerwise(model, arch, windows, [Spy()], batch_size=4, progress=False)
    assert set(captured) == set(arch.linears)
    assert captured["self_attn.q_proj"] is captured["self_attn.k_proj"] is captured["self_attn.v_proj"]
    assert captured["mlp.gate_proj"] is captured["mlp.up_proj"]
    # With true-sequential off, o_proj's Hessian comes from the float layer instead: it differs.
    float_model = make_tiny_model(layers=1)
    inputs = []
    hook = float_model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        float_model(input_ids=windows)
    hook.remove()
    assert not torch.allclose(captured["self_attn.o_proj"], hessian_from_inputs(torch.cat(inputs)), rtol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("ignore", [["lm_head"], ["lm_head", "self_attn.o_proj", "mlp.up_proj"]])
def test_one_pass_true_sequential_equals_rerunning_the_layer(model_type, ignore):
    """The step-by-step walk gives bit for bit the records, weights and layer outputs of the
    method that re-runs the layer from its start for each group of linears."""
    windows = _calibration(seed=2, n=6)
    results = []
    for stepwise in (True, False):
        model = make_tiny_model(model_type, layers=2)
        stage = GPTQStage(QuantArgs(4, 32, False), ignore)
        stage.stepwise = stepwise
        outputs = run_layerwise(model, arch_for(model), windows, [stage], batch_size=4, progress=False)
        assert stage._stepwise_ok == ({type(model.model.layers[0]): True} if stepwise else {})
        results.append((stage.quantized, outputs.hidden))
    (walked, walked_out), (rerun, rerun_out) = results
    assert walked.keys() == rerun.keys() and len(walked) == 2 * (7 - len(ignore) + 1)
    for name in walked:
        for field_ in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(walked[name], field_), getattr(rerun[name], field_)), (name, field_)
    for a, b in zip(walked_out, rerun_out, strict=True):
        assert torch.equal(a, b)


class _NoStage:
    name = "none"

    def apply_layer(self, ctx) -> None:
        pass


def test_walk_memory_savers_change_nothing():
    """Sub-blocks window by window and the layer inputs dropped early (the memory-lean walk) give the
    records and outputs of whole batches with the inputs kept, bit for bit; the engine leaves
    inputs handed in by its caller intact (the list and the values: the lean walk writes over only
    the engine's own); a stage that is not last may not drop them."""
    from compress.calibrate import capture_layer_inputs

    windows = _calibration(seed=3, n=6)
    results = []
    for chunk in (1, 2, None):
        model = make_tiny_model(layers=2)
        arch = arch_for(model)
        stage = GPTQStage(QuantArgs(4, 32, False), ["lm_head"])
        stage.window_chunk = chunk
        inputs = capture_layer_inputs(model, arch, windows, 4, "cpu")
        given = list(inputs.hidden)
        given_values = [h.clone() for h in given]
        stages_ = [stage] if chunk is not None else [stage, _NoStage()]
        outputs = run_layerwise(model, arch, windows, stages_, batch_size=4, progress=False, inputs=inputs)
        assert len(inputs.hidden) == len(given) and all(a is b for a, b in zip(inputs.hidden, given, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(given, given_values, strict=True))  # not written over
        results.append((stage.quantized, outputs.hidden))
    reference, reference_out = results[-1]
    for quantized, out in results[:-1]:
        assert quantized.keys() == reference.keys() and len(quantized) == 14
        for name in quantized:
            for field_ in ("codes", "scales", "zeros"):
                assert torch.equal(getattr(quantized[name], field_), getattr(reference[name], field_)), (name, field_)
        for a, b in zip(out, reference_out, strict=True):
            assert torch.equal(a, b)


def _hessians_seen(stage: GPTQStage, quantize: bool = True) -> dict[str, torch.Tensor]:
    """Each GPTQ run's Hessian (copied: the run works in it), by the run's linears; with
    ``quantize`` False the linears are left as they are (the walk's statistics only)."""
    seen: dict[str, torch.Tensor] = {}
    original = stage.quantize_linears

    def spying(prefix, members, hessian, cross=None):
        seen[f"{prefix}." + "+".join(short for short, _ in members)] = hessian.clone()
        if quantize:
            original(prefix, members, hessian, cross)

    stage.quantize_linears = spying
    return seen


@pytest.mark.parametrize("stepwise", [True, False])
def test_bfloat16_forward_moves_the_statistics_by_rounding_only(stepwise):
    """compute_dtype="bfloat16" runs the calibration forward's products in bfloat16. On the float
    layers every Hessian differs from the float32 forward's (it did run in bfloat16) by about
    bfloat16's rounding; quantizing, the layer outputs stay float32, the model holds exactly the
    records, and the result is as good."""
    windows = _calibration(seed=4, n=8)
    hessians, errors = {}, {}
    model = make_tiny_model(layers=2)
    with torch.no_grad():
        reference = model(input_ids=windows).logits
    for dtype in (None, "bfloat16"):
        m = make_tiny_model(layers=2)
        stage = GPTQStage(QuantArgs(4, 32, True), ["lm_head"], compute_dtype=dtype)
        stage.stepwise = stepwise
        hessians[dtype] = _hessians_seen(stage, quantize=False)
        run_layerwise(m, arch_for(m), windows, [stage], batch_size=4, progress=False)
        m = make_tiny_model(layers=2)
        stage = GPTQStage(QuantArgs(4, 32, True), ["lm_head"], compute_dtype=dtype)
        stage.stepwise = stepwise
        outputs = run_layerwise(m, arch_for(m), windows, [stage], batch_size=4, progress=False)
        assert len(stage.quantized) == 2 * 7 and all(h.dtype == torch.float32 for h in outputs.hidden)
        for full, qw in stage.quantized.items():
            assert torch.equal(m.get_submodule(full).weight.data, qw.dequantize())
        errors[dtype] = _logit_error(m, reference, windows)
    plain, bf16 = hessians[None], hessians["bfloat16"]
    assert plain.keys() == bf16.keys() and len(plain) == 2 * 4
    for label, h in plain.items():
        difference = ((bf16[label] - h).norm() / h.norm()).item()
        assert difference < 1e-2, (label, difference)
        # q/k/v read the layer's input normed, no product in between: the first layer's is the
        # embedding's; re-running, every layer's is the engine's float32 forward of the one before.
        untouched = "self_attn.q_proj" in label and (label.startswith("model.layers.0.") or not stepwise)
        assert difference > 0 or untouched, label
    assert errors["bfloat16"] < 1.25 * errors[None]


def test_compute_dtype_option():
    entry = R.GPTQStage(type="gptq", compute_dtype="bfloat16")
    assert stages.build(entry).compute_dtype is torch.bfloat16
    assert stages.build(R.GPTQStage(type="gptq")).compute_dtype is None
    with pytest.raises(ValueError, match="compute_dtype"):
        R.GPTQStage(type="gptq", compute_dtype="int8")
    with pytest.raises(GPTQError, match="compute_dtype must be one of"):
        GPTQStage(QuantArgs(4, 32, True), compute_dtype="float64")


def test_overwrite_hessian_gives_the_same_result_and_plain_runs_leave_it_alone():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, 96, generator=gen)
    x = torch.randn(400, 96, generator=gen) @ torch.randn(96, 96, generator=gen)
    h = hessian_from_inputs(x)
    kept = h.clone()
    for act_order in ("static", "none"):
        plain = run_gptq(w, h, QuantArgs(4, 32, False), act_order=act_order)
        assert torch.equal(h, kept)
        spent = h.clone()
        over = run_gptq(w, spent, QuantArgs(4, 32, False), act_order=act_order, overwrite_hessian=True)
        assert torch.equal(plain.qweight.codes, over.qweight.codes) and plain.loss == over.loss


@pytest.mark.parametrize("act_order", ["static", "none"])
def test_sweep_on_graph_buffers_equals_the_eager_sweep(act_order):
    """The path a GPU replays from CUDA graphs (blocks copied into fixed buffers, per-column
    parameters gathered, 0-dim divisors), run uncaptured on the CPU: bit-identical, with one
    SweepGraphs reused over runs and over block shapes (a ragged last block included)."""
    graphs = SweepGraphs()
    # The second weight has more rows: the buffers' arena grows and the first one's entries go.
    for columns, group_size, rows in ((160, 32, 40), (200, 64, 80), (96, -1, 40)):
        w, x = correlated_problem(out_features=rows, in_features=columns, seed=columns)
        h = hessian_from_inputs(x)
        args = QuantArgs(4, group_size, True)
        eager = run_gptq(w, h, args, act_order=act_order, block_size=64, cuda_graphs=False)
        buffered = run_gptq(w, h, args, act_order=act_order, block_size=64, cuda_graphs=graphs)
        for field_ in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(eager.qweight, field_), getattr(buffered.qweight, field_))
        assert eager.loss == buffered.loss
    # Only fixed group parameters (static act-order, or one group per row) take the buffered path;
    # one set of buffers per block shape (blocks of 64 rows, ragged last blocks of 32 and 8).
    block_rows = {key[0][0] for key in graphs._entries}
    assert block_rows == ({64, 32, 8} if act_order == "static" else {64, 32}) and not graphs.failed
    largest = 64 * 80 if act_order == "static" else 64 * 40
    assert graphs._arenas["params"].numel() == 3 * largest + largest // 64


def test_dampening_is_the_fraction_of_the_mean_diagonal_exactly():
    # The mean taken over a contiguous copy of the diagonal, as before the in-place dampening:
    # a strided view sums in another order and moves λ (hence every result) by an ulp.
    gen = torch.Generator().manual_seed(5)
    for trial in range(4):
        x = torch.randn(300, 1536, generator=gen) * torch.rand(1536, generator=gen) * 3
        h = hessian_from_inputs(x)
        result = run_gptq(torch.randn(2, 1536, generator=gen), h, QuantArgs(4, 64, True), act_order="none")
        assert result.damp == 0.01 * torch.diag(h).mean().item(), trial


def test_walk_is_the_layer_forward_and_falls_back_when_it_is_not():
    from compress.calibrate import LayerContext, capture_layer_inputs
    from compress.quant.gptq import _LlamaWalk

    model = make_tiny_model(layers=1)
    arch = arch_for(model)
    inputs = capture_layer_inputs(model, arch, _calibration(n=4), 2, "cpu")
    layer = model.model.layers[0]
    ctx = LayerContext(0, "model.layers.0", layer, arch, model.config, inputs, torch.device("cpu"), model)
    seen = []
    walked = _LlamaWalk(ctx, inputs.hidden, inputs.kwargs).run(lambda names, xs: seen.append(names))
    assert seen == list(arch.sequential)
    for h, kw, out in zip(inputs.hidden, inputs.kwargs, walked, strict=True):
        torch.testing.assert_close(out, layer(h, **kw), rtol=0, atol=0)
    # A layer whose forward does more than the walk knows (here: a scaled residual) is caught
    # by the run-time check, and the stage re-runs the layer instead.
    original = type(layer).forward

    class Odd(type(layer)):
        def forward(self, hidden_states, **kw):
            return original(self, hidden_states, **kw) * 1.5

    layer.__class__ = Odd
    stage = GPTQStage(QuantArgs(4, 32, True), ["lm_head"])
    assert not stage._stepwise_fits(ctx)
    assert any("re-runs the layer" in n for n in stage.notes)


def test_stage_from_recipe_and_ignore():
    entry = R.GPTQStage(type="gptq", group_size=64, symmetric=False, act_order="g_idx", damp_percent=0.05)
    stage = stages.build(entry)
    assert isinstance(stage, GPTQStage)
    assert (stage.args, stage.act_order, stage.damp_percent) == (QuantArgs(4, 64, False), "g_idx", 0.05)
    model = make_tiny_model(layers=1)
    stage = GPTQStage(QuantArgs(4, 32, True), ["lm_head", "mlp.*"], true_sequential=False)
    run_layerwise(model, arch_for(model), _calibration(n=4), [stage], progress=False)
    assert sorted(stage.quantized) == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]


# ---------------------------------------------------------------------------
# The embedded model, small settings
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_gptq_recipe_beats_rtn_exports_and_reloads_to_the_same_perplexity(tmp_path):
    import json

    import yaml

    from compress import data, evaluate, models
    from compress.cli import main

    recipe = yaml.safe_load(open("recipes/smollm2-gptq-w4g128.yaml"))
    assert recipe["export"]["format"] == "gptq" and recipe["stages"][0]["type"] == "gptq"
    recipe["data"]["calibration"] = {"samples": 8, "seq_len": 256}
    recipe["data"]["evaluation"] = {"seq_len": 256, "max_windows": 4}
    recipe["eval"]["before"] = False
    recipe["export"]["output"] = str(tmp_path / "out")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    gptq_ppl = report["evaluation"]["after"]["perplexity"]
    assert report["export"]["quantized_linears"] == 210

    loaded = models.load("smollm2")
    corpus = data.load_corpus("wiki")
    windows = data.evaluation_windows(loaded.tokenizer, corpus.evaluation, 256, max_windows=4)
    rtn = RTNStage(QuantArgs(4, 128, True), ["lm_head"])
    run_layerwise(loaded.model, loaded.arch, windows[:1], [rtn], progress=False)
    rtn_ppl = evaluate.perplexity(loaded.model, windows, batch_size=4, progress=False)["perplexity"]
    assert gptq_ppl < rtn_ppl

    reloaded = models.load(out)
    ppl = evaluate.perplexity(reloaded.model, windows, batch_size=4, progress=False)["perplexity"]
    assert ppl == pytest.approx(gptq_ppl, rel=1e-5)
