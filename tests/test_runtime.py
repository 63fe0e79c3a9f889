"""The runtime against transformers: logits, greedy output, cache, int4 back ends, loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from compress.quant import formats as layouts
from compress.quant.int4 import QuantArgs, QuantizedWeight, quantize
from compress.runtime.errors import RuntimeInputError
from compress.runtime.generate import Runtime
from compress.runtime.int4_linear import Int4Linear, kernel_layout
from compress.runtime.loader import from_transformers, load_folder
from compress.runtime.model import ModelArgs
from compress.runtime.sampling import SamplingParams, logits_to_probs, sample
from tests.conftest import make_tiny_model

BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def run_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_caches(tokens.shape[0], tokens.shape[1])
    with torch.inference_mode():
        return model(tokens, torch.arange(tokens.shape[1]))


def hf_greedy(hf, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    # An explicit mask: otherwise a prompt token equal to pad_token_id is masked out.
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def quantize_linears(hf, args: QuantArgs, act_order: bool = False) -> dict[str, QuantizedWeight]:
    """RTN every decoder linear; the transformers model gets the dequantized weights."""
    records = {}
    g = torch.Generator().manual_seed(1)
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            qw = quantize(mod.weight, args)
            if act_order:  # a shuffled g_idx, as GPTQ act-order (desc_act) writes
                qw = _shuffle_groups(qw, g)
            records[name] = qw
            mod.weight.data = qw.dequantize()
    return records


def _shuffle_groups(qw: QuantizedWeight, g: torch.Generator) -> QuantizedWeight:
    perm = torch.randperm(qw.shape[1], generator=g)
    g_idx = qw.group_index()[perm].to(torch.int32)
    return QuantizedWeight(qw.codes[:, perm], qw.scales, qw.zeros, qw.bits, qw.group_size, qw.symmetric, g_idx)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_float_logits_equal_transformers(model_type, tokens):
    hf = make_tiny_model(model_type, tie=model_type != "mistral")
    model, _ = from_transformers(hf)
    ours = run_logits(model, tokens)
    ref = hf(tokens).logits
    assert rel_err(ours, ref) < 1e-4


def test_sliding_window_equals_transformers(tokens):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=8)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    model, _ = from_transformers(hf)
    assert rel_err(run_logits(model, tokens), hf(tokens).logits) < 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_equals_transformers(rope, tokens):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_theta": 500000.0, **rope})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    model, _ = from_transformers(hf)
    assert model.args.rope_scaling["rope_type"] == rope["rope_type"]
    assert rel_err(run_logits(model, tokens), hf(tokens).logits) < 1e-4


def test_int4_reference_and_kernel_equal_transformers(tokens):
    hf = make_tiny_model("qwen2")  # biases on q/k/v as well
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=False))
    ref = hf(tokens).logits
    reference, info = from_transformers(hf, records, backend="reference")
    assert info.backends == {"reference": 8}  # fused q/k/v and gate/up: 4 linears per layer
    assert rel_err(run_logits(reference, tokens), ref) < 1e-4
    kernel, info = from_transformers(hf, records, backend="cpu")
    assert info.backends == {"cpu": 8}
    torch.testing.assert_close(run_logits(kernel, tokens), ref, **BF16_TOL)


@pytest.mark.parametrize("out_features,in_features,group_size,act_order", [
    (64, 256, 64, False),
    (40, 576, 128, False),  # ragged last group, rows padded to 48
    (32, 192, -1, False),  # one group per row
    (48, 256, 128, True),  # act-order g_idx: inputs permuted
    (32, 200, 100, False),  # no kernel group tiles 100 columns: each group padded through the gather
    (32, 64, 16, True),  # groups of 16, shuffled
])
def test_int4_kernel_layouts_equal_reference(out_features, in_features, group_size, act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    qw = quantize(w, QuantArgs(4, group_size, symmetric=False))
    if act_order:
        qw = _shuffle_groups(qw, g)
        assert kernel_layout(qw).perm is not None
    x = torch.randn(3, 5, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    expected = x @ qw.dequantize().t() + bias
    kernel = Int4Linear(qw, bias, backend="cpu")
    assert kernel.backend == "cpu"
    torch.testing.assert_close(kernel(x), expected, **BF16_TOL)
    reference = Int4Linear(qw, bias, backend="reference")
    torch.testing.assert_close(reference(x), expected, rtol=1e-5, atol=1e-5)


def test_kernel_layout_zero_convention():
    """scales_and_zeros hold s and (8 - z)·s: (q - 8)·s + (8 - z)·s = (q - z)·s."""
    qw = quantize(torch.randn(16, 64) * 0.1, QuantArgs(4, 32, symmetric=False))
    layout = kernel_layout(qw)
    s, zf = layout.scales_and_zeros[..., 0].t(), layout.scales_and_zeros[..., 1].t()  # [n, blocks]
    g = torch.arange(64) // layout.group
    dequant = (layout.codes.float() - 8) * s[:, g] + zf[:, g]
    torch.testing.assert_close(dequant, qw.dequantize(), rtol=0, atol=1e-6)


def test_unsupported_bits_fall_back_to_reference():
    qw = quantize(torch.randn(32, 64) * 0.1, QuantArgs(3, 32, symmetric=True))
    layer = Int4Linear(qw, backend="auto")
    assert layer.backend == "reference"
    with pytest.raises(ValueError):
        Int4Linear(qw, backend="cpu")


def test_greedy_equals_transformers_generate():
    hf = make_tiny_model("llama")
    model, info = from_transformers(hf)
    rt = Runtime(model, None, info)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    ref = hf_greedy(hf, prompt, 24)
    ours = rt.generate_ids([prompt[0].tolist()], 24)
    assert ours.tokens[0] == ref[0, 9:].tolist()
    assert ours.decode_steps == 23


def test_greedy_int4_reference_equals_transformers():
    hf = make_tiny_model("mistral", tie=False)
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=True), act_order=True)
    model, info = from_transformers(hf, records, backend="reference")
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    ref = hf_greedy(hf, prompt, 16)
    assert Runtime(model, None, info).generate_ids([prompt[0].tolist()], 16).tokens[0] == ref[0, 7:].tolist()


def test_cache_decode_equals_recompute(tokens):
    hf = make_tiny_model("qwen2")
    model, _ = from_transformers(hf)
    full = run_logits(model, tokens)
    model.setup_caches(2, 64)
    with torch.inference_mode():
        steps = [model(tokens[:, :10], torch.arange(10))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_overwriting_positions_rolls_back(tokens):
    """Speculative rollback: writing other tokens at the same positions forgets the old ones."""
    model, _ = from_transformers(make_tiny_model("llama"))
    model.setup_caches(2, 64)
    with torch.inference_mode():
        model(tokens[:, :12], torch.arange(12))
        model(torch.randint(0, 256, (2, 4)), torch.arange(12, 16))  # rejected draft
        again = model(tokens[:, 12:16], torch.arange(12, 16))
    torch.testing.assert_close(again, run_logits(model, tokens[:, :16])[:, 12:16], rtol=1e-4, atol=1e-5)


def test_left_padded_batch_equals_single_prompts():
    model, info = from_transformers(make_tiny_model("llama"))
    rt = Runtime(model, None, info)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 4, 7)]
    batched = rt.generate_ids(prompts, 12)
    singles = [rt.generate_ids([p], 12).tokens[0] for p in prompts]
    assert batched.tokens == singles


def test_eos_stops_generation():
    model, info = from_transformers(make_tiny_model("llama"))
    prompt = [1, 2, 3, 4]
    free = Runtime(model, None, info).generate_ids([prompt], 10).tokens[0]
    stopped = Runtime(model, None, info, eos_ids={free[3]}).generate_ids([prompt], 10)
    assert stopped.tokens[0] == free[: free.index(free[3])]
    assert stopped.stop_reasons == ["eos"]


class CharTokenizer:
    """Token i is the character chr(97 + i % 26): enough to test text handling."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 97 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_and_streaming():
    model, info = from_transformers(make_tiny_model("llama"))
    rt = Runtime(model, CharTokenizer(), info)
    free = rt.generate("abcd", max_new_tokens=12)
    stop = free.text[4:6]
    pieces: list[str] = []
    stopped = rt.generate("abcd", max_new_tokens=12, stop=[stop], stream=pieces.append)
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.stop_reasons == ["stop"]
    assert "".join(pieces) == stopped.text
    streamed: list[str] = []
    rt.generate("abcd", max_new_tokens=12, stream=streamed.append)
    assert "".join(streamed) == free.text


