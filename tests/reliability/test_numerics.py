"""Hard numerics: dead channels, huge outliers, rank-deficient Hessians never give NaN or Inf,
and the stage says what it did (dampening raised, dead columns zeroed, scales clipped)."""

from __future__ import annotations

import logging

import pytest
import torch

from compress import models, pipeline
from compress.arch import arch_for
from compress.calibrate import run_layerwise
from compress.quant import int4
from compress.quant.awq import AWQStage, awq_scales, clip_search, quantized_scaled, search_scales
from compress.quant.gptq import GPTQError, GPTQStage, run_gptq
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage
from tests.conftest import make_tiny_model

ARGS = [QuantArgs(4, 16, True), QuantArgs(4, 16, False), QuantArgs(2, -1, False), QuantArgs(8, 8, True),
        QuantArgs(4, 24, False)]  # 24: a ragged last group on 64 columns


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hostile_weight(kind: str) -> torch.Tensor:
    w = torch.randn(32, 64, generator=_gen()) * 0.05
    if kind == "dead_rows":
        w[::3] = 0
    elif kind == "dead_columns":
        w[:, 10:30] = 0
    elif kind == "outlier":
        w[3, 7] = 1e4
    elif kind == "beyond_float16_scale":
        w[5, :16] = 1e7  # scale 2·1e7/15 > 65504: clipped
    elif kind == "subnormal":
        w = w * 1e-30
    elif kind == "constant":
        w = torch.full_like(w, 0.3)
    elif kind == "all_zero":
        w = torch.zeros_like(w)
    return w


WEIGHT_KINDS = ["dead_rows", "dead_columns", "outlier", "beyond_float16_scale", "subnormal", "constant", "all_zero"]


def _assert_valid(qw: int4.QuantizedWeight) -> None:
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    assert int(qw.codes.max()) <= qw.args.maxq
    assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_rtn_never_produces_nan_or_inf(kind):
    w = hostile_weight(kind)
    for args in ARGS:
        qw = int4.quantize(w, args)
        _assert_valid(qw)
        if kind in ("dead_rows", "all_zero"):  # zeros stay exactly zero
            zero_rows = (w == 0).all(dim=1)
            assert (qw.dequantize()[zero_rows] == 0).all()


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def hostile_hessian(kind: str) -> torch.Tensor:
    x = torch.randn(256, 64, generator=_gen(1))
    if kind == "zero":
        return torch.zeros(64, 64)
    if kind == "rank_4":
        return _hessian(torch.randn(4, 64, generator=_gen(2)))
    if kind == "rank_1_huge":
        return _hessian(torch.randn(1, 64, generator=_gen(3)) * 1e5)
    if kind == "dead_channels":
        return _hessian(x * (torch.arange(64) % 3 != 0))
    if kind == "outlier_channel":
        return _hessian(x * torch.where(torch.arange(64) == 5, 1e4, 1.0))
    if kind == "twelve_decades":
        return _hessian(x * torch.logspace(-6, 6, 64))
    if kind == "duplicate_columns":
        return _hessian(torch.cat([x[:, :32], x[:, :32]], dim=1))
    raise ValueError(kind)


HESSIAN_KINDS = ["zero", "rank_4", "rank_1_huge", "dead_channels", "outlier_channel", "twelve_decades",
                 "duplicate_columns"]


@pytest.mark.parametrize("kind", HESSIAN_KINDS)
def test_gptq_never_produces_nan_or_inf(kind):
    h = hostile_hessian(kind)
    for w_kind in ("outlier", "dead_columns", "beyond_float16_scale"):
        w = hostile_weight(w_kind)
        for act_order in ("none", "static", "g_idx"):
            result = run_gptq(w, h, QuantArgs(4, 16, False), act_order=act_order, block_size=16)
            _assert_valid(result.qweight)
            assert torch.isfinite(torch.tensor(result.loss))


