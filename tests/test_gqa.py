"""MHA→GQA: permutation invariance, exactness cases, fit against mean, and transformers round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from compress import gqa_math as M
from compress.arch import arch_for, kv_cache_bytes_per_token
from compress.calibrate import run_layerwise
from compress.gqa import GQAStage, check_heads, read_attention
from compress.recipe import RecipeError
from tests.conftest import make_tiny_model

D, d = 32, 8


def random_attention(heads: int = 4, kv_heads: int = 4, seed: int = 0, bias: bool = True) -> M.Attention:
    g = torch.Generator().manual_seed(seed)

    def proj(n):
        w = torch.randn(n * d, D + 1, generator=g, dtype=torch.float64)
        if not bias:
            w[:, -1] = 0
        return M.split_heads(w, d)

    o = torch.randn(heads, D, d, generator=g, dtype=torch.float64)
    return M.Attention(proj(heads), proj(kv_heads), proj(kv_heads), o, M.kv_of_queries(heads, kv_heads))


def random_cov(seed: int = 1, tokens: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g) * torch.linspace(0.1, 2, D)
    x = torch.randn(tokens, D, generator=g) @ mix + 0.3
    return M.second_moment(x) / tokens


def attention_reference(att: M.Attention, x: torch.Tensor) -> torch.Tensor:
    """Slow, obvious causal attention with RoPE on one sequence ``x`` ``[T, D]`` → ``[T, D]``."""
    T = x.shape[0]
    xa = torch.cat([x, torch.ones(T, 1, dtype=x.dtype)], 1)
    pos = torch.arange(T, dtype=x.dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], 1)
    cos, sin = ang.cos(), ang.sin()

    def rope(t):
        half = d // 2
        rot = torch.cat([-t[:, half:], t[:, :half]], 1)
        return t * cos + rot * sin

    out = torch.zeros(T, D, dtype=x.dtype)
    mask = torch.ones(T, T).tril().bool()
    for h in range(att.num_heads):
        q = rope(xa @ att.q[h].T)
        k = rope(xa @ att.k[att.kv_of[h]].T)
        v = xa @ att.v[att.kv_of[h]].T
        s = (q @ k.T / d**0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        out += (s @ v) @ att.o[h].T
    return out


def as_attention(pooled: M.Pooled) -> M.Attention:
    return M.Attention(pooled.q, pooled.k, pooled.v, pooled.o, M.kv_of_queries(pooled.q.shape[0], pooled.k.shape[0]))


ROTARY = M.Rotary.default(d, seq_len=16)


def objectives(att: M.Attention, pooled: M.Pooled, cov: torch.Tensor) -> tuple[float, float]:
    new_kv = M.kv_of_queries(att.num_heads, pooled.k.shape[0])
    key = sum(M.key_objective(att.q[h], att.k[att.kv_of[h]], pooled.q[h], pooled.k[new_kv[h]], cov, ROTARY)
              for h in range(att.num_heads))
    val = sum(M.value_objective(att.o[h], att.v[att.kv_of[h]], pooled.o[h], pooled.v[new_kv[h]], cov)
              for h in range(att.num_heads))
    return float(key), float(val)


def test_query_permutation_changes_no_output():
    att = random_attention(heads=6, kv_heads=3)
    x = torch.randn(10, D, dtype=torch.float64)
    ref = attention_reference(att, x)
    order = [4, 1, 5, 0, 3, 2]
    torch.testing.assert_close(attention_reference(att.permute_queries(order), x), ref)


@pytest.mark.parametrize("pooling", M.POOLINGS)
@pytest.mark.parametrize("grouping", M.GROUPINGS)
def test_same_kv_heads_is_identity(pooling, grouping):
    att = random_attention(heads=6, kv_heads=3)
    pooled, order = M.convert(att, 3, pooling, grouping, random_cov())
    assert order == list(range(6))
    x = torch.randn(9, D, dtype=torch.float64)
    torch.testing.assert_close(attention_reference(as_attention(pooled), x), attention_reference(att, x))


@pytest.mark.parametrize("pooling", M.POOLINGS)
@pytest.mark.parametrize("grouping", M.GROUPINGS)
def test_identical_heads_in_group_pool_exactly(pooling, grouping):
    """An MHA model whose heads come in identical (scrambled) pairs is secretly GQA: every pooling is exact."""
    att = random_attention(heads=6, kv_heads=6)
    pairs = [(0, 3), (1, 4), (2, 5)] if grouping == "similarity" else [(0, 1), (2, 3), (4, 5)]
    for a, b in pairs:
        att.k[b], att.v[b] = att.k[a], att.v[a]
    pooled, order = M.convert(att, 3, pooling, grouping, random_cov())
    x = torch.randn(9, D, dtype=torch.float64)
    torch.testing.assert_close(attention_reference(as_attention(pooled), x), attention_reference(att, x))
    if grouping == "similarity":
        assert sorted(tuple(sorted(order[i : i + 2])) for i in (0, 2, 4)) == pairs


def test_fit_never_worse_than_mean_on_its_objective():
    cov = random_cov()
    for seed in range(2):
        att = random_attention(heads=4, kv_heads=4, seed=seed, bias=seed % 2 == 0)
        for groups in (2, 1):
            scores = {p: objectives(att, M.pool(att, groups, p, cov, ROTARY), cov) for p in M.POOLINGS}
            assert scores["fit"][0] <= scores["mean"][0] * (1 + 1e-9)
            assert scores["fit"][1] <= scores["mean"][1] * (1 + 1e-9)
            assert scores["fit_q"][0] <= scores["fit"][0] * (1 + 1e-9)
            assert scores["fit_q"][1] == pytest.approx(scores["fit"][1])
            assert scores["fit"][1] < scores["mean"][1]  # random heads: the refit really helps


def test_fit_keys_is_weighted_least_squares():
    """The closed form beats small random perturbations of itself on the key objective."""
    cov = random_cov()
    att = random_attention(heads=4, kv_heads=4, seed=3)
    k = M.fit_keys(att.q, att.k, cov, ROTARY)

    def obj(k_new):
        return sum(float(M.key_objective(att.q[h], att.k[h], att.q[h], k_new, cov, ROTARY)) for h in range(4))

    best = obj(k)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert best <= obj(k + 1e-3 * torch.randn(k.shape, generator=g, dtype=k.dtype))


def test_similarity_grouping_beats_contiguous_on_its_cost():
    att = random_attention(heads=8, kv_heads=8, seed=5)
    cov = random_cov()
    dist = M.kv_distances(att.q, att.k, att.v, att.o, att.kv_of, cov)
    groups = M.balanced_partition(dist, 4)
    assert sorted(u for g in groups for u in g) == list(range(8))
    assert all(len(g) == 2 for g in groups)
    assert M.partition_cost(dist, groups) <= M.partition_cost(dist, M.contiguous_groups(8, 4))


def test_bad_head_count_is_one_line_error():
    config = make_tiny_model(heads=4, kv_heads=4).config
    with pytest.raises(RecipeError, match="must divide the 4 query heads"):
        check_heads(config, 3)
    with pytest.raises(RecipeError, match="more than"):
        check_heads(make_tiny_model(heads=4, kv_heads=2).config, 4)


def _convert(model, windows, n, pooling, grouping):
    arch = arch_for(model)
    stage = GQAStage(n, pooling, grouping)
    stage.prepare(model, arch)
    final = run_layerwise(model, arch, windows, [stage], batch_size=3, progress=False)
    stage.finish(model, arch, final)
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_same_heads_stage_is_identity(model_type, tiny_windows):
    model = make_tiny_model(model_type, heads=4, kv_heads=2)
    with torch.no_grad():
        ref = model(input_ids=tiny_windows).logits
    _convert(model, tiny_windows, 2, "fit", "similarity")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tiny_windows).logits, ref)


@pytest.mark.parametrize(("n", "pooling", "grouping"), [(2, "mean", "contiguous"), (2, "fit", "similarity"),
                                                        (1, "fit_q", "contiguous")])
def test_tiny_mha_converts_and_reloads(tmp_path, tiny_windows, n, pooling, grouping):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("qwen2", heads=4, kv_heads=4)  # qwen2: q/k/v biases too
    before = kv_cache_bytes_per_token(model.config)
    with torch.no_grad():
        ref = model(input_ids=tiny_windows).logits
    _convert(model, tiny_windows, n, pooling, grouping)
    assert model.config.num_key_value_heads == n
    assert kv_cache_bytes_per_token(model.config) * 4 == before * n
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.k_proj.weight.shape == (n * 16, 64) and attn.v_proj.bias.shape == (n * 16,)
        assert attn.num_key_value_groups == 4 // n
    with torch.no_grad():
        out = model(input_ids=tiny_windows).logits
        # Generation with a KV cache runs on the new shapes.
        model.generate(tiny_windows[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.num_key_value_heads == n
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tiny_windows).logits, out)


def test_fit_beats_mean_on_tiny_model(tiny_windows):
    """Measured, not assumed: logit error of fit vs mean on the calibration windows (llama, 4 → 1)."""
    base = make_tiny_model("llama", heads=4, kv_heads=4, layers=1)
    with torch.no_grad():
        ref = base(input_ids=tiny_windows).logits
    errors = {}
    for pooling in ("mean", "fit"):
        model = _convert(copy.deepcopy(base), tiny_windows, 1, pooling, "contiguous")
        with torch.no_grad():
            errors[pooling] = float((model(input_ids=tiny_windows).logits - ref).pow(2).mean())
    assert errors["fit"] < errors["mean"]


def test_stage_matches_pure_math(tiny_windows):
    """The stage reads and writes modules the way the math module lays them out."""
    model = make_tiny_model("llama", heads=4, kv_heads=4, layers=1)
    attn = model.model.layers[0].self_attn
    att = read_attention(attn, 4, 16)
    expected, _ = M.convert(att, 2, "mean", "contiguous")
    _convert(model, tiny_windows, 2, "mean", "contiguous")
    torch.testing.assert_close(attn.k_proj.weight, expected.k.reshape(-1, 65)[:, :-1])
    torch.testing.assert_close(attn.v_proj.weight, expected.v.reshape(-1, 65)[:, :-1])


def test_report_shows_kv_cache_at_context():
    from compress.report import KV_CONTEXT, _kv_context_lines

    lines = _kv_context_lines({"kv_bytes_per_token_before": 30720, "kv_bytes_per_token_after": 10240})
    assert f"at {KV_CONTEXT} tokens" in lines[0] and "60.0 MiB" in lines[0] and "20.0 MiB" in lines[1]
    assert "66.7%" in lines[2] and "×3.00" in lines[2]


def test_key_objective_matches_brute_force():
    """Closed form against every token pair and every relative rotation, written out."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, D, generator=g, dtype=torch.float64)
    cov = M.second_moment(x) / 12
    att = random_attention(heads=2, kv_heads=2, seed=8)
    q_old, k_old, q_new, k_new = att.q[0], att.k[0], att.q[1], att.k[1]
    xa = torch.cat([x, torch.ones(12, 1, dtype=x.dtype)], 1)
    r = ROTARY.matrices()  # [P, T, 2, 2]

    total = 0.0
    for t, wt in enumerate(ROTARY.weights):
        for i in range(12):
            for j in range(12):
                for p in range(d // 2):  # the objective sums the planes' squared errors
                    a, b = p, p + d // 2
                    qn, kn = (q_new @ xa[i])[[a, b]], (k_new @ xa[j])[[a, b]]
                    qo, ko = (q_old @ xa[i])[[a, b]], (k_old @ xa[j])[[a, b]]
                    total += wt * (qn @ r[p, t] @ kn - qo @ r[p, t] @ ko) ** 2 / 144
    assert float(M.key_objective(q_old, k_old, q_new, k_new, cov, ROTARY)) == pytest.approx(float(total), rel=1e-9)


def test_refit_output_recovers_exact_linear_map():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(500, 12, generator=g, dtype=torch.float64)
    w_true, w0 = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.zeros(5, 12, dtype=torch.float64)
    y = a @ w_true.T
    torch.testing.assert_close(M.refit_output(a.T @ a, y.T @ a, w0, damp=0.0), w_true)
    # Where the activations say nothing (a column always 0), the damping keeps the old weights.
    a[:, 3] = 0
    w0 = torch.randn(5, 12, generator=g, dtype=torch.float64)
    w = M.refit_output(a.T @ a, (a @ w_true.T).T @ a, w0, damp=1e-6)
    torch.testing.assert_close(w[:, 3], w0[:, 3])


@pytest.mark.parametrize("n", [2, 1])
def test_converted_model_runs_in_runtime(tmp_path, tiny_windows, n):
    """The int4 runtime reads the rewritten config (h // group) and gives transformers' logits."""
    from compress.runtime.loader import load_folder

    model = _convert(make_tiny_model("llama", heads=4, kv_heads=4), tiny_windows, n, "fit_q", "similarity")
    model.save_pretrained(tmp_path)
    runtime, _ = load_folder(tmp_path)
    tokens = tiny_windows[:2, :24]
    runtime.setup_caches(tokens.shape[0], tokens.shape[1])
    with torch.inference_mode():
        ours = runtime(tokens, torch.arange(tokens.shape[1]))
        ref = model(tokens).logits
    assert float((ours - ref).norm() / ref.norm()) < 1e-4


def test_balance_values_changes_no_output_and_removes_cancellation():
    """An ill-conditioned value basis (large o columns that cancel) is re-expressed exactly, without cancellation."""
    cov = random_cov()
    att = random_attention(heads=4, kv_heads=4, seed=5)
    pooled = M.pool(att, 2, "fit", cov, ROTARY)
    # Spoil the basis on purpose: V → T V, O → O T⁻¹ with T nearly singular (product unchanged).
    g = torch.Generator().manual_seed(7)
    t = torch.eye(d, dtype=torch.float64)
    t[1] = t[0] + 1e-3 * torch.randn(d, generator=g, dtype=torch.float64)  # two rows nearly alike
    spoiled = M.Pooled(pooled.q, pooled.k, t @ pooled.v, pooled.o @ torch.linalg.inv(t))
    x = torch.randn(9, D, dtype=torch.float64)
    ref = attention_reference(as_attention(pooled), x)
    balanced = M.balance_pooled(spoiled, cov)
    torch.testing.assert_close(attention_reference(as_attention(balanced), x), ref)
    for n in range(2):
        def stacked(p: M.Pooled, n: int = n) -> torch.Tensor:
            return p.o[2 * n : 2 * n + 2].reshape(-1, d)

        assert M.noise_amplification(stacked(spoiled), spoiled.v[n], cov) > 100
        assert M.noise_amplification(stacked(balanced), balanced.v[n], cov) == pytest.approx(1.0)
        # Every o column the same norm, and the value rows keep the old mean energy.
        norms = stacked(balanced).norm(dim=0)
        torch.testing.assert_close(norms, norms.mean().expand(d))
        assert float(M.row_energy(balanced.v[n], cov).mean()) == pytest.approx(
            float(M.row_energy(spoiled.v[n], cov).mean()))


def test_balanced_stage_changes_no_logits(tiny_windows):
    base = make_tiny_model("llama", heads=4, kv_heads=4, layers=2)
    outs = []
    for balance in (False, True):
        model = copy.deepcopy(base)
        arch = arch_for(model)
        stage = GQAStage(1, "fit_q", "contiguous", balance_values=balance)
        stage.prepare(model, arch)
        stage.finish(model, arch, run_layerwise(model, arch, tiny_windows, [stage], batch_size=3, progress=False))
        with torch.no_grad():
            outs.append(model(input_ids=tiny_windows).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def ill_conditioned_cov(tokens: int = 16, floor: float = 1e-6) -> torch.Tensor:
    """Fewer tokens than inputs: most directions are seen only through a tiny floor."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, D, generator=g, dtype=torch.float64) * 3
    return M.second_moment(x) / tokens + floor * torch.eye(D + 1, dtype=torch.float64)


def test_value_ridge_bounds_the_product():
    """With ridge μ, ‖O'_h V'‖_F ≤ ‖O_h V_h C_μ^½‖_F / √μ̄ (fit_values' docstring), however ill-conditioned C is."""
    ridge = 0.1
    for tokens in (8, 16, 40):
        cov = ill_conditioned_cov(tokens)
        att = random_attention(heads=4, kv_heads=4, seed=tokens)
        v, o = M.fit_values(att.o, [0, 1, 2, 3], att.v, cov, ridge=ridge)
        cov_mu = M.ridge_cov(cov, ridge)
        mu = float(cov_mu.diagonal().mean() - cov.diagonal().mean())
        assert mu == pytest.approx(ridge * float(cov.diagonal().mean()))
        evals, evecs = torch.linalg.eigh(cov_mu)
        half = (evecs * evals.sqrt()) @ evecs.T
        for h in range(4):
            bound = float((att.o[h] @ att.v[h] @ half).norm()) / mu**0.5
            assert float((o[h] @ v).norm()) <= bound * (1 + 1e-9)


@pytest.mark.parametrize("ridge", [0.1, 1.0])
def test_ridge_fit_guarantee_against_mean(ridge):
    """f_μ(fit) ≤ f_μ(mean); on the plain objective f(fit) ≤ f(mean) + μ̄ Σ_h ‖O_h (V̄ − V_h)‖²_F."""
    att = random_attention(heads=4, kv_heads=4, seed=2)

    def objective(c, v_new, o_new):
        return sum(float(M.value_objective(att.o[h], att.v[h], o_new[h], v_new, c)) for h in range(4))

    for cov in (random_cov(), ill_conditioned_cov()):
        cov_mu = M.ridge_cov(cov, ridge)
        mu = float(cov_mu.diagonal().mean() - cov.diagonal().mean())
        mean_v = att.v.mean(0)
        fit_v, fit_o = M.fit_values(att.o, [0, 1, 2, 3], att.v, cov, ridge=ridge)
        assert objective(cov_mu, fit_v, fit_o) <= objective(cov_mu, mean_v, att.o) * (1 + 1e-9)
        slack = mu * sum(float((att.o[h] @ (mean_v - att.v[h])).pow(2).sum()) for h in range(4))
        assert objective(cov, fit_v, fit_o) <= objective(cov, mean_v, att.o) + slack * (1 + 1e-9)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_gqa_then_int4_on_every_linear_exports_and_loads(tmp_path, tiny_windows, fmt):
    """fit_q + balanced values, then RTN on every linear (v/o_proj too): export, runtime and transformers agree."""
    from compress import export, models
    from compress.quant.int4 import QuantArgs
    from compress.quant.rtn import RTNStage
    from compress.runtime.loader import load_folder
    from tests.test_export import tiny_tokenizer

    model = make_tiny_model("llama", heads=4, kv_heads=4)
    arch = arch_for(model)
    gqa, rtn = GQAStage(1, "fit_q", "contiguous"), RTNStage(QuantArgs(4, 32, True), ["lm_head"])
    gqa.prepare(model, arch)
    gqa.finish(model, arch, run_layerwise(model, arch, tiny_windows, [gqa, rtn], batch_size=3, progress=False))
    assert any(name.endswith("self_attn.v_proj") for name in rtn.quantized)
    assert any(name.endswith("self_attn.o_proj") for name in rtn.quantized)
    export.export_checkpoint(tmp_path / "c", model, tiny_tokenizer(), rtn.quantized, fmt)
    tokens = tiny_windows[:2, :24]
    with torch.no_grad():
        ref = model(tokens).logits
        loaded = models.load(tmp_path / "c").model
        torch.testing.assert_close(loaded(tokens).logits, ref)
    runtime, _ = load_folder(tmp_path / "c", backend="reference", dtype=torch.float32)
    runtime.setup_caches(tokens.shape[0], tokens.shape[1])
    with torch.inference_mode():
        ours = runtime(tokens, torch.arange(tokens.shape[1]))
    assert float((ours - ref).norm() / ref.norm()) < 1e-4