def test_prompt_longer_than_context_is_one_clear_error():
    model, info = from_transformers(make_tiny_model("llama", max_positions=32))
    with pytest.raises(RuntimeInputError, match="context is 32"):
        Runtime(model, None, info).generate_ids([list(range(40))], 4)


def test_unsupported_architecture_is_one_clear_error():
    with pytest.raises(RuntimeInputError, match="gpt2"):
        ModelArgs.from_config({"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 4})


def test_sampling_seeded_and_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    probs = logits_to_probs(logits, params)
    assert ((probs > 0).sum(-1) <= 5).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert torch.equal(sample(logits, SamplingParams(1.0, top_k=1)), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(1.0, top_p=1e-6)), logits.argmax(-1))


def _write_checkpoint(folder, hf, records, fmt: str) -> None:
    """A checkpoint folder as export writes it, from the shared layout functions."""
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    config = hf.config.to_dict()
    for name, qw in records.items():
        del tensors[name + ".weight"]
        packed = layouts.gptq_pack(qw, layouts.GPTQ_V2) if fmt == "gptq" else layouts.ct_pack(qw)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
    if fmt == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                         "checkpoint_format": "gptq_v2", "desc_act": True}
    else:
        weights = {"num_bits": 4, "group_size": 32, "strategy": "group", "symmetric": False}
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                         "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, default=str))


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_exported_folder_loads_and_matches(tmp_path, fmt, tokens):
    hf = make_tiny_model("llama")
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=False), act_order=fmt == "gptq")
    _write_checkpoint(tmp_path, hf, records, fmt)
    model, info = load_folder(tmp_path, backend="reference")
    assert info.quant_format == fmt and set(info.backends) == {"reference"}
    assert rel_err(run_logits(model, tokens), hf(tokens).logits) < 1e-4