def test_gptq_says_what_it_did():
    dead = run_gptq(hostile_weight("outlier"), hostile_hessian("dead_channels"), QuantArgs(4, 16, True))
    assert any("22 dead input column(s)" in n for n in dead.notes)
    assert (dead.qweight.dequantize()[:, ::3] == 0).all()  # dead columns: weights set to 0
    # Tiny dampening on a singular Hessian: Cholesky fails, the dampening is raised, not NaN.
    singular = run_gptq(hostile_weight("outlier"), hostile_hessian("rank_4"), QuantArgs(4, 16, True), 1e-9)
    assert any("dampening raised" in n for n in singular.notes)
    _assert_valid(singular.qweight)


def test_gptq_refuses_non_finite_activations():
    h = hostile_hessian("rank_4")
    h[3, 3] = float("inf")
    with pytest.raises(GPTQError, match="non-finite"):
        run_gptq(hostile_weight("outlier"), h, QuantArgs(4, 16, True))


@pytest.mark.parametrize("kind", ["dead", "outlier", "both", "all_dead"])
def test_awq_scales_and_clipping_stay_finite(kind):
    x = torch.randn(128, 64, generator=_gen(4))
    if kind in ("dead", "both"):
        x[:, ::4] = 0
    if kind in ("outlier", "both"):
        x[:, 9] *= 1e4
    if kind == "all_dead":
        x.zero_()
    w = hostile_weight("outlier")
    args = QuantArgs(4, 16, True)
    x_mean = x.abs().mean(0)
    w_mean = w.abs().mean(0)
    for alpha in (0.0, 0.5, 0.95):
        s = awq_scales(x_mean, w_mean, alpha, duo=True)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.isfinite(quantized_scaled(w, s, args)).all()

    def loss(s):
        return float(((x @ (quantized_scaled(w, s, args) - w).T) ** 2).mean())

    result = search_scales(x_mean, w_mean, loss, grid=5)
    assert torch.isfinite(result.scales).all() and result.error <= result.unit_error
    lo, hi = clip_search(w, x, args, grid=5)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()


def _hostile_tiny_model():
    """Dead and huge hidden channels from the embedding on: every linear of every layer sees them."""
    model = make_tiny_model(layers=2)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0:4] = 0.0  # dead channels
        emb[:, 7] *= 1e4  # a huge outlier channel
        model.model.layers[1].mlp.down_proj.weight[:, :16] = 0.0  # dead weight columns
    return model


@pytest.mark.parametrize("stages", ["rtn", "gptq", "awq+gptq"])
def test_stages_on_hostile_activations(stages, tiny_windows, caplog):
    model = _hostile_tiny_model()
    args = QuantArgs(4, 16, False)
    built = {
        "rtn": lambda: [RTNStage(args, ["lm_head"])],
        "gptq": lambda: [GPTQStage(args, ["lm_head"], block_size=16)],
        "awq+gptq": lambda: [AWQStage(args, grid=4, clip_grid=4), GPTQStage(args, ["lm_head"], block_size=16)],
    }[stages]()
    with caplog.at_level(logging.WARNING, logger="compress"):
        final = run_layerwise(model, arch_for(model), tiny_windows, built, batch_size=3, progress=False)
    assert all(torch.isfinite(h).all() for h in final.hidden)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    quant = built[-1]
    assert len(quant.quantized) == 2 * 7
    for qw in quant.quantized.values():
        _assert_valid(qw)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tiny_windows).logits).all()
    if stages != "rtn":
        # The dead hidden channels are dead input columns of q/k/v and gate/up: GPTQ says so.
        assert any("dead input column" in n for n in quant.notes), quant.notes
        assert "dead input column" in caplog.text


def test_saturated_float16_scales_are_noted(tiny_windows):
    model = make_tiny_model(layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :16] = 1e7
    stage = RTNStage(QuantArgs(4, 16, True), ["lm_head"])
    run_layerwise(model, arch_for(model), tiny_windows, [stage], progress=False)
    assert any("mlp.up_proj: 1 group(s) beyond the float16 scale range" in n for n in stage.notes), stage.notes
    assert torch.isfinite(model.model.layers[0].mlp.up_proj.weight).all()


def test_model_with_nan_weights_is_refused():
    model = make_tiny_model(layers=1)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[2, 3] = float("nan")
    with pytest.raises(models.ModelLoadError, match=r"layers\.0\.self_attn\.v_proj\.weight holds NaN"):
        pipeline.check_finite(model)
