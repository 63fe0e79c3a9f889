"""The calibration stages and speculative decoding on a CUDA GPU (skipped without one).

The layer-by-layer engine keeps the model in CPU memory and runs one layer at a time on the
device; these check that a stage gives on the GPU what it gives on the CPU (to float rounding:
cuBLAS sums in another order) and leaves the model at home. The runtime's own CUDA checks (int4
kernel, model against transformers, compiled decode) are in test_runtime.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compress.arch import arch_for
from compress.calibrate import run_layerwise
from compress.quant import awq
from compress.quant.gptq import GPTQStage
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage
from tests.conftest import make_tiny_model
from tests.test_gptq import _calibration, _logit_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("options", [
    {},  # act-order static, true-sequential
    {"act_order": "g_idx", "symmetric": False},
    {"float_target": 0.25},  # the float walk runs on the device too
    {"compute_dtype": "bfloat16"},  # the forward under autocast on both devices
    {"float_target": 0.25, "compute_dtype": "bfloat16"},
])
def test_gptq_stage_on_cuda_matches_cpu(options):
    options = dict(options)
    args = QuantArgs(4, 32, options.pop("symmetric", True))
    windows = _calibration(n=8)
    base = make_tiny_model(layers=2)
    with torch.no_grad():
        reference = base(input_ids=windows).logits
    runs = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(base)
        stage = GPTQStage(args, ["lm_head"], **options)
        run_layerwise(model, arch_for(model), windows, [stage], device, batch_size=4, progress=False)
        assert next(model.parameters()).device.type == "cpu"  # the model's home stays the CPU
        runs[device] = (model, stage)
    (cpu_model, cpu_stage), (gpu_model, gpu_stage) = runs["cpu"], runs["cuda"]
    assert cpu_stage.quantized.keys() == gpu_stage.quantized.keys() and len(gpu_stage.quantized) == 14
    for name, gpu_record in gpu_stage.quantized.items():
        assert gpu_record.codes.device.type == "cpu"  # records are kept in CPU memory
        assert torch.equal(gpu_model.get_submodule(name).weight.data, gpu_record.dequantize())
    # cuBLAS sums in another order than the CPU: a value on a rounding boundary flips a code, and
    # GPTQ carries the flip into later columns, so the codes differ; the quality must not.
    rtn_model = copy.deepcopy(base)
    run_layerwise(rtn_model, arch_for(rtn_model), windows, [RTNStage(args, ["lm_head"])], progress=False)
    # Not worse than on the CPU (better is no fault: on this tiny model a few flipped codes move
    # the float target's error by a fifth either way).
    cpu_error = _logit_error(cpu_model, reference, windows)
    gpu_error = _logit_error(gpu_model, reference, windows)
    assert gpu_error < 1.25 * cpu_error, (gpu_error, cpu_error)
    assert gpu_error < _logit_error(rtn_model, reference, windows)

def test_awq_scaling_on_cuda_preserves_function_and_matches_cpu():
    windows = _calibration(n=8)
    base = make_tiny_model("llama", heads=4, kv_heads=2)
    with torch.no_grad():
        before = base(input_ids=windows).logits
    searched = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(base)
        stage = awq.AWQStage(QuantArgs(4, 16, True), grid=5, clip=False)
        run_layerwise(model, arch_for(model), windows, [stage], device, progress=False)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=windows).logits, before, rtol=1e-4, atol=1e-4)
        searched[device] = [(r.layer, r.prev, r.error) for r in stage.records]
    # The same pairs, and the best grid point as good on both (a near tie may pick a neighbour).
    assert [r[:2] for r in searched["cuda"]] == [r[:2] for r in searched["cpu"]]
    for (*_, gpu_error), (*_, cpu_error) in zip(searched["cuda"], searched["cpu"]):
        assert gpu_error == pytest.approx(cpu_error, rel=1e-2, abs=1e-7)


def test_speculative_greedy_on_cuda_equals_plain():
    from compress.quant.int4 import quantize
    from compress.runtime.generate import Runtime
    from compress.runtime.loader import from_transformers
    from compress.runtime.speculative import ModelDraft, PromptLookupDraft, generate_runtime

    hf = make_tiny_model(layers=2, vocab=64, seed=0)
    records = {name: quantize(mod.weight, QuantArgs(4, 32, True)) for name, mod in hf.named_modules()
               if isinstance(mod, torch.nn.Linear) and "lm_head" not in name}
    target_model, target_info = from_transformers(hf, device="cuda", dtype=torch.float32)
    target = Runtime(target_model, None, target_info)
    draft_model, draft_info = from_transformers(hf, records, device="cuda", dtype=torch.float32)
    assert draft_info.backends == {"cuda": 8}
    draft = Runtime(draft_model, None, draft_info)
    prompt = [5, 9, 17, 3, 5, 9, 17, 3, 40, 41, 5, 9]
    expected = target.generate_ids([prompt], 24).tokens[0]
    accepted = []
    for k in (1, 3, 6):
        for make in (lambda: (ModelDraft(draft.model, "cuda"), draft), lambda: (PromptLookupDraft(), None)):
            drafter, draft_runtime = make()
            out, stats = generate_runtime(target, drafter, draft_runtime, prompt, 24, k=k)
            assert out == expected, f"k={k}, {type(drafter).__name__}"
            if draft_runtime is not None:
                accepted.append(stats.acceptance_rate)
    assert max(accepted) > 0.5  # the int4 self-draft is mostly right: the check above had work to do



@pytest.mark.parametrize("chain", ["gptq", "gptq-float-target", "awq+gptq"])
def test_offloaded_activations_change_nothing_but_device_memory(chain):
    """With offload_activations the engine keeps the calibration activations in CPU memory and the
    GPTQ walk brings a few windows over at a time as it needs them: the same records as keeping
    them on the GPU (which sums its Hessians in the same chunks), with less GPU memory. A stage
    that cannot read offloaded inputs (AWQ) gets them on the device."""
    windows = _calibration(n=64, length=128)
    base = make_tiny_model(layers=2, hidden=128, intermediate=512, heads=4, kv_heads=2)
    args = QuantArgs(4, 32, True)
    runs = {}
    for offload in (False, True):
        model = copy.deepcopy(base)
        gptq = GPTQStage(args, ["lm_head"], float_target=0.25 if chain == "gptq-float-target" else 0.0)
        stages = [awq.AWQStage(args, grid=5, clip=False), gptq] if chain.startswith("awq") else [gptq]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        final = run_layerwise(model, arch_for(model), windows, stages, "cuda", batch_size=8, progress=False,
                              offload_activations=offload)
        peak = torch.cuda.max_memory_allocated() - start
        assert {h.device.type for h in final.hidden} == {"cpu" if offload else "cuda"}
        runs[offload] = (gptq.quantized, peak, [h.cpu() for h in final.hidden])
        del final
    (kept, kept_peak, kept_out), (offloaded, offloaded_peak, offloaded_out) = runs[False], runs[True]
    assert kept.keys() == offloaded.keys()
    for name in kept:  # the same kernels on the same values: bit for bit
        assert torch.equal(kept[name].codes, offloaded[name].codes), name
        assert torch.equal(kept[name].scales, offloaded[name].scales), name
    for a, b in zip(kept_out, offloaded_out):
        assert torch.equal(a, b)
    if chain == "gptq":
        assert offloaded_peak < kept_peak / 2, (offloaded_peak, kept_peak)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_sweep_replayed_from_cuda_graphs_equals_eager(symmetric):
    """The sweep's blocks replayed from CUDA graphs (one capture per block shape, reused over
    weights) give the eager GPU sweep's codes bit for bit, and the CPU's to rounding."""
    from compress.quant.gptq import SweepGraphs, hessian_from_inputs, run_gptq
    from tests.test_gptq import correlated_problem, output_error

    graphs = SweepGraphs()
    for columns, group_size in ((576, 64), (1536, 64), (200, 32)):
        w, x = correlated_problem(out_features=96, in_features=columns, tokens=2048, seed=columns)
        h = hessian_from_inputs(x)
        args = QuantArgs(4, group_size, symmetric)
        eager = run_gptq(w.cuda(), h.cuda(), args, cuda_graphs=False).qweight
        replayed = run_gptq(w.cuda(), h.cuda(), args, cuda_graphs=graphs).qweight
        assert not graphs.failed and all(graph is not None for graph, _ in graphs._entries.values())
        for field_ in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(eager, field_), getattr(replayed, field_)), (columns, field_)
        on_cpu = run_gptq(w, h, args).qweight
        gpu_error = output_error(x, w, replayed.dequantize().cpu())
        assert gpu_error == pytest.approx(output_error(x, w, on_cpu.dequantize()), rel=0.05)


def test_capture_looks_up_embeddings_at_home_and_offloads_page_locked():
    """The parts before the first layer run where the model lives (the embedding never comes to
    the GPU); offloaded hidden states are page-locked; the other arguments are on the GPU."""
    from compress.calibrate import capture_layer_inputs

    model = make_tiny_model(layers=1, vocab=32768)  # an 8 MiB embedding
    windows = torch.randint(0, 32768, (8, 64), generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    inputs = capture_layer_inputs(model, arch_for(model), windows, 4, "cuda", store="cpu")
    assert torch.cuda.max_memory_allocated() - start < 2 << 20
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert all(h.device.type == "cpu" and h.is_pinned() for h in inputs.hidden)
    assert all(t.device.type == "cuda" for kw in inputs.kwargs for t in kw["position_embeddings"])
    with torch.no_grad():
        expected = model.model.embed_tokens(windows)
    torch.testing.assert_close(torch.cat(inputs.hidden), expected, rtol=0, atol=0)
