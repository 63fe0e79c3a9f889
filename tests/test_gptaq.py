"""GPTQ towards the float model's outputs (``float_target``, GPTAQ): the math against a direct
least-squares solve, and the stage's float walk against the float model."""

from __future__ import annotations

import pytest
import torch

from compress import recipe as R
from compress import stages
from compress.arch import arch_for
from compress.calibrate import run_layerwise
from compress.quant.gptq import (
    CrossAccumulator,
    GPTQError,
    GPTQStage,
    float_target_weight,
    hessian_from_inputs,
    run_gptq,
)
from compress.quant.int4 import QuantArgs
from tests.conftest import make_tiny_model, torch_threads
from tests.test_gptq import _calibration, correlated_problem


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def drifted(x: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """``x`` as a quantized model would pass it on: a correlated distortion plus noise."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[1]
    mix = torch.eye(n, dtype=x.dtype) + strength * torch.randn(n, n, generator=g, dtype=x.dtype) / n**0.5
    return x @ mix + strength * x.std() * torch.randn(x.shape, generator=g, dtype=x.dtype)


def hessian64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2.0 / x.shape[0] * (x.T @ x)


def cross_of(x_quantized: torch.Tensor, x_float: torch.Tensor) -> torch.Tensor:
    return 2.0 / x_quantized.shape[0] * (x_quantized.T @ (x_float - x_quantized))


def objective(x_float, x_quantized, w, w_hat, lam):
    """2/n·‖X̃Ŵᵀ − XWᵀ‖² + λ‖Ŵ − W‖², in float64."""
    xf, xq, w, w_hat = (t.double() for t in (x_float, x_quantized, w, w_hat))
    return (2.0 / xq.shape[0] * ((xq @ w_hat.T - xf @ w.T) ** 2).sum() + lam * ((w_hat - w) ** 2).sum()).item()


def test_float_target_is_the_damped_least_squares_fit():
    w, x = correlated_problem(seed=3, dtype=torch.float64)
    xq = drifted(x, 0.3, seed=4)
    h, cross = hessian64(xq), cross_of(xq, x)
    target = float_target_weight(w, h, cross, 0.01)
    # Direct solve of the normal equations: (H + λI) W'ᵀ = 2/n·X̃ᵀX·Wᵀ + λWᵀ.
    lam = 0.01 * torch.diag(h).mean().item()
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(h + lam * eye, 2.0 / x.shape[0] * (xq.T @ x) @ w.T + lam * w.T).T
    torch.testing.assert_close(target, expected, rtol=1e-8, atol=1e-10)
    # Strength α: the same fit towards the outputs X̃Wᵀ + α(X − X̃)Wᵀ.
    partway = xq + 0.25 * (x - xq)
    expected_partway = torch.linalg.solve(h + lam * eye, 2.0 / x.shape[0] * (xq.T @ partway) @ w.T + lam * w.T).T
    torch.testing.assert_close(float_target_weight(w, h, cross, 0.01, 0.25), expected_partway, rtol=1e-8, atol=1e-10)
    assert torch.equal(float_target_weight(w, h, cross, 0.01, 0.0), w)
    # ... and the objective at W' is below that at W and at small perturbations of W'.
    best = objective(x, xq, w, target, lam)
    assert best < objective(x, xq, w, w, lam)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        nudged = target + 1e-3 * torch.randn(target.shape, generator=g, dtype=torch.float64)
        assert best < objective(x, xq, w, nudged, lam)


def test_float_objective_is_gptq_loss_around_the_target_plus_a_constant():
    """What makes GPTQ on (W', H) the right thing: for every Ŵ, the float-output objective equals
    (Ŵ − W')(H + λI)(Ŵ − W')ᵀ plus a constant independent of Ŵ."""
    w, x = correlated_problem(seed=5, dtype=torch.float64)
    xq = drifted(x, 0.5, seed=6)
    h, cross = hessian64(xq), cross_of(xq, x)
    lam = 0.01 * torch.diag(h).mean().item()
    target = float_target_weight(w, h, cross, 0.01)
    damped = h + lam * torch.eye(h.shape[0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    constants = []
    for _ in range(4):
        w_hat = w + 0.02 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        around = ((w_hat - target) @ damped * (w_hat - target)).sum().item()
        constants.append(objective(x, xq, w, w_hat, lam) - around)
    assert max(constants) - min(constants) < 1e-9 * max(abs(c) for c in constants)


def test_float32_hessian_is_damped_in_place_and_restored_exactly():
    """In float32 the target is solved in H's own buffer (damped, then restored bit for bit): the
    same target as from a copy, and H unchanged after, also when a failed factorization raised
    the dampening on the way."""
    w, x = correlated_problem(seed=8)
    xq = drifted(x, 0.3, seed=9)
    cross = cross_of(xq, x)
    n = w.shape[1]
    indefinite = 2 * torch.eye(n) - torch.ones(n, n)  # Cholesky fails until λ > n - 2
    for h in (hessian_from_inputs(xq), indefinite):
        kept = h.clone()
        from_copy = float_target_weight(w.double(), h.double(), cross.double(), 0.01).float()
        in_place = float_target_weight(w, h, cross, 0.01)
        assert torch.equal(h, kept)
        torch.testing.assert_close(in_place, from_copy, rtol=1e-4, atol=1e-6)
        assert torch.equal(in_place, float_target_weight(w, kept.clone(), cross, 0.01))


def test_cross_term_formed_in_a_spare_float_copy_is_the_same():
    xq = torch.randn(64, 24, generator=torch.Generator().manual_seed(0))
    x = drifted(xq, 0.4, seed=2)
    plain, spare = CrossAccumulator(24, torch.device("cpu")), CrossAccumulator(24, torch.device("cpu"))
    for rows in (slice(0, 40), slice(40, 64)):
        plain.add(xq[rows], x[rows])
        spare.add(xq[rows], x[rows].clone(), float_is_spare=True)
    assert torch.equal(plain.value(), spare.take()) and spare.sum is None


def test_cross_term_in_bfloat16_products_is_the_float32_one_to_rounding():
    """product_dtype: the drift term's products in bfloat16, summed in float32, from bfloat16 or
    float32 inputs: the float32 term to within bfloat16's rounding (and not bit for bit)."""
    _, x = correlated_problem(seed=3, tokens=512)
    xq = drifted(x, 0.2, seed=4)
    for dtype in (torch.float32, torch.bfloat16):
        exact = CrossAccumulator(x.shape[1], x.device)
        rounded = CrossAccumulator(x.shape[1], x.device, torch.bfloat16)
        for start in range(0, 512, 128):
            rows = slice(start, start + 128)
            exact.add(xq[rows].to(dtype), x[rows].to(dtype))
            rounded.add(xq[rows].to(dtype), x[rows].to(dtype))
        assert rounded.sum.dtype == torch.float32
        expected = exact.value()
        error = ((rounded.value() - expected).norm() / expected.norm()).item()
        assert 0 < error < 1e-2, (dtype, error)
    assert CrossAccumulator(4, x.device, torch.float32).product_dtype is None


def test_no_drift_leaves_the_weight_alone_and_bad_input_is_one_error():
    w, x = correlated_problem(seed=7)
    h = hessian_from_inputs(x)
    assert torch.equal(float_target_weight(w, h, torch.zeros_like(h), 0.01), w)
    assert torch.equal(float_target_weight(w, torch.zeros_like(h), torch.zeros_like(h), 0.01), w)
    with pytest.raises(GPTQError, match="do not fit"):
        float_target_weight(w, h, h[:-1, :-1], 0.01)
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(GPTQError, match="non-finite"):
        float_target_weight(w, h, bad, 0.01)


def test_cross_accumulator_in_batches_is_the_full_product():
    _, x = correlated_problem(seed=8, tokens=512)
    xq = drifted(x, 0.2, seed=9)
    acc = CrossAccumulator(x.shape[1], x.device)
    acc.add(xq[:128].reshape(16, 8, -1), x[:128].reshape(16, 8, -1))  # [batch, tokens, features] too
    for start in range(128, 512, 128):
        acc.add(xq[start : start + 128], x[start : start + 128])
    torch.testing.assert_close(acc.value(), cross_of(xq, x).float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(GPTQError, match="do not align"):
        acc.add(xq[:4], x[:5])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", ["none", "static", "g_idx"])
def test_gptq_on_the_float_target_fits_the_float_outputs_better(symmetric, act_order):
    args = QuantArgs(4, 32, symmetric)
    for seed in range(3):
        w, x = correlated_problem(seed=10 + seed)
        xq = drifted(x, 0.3, seed=20 + seed)
        h = hessian_from_inputs(xq)
        plain = run_gptq(w, h, args, act_order=act_order).qweight.dequantize()
        target = float_target_weight(w, h, cross_of(xq, x), 0.01)
        towards_float = run_gptq(target, h, args, act_order=act_order).qweight.dequantize()
        error = {k: objective(x, xq, w, v, 0.0) for k, v in (("plain", plain), ("float", towards_float))}
        assert error["float"] < error["plain"], (seed, error)


def _last_layer_float_output(model, windows):
    seen = []
    last = model.model.layers[-1]
    hook = last.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    return seen[0]


def test_stage_walks_the_float_model_beside_the_quantized_one():
    """Layer 0's q/k/v see the float inputs (no drift yet), so their records equal plain GPTQ's;
    every later linear's differ; the float stream the stage carries is the float model's."""
    windows = _calibration(seed=4, n=6)
    float_out = _last_layer_float_output(make_tiny_model(layers=2), windows)
    runs = {}
    for float_target in (False, True):
        model = make_tiny_model(layers=2)
        stage = GPTQStage(QuantArgs(4, 32, False), ["lm_head"], float_target=float_target)
        run_layerwise(model, arch_for(model), windows, [stage], batch_size=6, progress=False)
        runs[float_target] = stage
    plain, towards_float = runs[False].quantized, runs[True].quantized
    assert plain.keys() == towards_float.keys() and len(plain) == 14
    for name in plain:
        same = all(torch.equal(getattr(plain[name], f), getattr(towards_float[name], f)) for f in ("codes", "scales"))
        first_inputs = name.startswith("model.layers.0.self_attn.") and name[-6:] in ("q_proj", "k_proj", "v_proj")
        assert same == first_inputs, name
    stage = runs[True]
    assert stage._float_hidden_layer == 2
    torch.testing.assert_close(torch.cat(stage._float_hidden), float_out, rtol=1e-5, atol=1e-5)


def test_resumed_float_target_run_equals_an_uninterrupted_one(tmp_path):
    """The float stream goes through resume_state (saved by torch.save, read weights_only)."""
    windows = _calibration(seed=5, n=4)
    args = QuantArgs(4, 32, True)
    whole = GPTQStage(args, ["lm_head"], float_target=1.0)
    model = make_tiny_model(layers=2)
    run_layerwise(model, arch_for(model), windows, [whole], batch_size=4, progress=False)

    first = GPTQStage(args, ["lm_head"], float_target=1.0)
    model = make_tiny_model(layers=2)
    saved = {}

    class StopAfterFirstLayer(Exception):
        pass

    def stop(index, inputs):
        torch.save(first.resume_state(), tmp_path / "state.pt")
        saved["inputs"] = inputs
        raise StopAfterFirstLayer

    with pytest.raises(StopAfterFirstLayer):
        run_layerwise(model, arch_for(model), windows, [first], batch_size=4, progress=False, on_layer_done=stop)
    second = GPTQStage(args, ["lm_head"], float_target=1.0)
    second.load_resume_state(torch.load(tmp_path / "state.pt", weights_only=True))
    resume = {"batch_size": 4, "progress": False, "start_layer": 1, "inputs": saved["inputs"]}
    run_layerwise(model, arch_for(model), windows, [second], **resume)
    assert not [n for n in second.notes if "starts here" in n]
    for name, qw in second.quantized.items():
        assert torch.equal(qw.codes, whole.quantized[name].codes), name
    # Without the state, a resumed run starts the float stream over, and says so.
    third = GPTQStage(args, ["lm_head"], float_target=1.0)
    run_layerwise(model, arch_for(model), windows, [third], **resume)
    assert any("starts here" in n for n in third.notes)


def test_recipe_option():
    entry = R.GPTQStage(type="gptq", float_target=1.0)
    assert stages.build(entry).float_target
    assert GPTQStage(QuantArgs(4, 32, True)).resume_state() == {}
    assert stages.build(R.GPTQStage(type="gptq", float_target=0.25)).float_target == 0.25
    with pytest.raises(GPTQError, match="between 0 and 1"):
        GPTQStage(QuantArgs(4, 32, True), float_target=1.5)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        R.GPTQStage(type="gptq", float_target=2)
    with pytest.raises(ValueError, match="float_target needs true_sequential"):
        R.GPTQStage(type="gptq", float_target=1.0, true_sequential=False)


@pytest.mark.parametrize("ignore", [["lm_head"], ["lm_head", "mlp.down_proj"]])
def test_streaming_the_float_walks_down_inputs_changes_nothing(ignore):
    """The float walk hands down_proj's inputs over batch by batch (memory): the records, the
    outputs and the float stream are bit for bit those of the walk that keeps them all."""
    windows = _calibration(seed=6, n=6)
    runs = []
    for stream in (True, False):
        model = make_tiny_model(layers=2)
        stage = GPTQStage(QuantArgs(4, 32, False), ignore, float_target=0.5)
        stage.stream_float_down = stream
        outputs = run_layerwise(model, arch_for(model), windows, [stage], batch_size=2, progress=False)
        runs.append((stage, outputs.hidden))
    (streamed, streamed_out), (kept, kept_out) = runs
    assert streamed.quantized.keys() == kept.quantized.keys()
    for name, qw in streamed.quantized.items():
        assert torch.equal(qw.codes, kept.quantized[name].codes) and torch.equal(qw.scales, kept.quantized[name].scales)
    for a, b in zip([*streamed_out, *streamed._float_hidden], [*kept_out, *kept._float_hidden], strict=True):
        assert torch.equal(a, b)


def test_float_walk_on_the_first_windows_only():
    """float_target_windows: the float model is walked on the leading batches that hold that many
    windows (its stream equals the float model's outputs on them), while the Hessians keep every
    window (layer 0's q/k/v, where nothing has drifted yet, equal plain GPTQ on all windows);
    covering every window is bit for bit the default."""
    windows = _calibration(seed=7, n=6)
    float_out = _last_layer_float_output(make_tiny_model(layers=2), windows)
    runs = {}
    for label, alpha, subset in (("plain", 0.0, None), ("all", 0.5, None), ("all6", 0.5, 6), ("first3", 0.5, 3)):
        model = make_tiny_model(layers=2)
        stage = GPTQStage(QuantArgs(4, 32, True), ["lm_head"], float_target=alpha, float_target_windows=subset)
        run_layerwise(model, arch_for(model), windows, [stage], batch_size=2, progress=False)
        runs[label] = stage
    first3 = runs["first3"]
    assert len(first3._float_hidden) == 2  # 3 windows in batches of 2: two batches
    torch.testing.assert_close(torch.cat(first3._float_hidden), float_out[:4], rtol=1e-5, atol=1e-5)
    for name, qw in runs["all"].quantized.items():
        assert torch.equal(qw.codes, runs["all6"].quantized[name].codes), name
    differs = 0
    for name, qw in first3.quantized.items():
        same = torch.equal(qw.codes, runs["plain"].quantized[name].codes)
        if name.startswith("model.layers.0.self_attn.") and name[-6:] in ("q_proj", "k_proj", "v_proj"):
            assert same, name
        differs += not torch.equal(qw.codes, runs["all"].quantized[name].codes)
    assert differs > 0  # the drift term from fewer windows is another estimate


def test_float_target_windows_option():
    entry = R.GPTQStage(type="gptq", float_target=0.25, float_target_windows=32)
    assert stages.build(entry).float_target_windows == 32
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        R.GPTQStage(type="gptq", float_target=0.25, float_target_windows=0)
    with pytest.raises(ValueError, match="float_target_windows needs float_target"):
        R.GPTQStage(type="gptq", float_target_windows=8)
    with pytest.raises(GPTQError, match="at least 1"):
        GPTQStage(QuantArgs(4, 32, True), float_target=0.5, float_target_windows=0)