def test_compression_config_key_is_read(tmp_path, tokens):
    """Older compressed-tensors folders name the section ``compression_config``."""
    hf = make_tiny_model("llama")
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=False), act_order=False)
    _write_checkpoint(tmp_path, hf, records, "compressed-tensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["compression_config"] = config.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = load_folder(tmp_path, backend="reference")
    assert info.quant_format == "compressed-tensors"
    assert rel_err(run_logits(model, tokens), hf(tokens).logits) < 1e-4


def test_float_folder_loads(tmp_path, tokens):
    hf = make_tiny_model("qwen2", tie=False)
    hf.save_pretrained(tmp_path)
    model, info = load_folder(tmp_path)
    assert info.quant_format == "float"
    assert rel_err(run_logits(model, tokens), hf(tokens).logits) < 1e-4


@pytest.mark.integration
def test_embedded_model_greedy_equals_transformers():
    from compress import models
    from compress.runtime.generate import load

    loaded = models.load("smollm2")
    llm = load("smollm2", device="cpu", backend="reference")
    ids = llm.encode("The history of the Roman Empire", chat=False)
    ref = hf_greedy(loaded.model, torch.tensor([ids]), 32)
    ours = llm.generate_ids([ids], 32)
    assert ours.tokens[0] == ref[0, len(ids):].tolist()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("out_features,in_features,group_size,act_order", [
    (64, 256, 64, False), (40, 576, 128, False), (48, 256, 128, True), (32, 200, 100, False),
])
def test_cuda_int4_kernel_equals_reference(out_features, in_features, group_size, act_order):
    g = torch.Generator().manual_seed(0)
    qw = quantize(torch.randn(out_features, in_features, generator=g) * 0.05, QuantArgs(4, group_size, False))
    if act_order:
        qw = _shuffle_groups(qw, g)
    x = torch.randn(7, in_features, generator=g)
    expected = x @ qw.dequantize().t()
    layer = Int4Linear(qw, backend="cuda", device="cuda", dtype=torch.bfloat16)
    assert layer.backend == "cuda"
    torch.testing.assert_close(layer(x.cuda().bfloat16()).float().cpu(), expected, **BF16_TOL)


@cuda
def test_cuda_model_matches_transformers(tokens):
    hf = make_tiny_model("qwen2")
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=False))
    ref = hf(tokens).logits
    float_model, _ = from_transformers(hf, device="cuda", dtype=torch.float32)
    assert rel_err(run_logits(float_model, tokens.cuda()).cpu(), ref) < 1e-4
    int4_model, info = from_transformers(hf, records, device="cuda", dtype=torch.bfloat16)
    assert info.backends == {"cuda": 8}
    torch.testing.assert_close(run_logits(int4_model, tokens.cuda()).cpu(), ref, rtol=5e-2, atol=5e-2)


@cuda
def test_cuda_compiled_decode_equals_eager():
    hf = make_tiny_model("llama")
    records = quantize_linears(hf, QuantArgs(4, 32, symmetric=True))
    model, info = from_transformers(hf, records, device="cuda", dtype=torch.bfloat16)
    prompt = [[5, 17, 99, 3, 42, 8]]
    eager = Runtime(model, None, info).generate_ids(prompt, 20).tokens
    compiled = Runtime(model, None, info, compile_decode=True).generate_ids(prompt, 20).tokens
    assert compiled == eager
