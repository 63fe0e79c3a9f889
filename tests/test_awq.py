"""AWQ: scale search, folding, GQA-aware v → o, clipping, and the stage."""

from __future__ import annotations

import copy

import pytest
import torch

from compress import recipe as R
from compress import stages
from compress.arch import ARCHS, arch_for, decoder_layers, head_counts
from compress.calibrate import run_layerwise
from compress.quant import awq, int4
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage
from tests.conftest import make_tiny_model


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def _random_scales(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=gen) * 0.7)


# ---------------------------------------------------------------------------
# Folding changes no output, for every architecture, grouped heads included
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [a.name for a in ARCHS])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_folding_scales_preserves_output(arch, heads, kv_heads, tiny_windows):
    model = make_tiny_model(arch, heads=heads, kv_heads=kv_heads)
    a = arch_for(model)
    if a.qkv_bias:
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    before = _logits(model, tiny_windows)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    gen = torch.Generator().manual_seed(1)
    h, kv, _ = head_counts(model.config)
    for layer in decoder_layers(model, a):
        for pair in a.scaling_pairs:
            prev = layer.get_submodule(pair.prev)
            linears = [layer.get_submodule(n) for n in pair.linears]
            n_prev = prev.weight.shape[0]
            s = _random_scales(n_prev, gen)
            s_in = awq.expand_kv_scales(s, h, kv) if pair.kv_to_heads else s
            assert s_in.shape[0] == linears[0].in_features
            awq.fold_scales(prev, linears, s, s_in)
    after = _logits(model, tiny_windows)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_expand_kv_scales_matches_head_mapping():
    heads, kv_heads, d = 9, 3, 4
    s = torch.arange(kv_heads * d, dtype=torch.float32)
    expanded = awq.expand_kv_scales(s, heads, kv_heads)
    group = heads // kv_heads
    slow = torch.tensor([float(s[(h // group) * d + i]) for h in range(heads) for i in range(d)])
    assert torch.equal(expanded, slow)
    # Reducing an expanded statistic gives it back.
    assert torch.equal(awq.reduce_to_kv(expanded, heads, kv_heads), s)


# ---------------------------------------------------------------------------
# Pure math against slow references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [QuantArgs(4, 16, True), QuantArgs(4, 16, False), QuantArgs(3, -1, False)])
def test_vectorized_fake_quantize_matches_int4(args):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(awq.fake_quantize(w, args), int4.fake_quantize(w, args))


def test_weight_mean_matches_slow_loop():
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 32, generator=gen), torch.randn(4, 32, generator=gen)]
    got = awq.weight_mean(ws, 16)
    rows = torch.cat(ws)
    slow = torch.zeros(32)
    for i in range(32):
        g = i // 16
        for r in range(rows.shape[0]):
            slow[i] += rows[r, i].abs() / rows[r, g * 16 : (g + 1) * 16].abs().max()
    torch.testing.assert_close(got, slow / rows.shape[0])


def test_alpha_zero_gives_unit_scales():
    x_mean = torch.rand(32) * 10
    assert torch.equal(awq.awq_scales(x_mean, None, 0.0, duo=False), torch.ones(32))
    calls = []

    def loss(s):
        calls.append(s)
        return 1.0

    result = awq.search_scales(x_mean, None, loss, grid=1, duo=False)
    assert result.alpha is None and torch.equal(result.scales, torch.ones(32))
    assert len(calls) == 1  # α = 0 reuses the unit evaluation


def _outlier_problem(seed: int = 0):
    """A linear whose inputs have a few large channels: where AWQ should help."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=gen)
    x[:, :4] *= 20
    w = torch.randn(48, 64, generator=gen) * 0.1
    return x, w


@pytest.mark.parametrize("duo", [False, True])
def test_chosen_alpha_never_worse_than_alpha_zero(duo):
    args = QuantArgs(4, 16, True)
    x, w = _outlier_problem()
    ref = x @ w.T

    def slow_error(s):
        # Fold into copies, quantize with the shared int4 module, run the folded pair.
        w_folded = int4.fake_quantize(w * s, args)
        return float(((x / s) @ w_folded.T - ref).pow(2).mean())

    def loss(s):
        return float((x @ awq.quantized_scaled(w, s, args).T - ref).pow(2).mean())

    result = awq.search_scales(awq.channel_mean_abs(x), awq.weight_mean([w], 16), loss, grid=20, duo=duo)
    alpha0 = awq.awq_scales(awq.channel_mean_abs(x), awq.weight_mean([w], 16), 0.0, duo)
    assert result.error <= slow_error(alpha0) * (1 + 1e-5)
    assert result.error <= result.unit_error
    assert result.error == pytest.approx(slow_error(result.scales), rel=1e-4)
    # On outlier channels the search finds a real improvement.
    assert result.alpha is not None and result.error < 0.9 * result.unit_error


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_matches_slow_search_and_quantizer(symmetric):
    args = QuantArgs(4, 16, symmetric)
    x, w = _outlier_problem(1)
    w[3, 5] = 2.0  # an outlier weight worth clipping
    lo, hi = awq.clip_search(w, x, args, grid=10, max_shrink=0.5, row_block=7)
    clipped = awq.apply_clip(w, lo, hi, args.group_size)
    q = int4.fake_quantize(clipped, args)
    # Slow reference: one (row, group) at a time.
    for r in (0, 3, 20):
        for g in range(w.shape[1] // 16):
            cols = slice(g * 16, (g + 1) * 16)
            wg, xg = w[r : r + 1, cols], x[:, cols]
            errs = []
            wmin, wmax = min(float(wg.min()), 0.0), max(float(wg.max()), 0.0)
            if symmetric:
                wmax = max(-wmin, wmax)
                wmin = -wmax
            for i in range(5):
                # Clamp, then let the quantizer find the range: what the next stage will do.
                f = 1 - i / 10
                dq = int4.fake_quantize(wg.clamp(wmin * f, wmax * f), QuantArgs(4, -1, symmetric))
                errs.append(float((xg @ (dq - wg).T).pow(2).mean()))
            got = float((xg @ (q[r : r + 1, cols] - wg).T).pow(2).mean())
            assert got == pytest.approx(min(errs), rel=1e-4, abs=1e-9)
    assert (hi >= lo).all()


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stage_scaling_alone_preserves_function(arch, tiny_windows):
    model = make_tiny_model(arch, heads=4, kv_heads=2)
    before = _logits(model, tiny_windows)
    stage = awq.AWQStage(QuantArgs(4, 16, True), grid=5, clip=False)
    run_layerwise(model, arch_for(model), tiny_windows, [stage], progress=False)
    torch.testing.assert_close(_logits(model, tiny_windows), before, rtol=1e-4, atol=1e-4)
    assert len(stage.records) == 2 * 4  # every pair of both layers, v → o included
    assert all(r.error <= r.unit_error for r in stage.records)
    assert stage.notes and stage.notes[0].startswith("awq:")


def test_stage_skips_grouped_vo_when_asked(tiny_windows):
    model = make_tiny_model("llama", heads=4, kv_heads=2)
    stage = awq.AWQStage(QuantArgs(4, 16, True), grid=3, clip=False, gqa_aware_vo=False)
    run_layerwise(model, arch_for(model), tiny_windows, [stage], progress=False)
    assert {r.prev for r in stage.records} == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert any("skipped" in n for n in stage.notes)


def test_awq_then_rtn_not_worse_than_rtn_on_layer_outputs(tiny_windows):
    """AWQ+RTN with clipping lowers the quantized model's logit error against float."""
    base = make_tiny_model("llama", heads=4, kv_heads=2, hidden=128, intermediate=256)
    # Outlier input channels, as real models have, by scaling norm weights.
    with torch.no_grad():
        for layer in base.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:6] *= 12
    ref = _logits(base, tiny_windows)
    args = QuantArgs(4, 32, True)
    errors = {}
    for name, with_awq in (("rtn", False), ("awq", True)):
        m = copy.deepcopy(base)
        chain = [awq.AWQStage(args, grid=10)] if with_awq else []
        run_layerwise(m, arch_for(m), tiny_windows, [*chain, RTNStage(args)], progress=False)
        errors[name] = float((_logits(m, tiny_windows) - ref).pow(2).mean())
    assert errors["awq"] < errors["rtn"], errors


def test_recipe_fills_quantizer_and_builds_stage():
    recipe = R.parse(
        {
            "name": "t",
            "stages": [{"type": "awq", "grid": 7, "gqa_aware_vo": False}, {"type": "rtn", "group_size": 64}],
        }
    )
    stage = stages.build(recipe.stages[0])
    assert isinstance(stage, awq.AWQStage)
    assert stage.args == QuantArgs(4, 64, True)
    assert stage.grid == 7 and not stage.gqa_aware_vo


def test_recipes_validate():
    for path in ("recipes/smollm2-awq-w4g128.yaml", "recipes/smollm2-awq-gptq-w4g128.yaml"):
        recipe = R.load(path)
        assert recipe.stages[0].type == "awq"
        assert recipe.stages[0].group_size == 128


# ---------------------------------------------------------------------------
# Embedded model
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_awq_rtn_beats_rtn_on_embedded_model():
    from compress import data, evaluate, models

    loaded = models.load("smollm2")
    corpus = data.load_corpus("wiki")
    calib = data.calibration_windows(loaded.tokenizer, corpus.calibration, 2, 256, seed=0)
    windows = data.evaluation_windows(loaded.tokenizer, corpus.evaluation, 256, max_windows=4)
    args = QuantArgs(4, 128, True)
    ppl = {}
    # Coarse-to-fine α on a 512-token search subsample, no clip search: short on a shared CPU.
    stage = awq.AWQStage(args, grid=10, coarse_step=4, clip=False, search_tokens=512)
    for name, chain in (("rtn", []), ("awq", [stage])):
        m = copy.deepcopy(loaded.model)
        run_layerwise(m, loaded.arch, calib, [*chain, RTNStage(args)], progress=False)
        ppl[name] = evaluate.perplexity(m, windows, batch_size=4, progress=False)["perplexity"]
    assert ppl["awq"] < ppl["rtn"], ppl


def test_coarse_to_fine_finds_the_grid_minimum_with_fewer_evaluations():
    x_mean = torch.rand(16) + 0.1
    calls = []
    for target in (0.0, 0.35, 0.6, 0.95):
        calls.clear()

        def loss(s, target=target):
            # One minimum over α: recover α from the scales' spread.
            calls.append(s)
            spread = float(torch.log(s.max() / s.min()))
            full_spread = float(torch.log(x_mean.max() / x_mean.min()))
            return (spread / full_spread - target) ** 2 + 0.01

        full = awq.search_scales(x_mean, None, loss, grid=20, duo=False)
        n_full = len(calls)
        calls.clear()
        coarse = awq.search_scales(x_mean, None, loss, grid=20, duo=False, coarse_step=4)
        assert coarse.alpha == full.alpha
        assert len(calls) < n_full / 2


# ---------------------------------------------------------------------------
# Search subsample and one forward per layer
# ---------------------------------------------------------------------------


def test_even_positions_and_pick_windows():
    assert awq.even_positions(100, 0) is None and awq.even_positions(100, 100) is None
    p = awq.even_positions(100, 10)
    assert len(p) == 10 and int(p[0]) == 0 and int(p[-1]) == 99
    # 7 windows in batches of 3, 3, 1; 2 windows of 16 tokens wanted for 20 tokens.
    rows = awq.pick_windows([3, 3, 1], 16, 20)
    assert sum(len(r) for r in rows) == 2 and all(0 <= i < b for r, b in zip(rows, [3, 3, 1]) for i in r)
    assert awq.pick_windows([3, 3, 1], 16, 0) == [[0, 1, 2], [0, 1, 2], [0]]


def test_token_sampler_takes_global_positions_across_batches():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    positions = torch.tensor([0, 4, 5, 9, 13, 14])
    sampler = awq._TokenSampler(positions)
    parts = [sampler.take(x[:, :, :]), sampler.take(x + 100)]
    flat = torch.cat([x.reshape(-1, 3), (x + 100).reshape(-1, 3)])
    assert torch.equal(torch.cat(parts), flat[positions])


def _record(model, windows, stage, batch_size):
    """The stage's record of layer 0, through the engine's own layer context."""
    from compress.calibrate import LayerContext, capture_layer_inputs

    a = arch_for(model)
    inputs = capture_layer_inputs(model, a, windows, batch_size, "cpu")
    layer = decoder_layers(model, a)[0]
    ctx = LayerContext(0, f"{a.layers_path}.0", layer, a, model.config, inputs, torch.device("cpu"), model)
    return ctx, stage._record(ctx, stage._pairs(ctx), stage._clip_names(ctx))


@pytest.mark.parametrize("search_tokens", [0, 40])
def test_recorded_calls_replay_exactly(search_tokens, tiny_windows):
    """Replaying a recorded subsample through its module gives the recorded outputs (mask etc. sliced along)."""
    model = make_tiny_model("llama", heads=4, kv_heads=2)
    stage = awq.AWQStage(QuantArgs(4, 16, True), search_tokens=search_tokens)
    ctx, record = _record(model, tiny_windows, stage, batch_size=3)
    seq = tiny_windows.shape[1]
    for name, calls in record.calls.items():
        assert awq.module_error(ctx.submodule(name), calls) == 0.0
        tokens = sum(o.reshape(-1, o.shape[-1]).shape[0] for o in calls.outputs)
        if search_tokens == 0:
            assert tokens == tiny_windows.numel()
        elif name == ctx.arch.attention:
            assert tokens == -(-search_tokens // seq) * seq  # whole windows
        else:
            assert tokens == search_tokens


def test_clip_on_derived_inputs_matches_a_fresh_forward(tiny_windows):
    """The clip search's inputs (recorded before folding, divided by the scales) are the folded layer's."""
    base = make_tiny_model("llama", heads=4, kv_heads=2)
    args = QuantArgs(4, 16, False)
    one = copy.deepcopy(base)
    run_layerwise(one, arch_for(one), tiny_windows, [awq.AWQStage(args, grid=5, clip_tokens=50)], progress=False)

    two = copy.deepcopy(base)
    scale_only = awq.AWQStage(args, grid=5, clip=False)
    clip_only = awq.AWQStage(args, grid=5, clip_tokens=50)

    class Then:
        name = "then"

        def apply_layer(self, ctx):
            scale_only.apply_layer(ctx)
            # A fresh forward of the folded layer gives the clip inputs, then the clip as the stage does it.
            names = clip_only._clip_names(ctx)
            record = clip_only._record(ctx, [], names)
            for n in names:
                lin = ctx.submodule(n)
                lo, hi = awq.clip_search(lin.weight.data, record.clip_inputs[n], args, 20, 0.5)
                lin.weight.data = awq.apply_clip(lin.weight.data, lo, hi, args.group_size)

    run_layerwise(two, arch_for(two), tiny_windows, [Then()], progress=False)
    for (name, p1), (_, p2) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


def test_recipe_search_tokens_reach_the_stage():
    recipe = R.parse(
        {"name": "t", "stages": [{"type": "awq", "search_tokens": 0, "clip_tokens": 128}, {"type": "rtn"}]}
    )
    stage = stages.build(recipe.stages[0])
    assert stage.search_tokens == 0 and stage.clip_tokens == 128
