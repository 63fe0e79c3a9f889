"""The runtime's CPU fast paths against their plain forms: the streamlined forward against the
module forward, fused int4 linears against separate ones, the int4 closure against forward."""

from __future__ import annotations

import pytest
import torch

from compress.quant.int4 import QuantArgs, QuantizedWeight, quantize
from compress.runtime.int4_linear import Int4Linear, concat_quantized
from compress.runtime.loader import from_transformers
from compress.runtime.model import _bf16_linear_cpu, cache_dtype_for
from tests.conftest import make_tiny_model
from tests.test_runtime import BF16_TOL, quantize_linears


def _windowed_mistral():
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _prefill_decode_verify(model, tokens: torch.Tensor, pad: list[int] | None) -> torch.Tensor:
    """Logits of a prefill, one-token steps, then a 4-token step at an offset (a speculative verify)."""
    model.setup_caches(tokens.shape[0], 64)
    model.set_padding(pad)
    with torch.inference_mode():
        steps = [model(tokens[:, :10], torch.arange(10))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(10, 16)]
        steps.append(model(tokens[:, 16:20], torch.arange(16, 20)))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("arch,dtype,backend", [
    ("qwen2", torch.float32, "reference"),  # q/k/v biases
    ("qwen2", torch.bfloat16, "cpu"),  # int4 kernels, float32 cache under a bfloat16 model
    ("mistral-window", torch.float32, "reference"),  # sliding window: masked decode steps
])
def test_fast_forward_equals_module_forward(arch, dtype, backend):
    hf = _windowed_mistral() if arch == "mistral-window" else make_tiny_model(arch)
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=False))
    model, _ = from_transformers(hf, records, backend=backend, dtype=dtype)
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    for pad in (None, [3, 0]):  # also a left-padded batch
        model.fast_path = True
        fast = _prefill_decode_verify(model, tokens, pad)
        model.fast_path = False
        plain = _prefill_decode_verify(model, tokens, pad)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
        torch.testing.assert_close(fast, plain, **tol)


def test_float32_cache_holds_model_dtype_values():
    """On CPU a bfloat16 model caches in float32, but only values rounded to bfloat16."""
    hf = make_tiny_model("llama")
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=True))
    model, _ = from_transformers(hf, records, backend="cpu", dtype=torch.bfloat16)
    assert cache_dtype_for(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert cache_dtype_for(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    _prefill_decode_verify(model, tokens, None)
    for layer in model.layers:
        cache = layer.attention.kv_cache
        assert cache.k_cache.dtype == torch.float32
        for c in (cache.k_cache, cache.v_cache):
            assert torch.equal(c, c.bfloat16().float())
        assert cache.k_cache[:, :, :20].abs().sum() > 0


def _shuffled(qw: QuantizedWeight, perm: torch.Tensor) -> QuantizedWeight:
    g_idx = qw.group_index()[perm].to(torch.int32)
    return QuantizedWeight(qw.codes[:, perm], qw.scales, qw.zeros, qw.bits, qw.group_size, qw.symmetric, g_idx)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("act_order", [False, True])
def test_fused_int4_linear_equals_separate(backend, act_order):
    """q/k/v fused along the output rows computes what the three linears compute."""
    g = torch.Generator().manual_seed(0)
    parts = [quantize(torch.randn(n, 128, generator=g) * 0.05, QuantArgs(4, 32, symmetric=False))
             for n in (64, 32, 32)]
    if act_order:  # GPTQ act-order gives q/k/v (one input, one Hessian) the same g_idx
        perm = torch.randperm(128, generator=g)
        parts = [_shuffled(p, perm) for p in parts]
    fused = concat_quantized(parts)
    assert fused is not None
    x = torch.randn(5, 128, generator=g)
    bias = torch.randn(128, generator=g)
    y_fused = Int4Linear(fused, bias, backend=backend)(x)
    y_parts = torch.cat([Int4Linear(p, b, backend=backend)(x) for p, b in zip(parts, bias.split([64, 32, 32]))], -1)
    torch.testing.assert_close(y_fused, y_parts, rtol=1e-6, atol=1e-6)
    expected = x @ torch.cat([p.dequantize() for p in parts]).t() + bias
    tol = dict(rtol=1e-5, atol=1e-5) if backend == "reference" else BF16_TOL
    torch.testing.assert_close(y_fused, expected, **tol)


def test_different_group_layouts_are_not_fused():
    g = torch.Generator().manual_seed(1)
    parts = [quantize(torch.randn(32, 128, generator=g), QuantArgs(4, 32, symmetric=True)) for _ in range(2)]
    parts[1] = _shuffled(parts[1], torch.randperm(128, generator=g))
    assert concat_quantized(parts) is None
    other_group = quantize(torch.randn(32, 128, generator=g), QuantArgs(4, 64, symmetric=True))
    assert concat_quantized([parts[0], other_group]) is None


@pytest.mark.parametrize("dtype,with_bias,act_order", [
    (torch.bfloat16, False, False),
    (torch.bfloat16, True, False),
    (torch.float32, True, False),
    (torch.bfloat16, False, True),  # a gather: the closure is forward itself
])
def test_int4_closure_equals_forward(dtype, with_bias, act_order):
    g = torch.Generator().manual_seed(2)
    qw = quantize(torch.randn(48, 256, generator=g) * 0.05, QuantArgs(4, 64, symmetric=False))
    if act_order:
        qw = _shuffled(qw, torch.randperm(256, generator=g))
    bias = torch.randn(48, generator=g) if with_bias else None
    layer = Int4Linear(qw, bias, backend="cpu", dtype=dtype)
    x = torch.randn(3, 256, generator=g).to(dtype)
    assert torch.equal(layer.as_function(dtype)(x), layer(x))
    assert (layer.as_function(dtype) == layer.forward) == act_order


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_bf16_linear_without_onednn_is_a_linear(rows):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 64, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    enabled = torch.backends.mkldnn.enabled
    y = _bf16_linear_cpu(x, w, None)
    assert torch.backends.mkldnn.enabled == enabled
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ w.float().t(), rtol=1e-2, atol=2e-2)


def test_bf16_one_row_linear_restores_onednn_across_threads():
    """Threads overlapping in the one-row bfloat16 path leave the user's oneDNN setting as it was."""
    import threading

    from compress.runtime import model as runtime_model

    if runtime_model._set_mkldnn is None:
        pytest.skip("this torch build has no oneDNN switch")
    weight = torch.randn(64, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    inside, release = threading.Barrier(3), threading.Event()
    original = runtime_model.F.linear

    def blocking_linear(*args):
        inside.wait()  # both threads are in the oneDNN-off section at once
        release.wait()
        return original(*args)

    before = torch._C._get_mkldnn_enabled()
    runtime_model.F.linear = blocking_linear
    try:
        threads = [threading.Thread(target=runtime_model._bf16_linear_cpu, args=(x, weight, None)) for _ in range(2)]
        for t in threads:
            t.start()
        inside.wait()
        assert torch._C._get_mkldnn_enabled() is False
        release.set()
        for t in threads:
            t.join()
    finally:
        runtime_model.F.linear = original
    assert torch._C._get_mkldnn_enabled() == before
    ref = torch.nn.functional.linear(x.float(), weight.float())
    torch.testing.assert_close(runtime_model._bf16_linear_cpu(x, weight, None).float(), ref, rtol=2e-2, atol=2e-2)
