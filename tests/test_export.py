"""Export and read back: GPTQ, compressed-tensors and float checkpoints of a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress import checkpoint as C
from compress import export, models
from compress.quant import formats as F
from compress.quant import int4
from tests.conftest import make_tiny_model
from tests.test_formats import assert_same


def tiny_tokenizer():
    """A real (word-level, 256 tokens) fast tokenizer, built offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(255)} | {"<unk>": 255}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def quantize_model(model: nn.Module, args: int4.QuantArgs, act_order: bool = False) -> dict:
    """RTN on every linear but lm_head, fake-quantizing the model in place (what stages do)."""
    quantized = {}
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            qw = int4.quantize(module.weight.data, args)
            if act_order:
                inp = module.in_features
                g_idx = torch.empty(inp, dtype=torch.int32)
                g_idx[torch.randperm(inp, generator=g)] = (torch.arange(inp) // args.group_size).int()
                qw.g_idx = g_idx
            module.weight.data = qw.dequantize(module.weight.dtype)
            quantized[name] = qw
    return quantized


@pytest.fixture
def quantized_tiny():
    model = make_tiny_model()
    return model, quantize_model(model, int4.QuantArgs(4, 32, True))


def logits(model, seed=0):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "float"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_export_reads_back_bit_exact(tmp_path, fmt, symmetric):
    model = make_tiny_model()
    quantized = quantize_model(model, int4.QuantArgs(4, 32, symmetric))
    out = tmp_path / "ckpt"
    info = export.export_checkpoint(out, model, tiny_tokenizer(), quantized, fmt)
    assert info["bytes"] > 0 and (out / C.MANIFEST).exists()
    ckpt = C.read(out)
    assert ckpt.format == fmt
    if fmt == "float":
        assert not ckpt.quantized
    else:
        assert ckpt.quantized.keys() == quantized.keys()
        for name, qw in quantized.items():
            assert_same(qw, ckpt.quantized[name])
    # Float tensors in the model's dtype, tied output embedding not stored.
    assert "lm_head.weight" not in ckpt.tensors
    assert torch.equal(ckpt.tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert all(t.dtype == torch.float32 for t in ckpt.tensors.values())
    state = ckpt.float_state_dict()
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(state[name], t), name
    # Loaded as a plain transformers model: same outputs as the fake-quantized model.
    loaded = models.load(out)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(logits(loaded.model), logits(model))


def test_gptq_config(tmp_path, quantized_tiny):
    model, quantized = quantized_tiny
    out = tmp_path / "ckpt"
    export.export_checkpoint(out, model, tiny_tokenizer(), quantized, "gptq")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 4, 32, True)
    assert (qc["desc_act"], qc["checkpoint_format"], qc["lm_head"]) == (False, "gptq", False)
    assert "modules_in_block_to_quantize" not in qc
    assert config["tie_word_embeddings"] and config["torch_dtype"] == "float32"
    assert "rope_theta" in config
    header = C.tensor_shapes(C.weight_files(out))
    prefix = "model.layers.0.self_attn.q_proj"
    assert header[f"{prefix}.qweight"] == ((8, 64), "I32")
    assert header[f"{prefix}.qzeros"] == ((2, 8), "I32")
    assert header[f"{prefix}.scales"] == ((2, 64), "F16")
    assert header[f"{prefix}.g_idx"] == ((64,), "I32")
    assert f"{prefix}.weight" not in header and "lm_head.weight" not in header


def test_gptq_writes_v2_only_when_a_zero_point_is_zero(tmp_path):
    model = make_tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.abs_()  # all-positive groups: zero point 0
    quantized = quantize_model(model, int4.QuantArgs(4, 32, False))
    info = export.export_checkpoint(tmp_path / "v2", model, tiny_tokenizer(), quantized, "gptq")
    assert info["checkpoint_format"] == F.GPTQ_V2 and info["notes"]
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == (
        "gptq_v2"
    )
    for name, qw in quantized.items():
        assert_same(qw, C.read(tmp_path / "v2").quantized[name])


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_act_order_g_idx(tmp_path, fmt):
    model = make_tiny_model()
    quantized = quantize_model(model, int4.QuantArgs(4, 32, True), act_order=True)
    export.export_checkpoint(tmp_path / "c", model, tiny_tokenizer(), quantized, fmt)
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert qc["desc_act"] is True
    else:
        assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    ckpt = C.read(tmp_path / "c")
    for name, qw in quantized.items():
        assert ckpt.quantized[name].g_idx is not None
        assert_same(qw, ckpt.quantized[name])


def test_compressed_tensors_config(tmp_path, quantized_tiny):
    model, quantized = quantized_tiny
    export.export_checkpoint(tmp_path / "ct", model, tiny_tokenizer(), quantized, "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"], w["type"]) == (4, 32, "group", True, "int")
    header = C.tensor_shapes(C.weight_files(tmp_path / "ct"))
    prefix = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert header[f"{prefix}.weight_packed"] == ((64, 16), "I32")
    assert header[f"{prefix}.weight_scale"] == ((64, 4), "F32")
    assert header[f"{prefix}.weight_shape"] == ((2,), "I64")
    assert f"{prefix}.weight_zero_point" not in header


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_library_decompresses_ours(tmp_path, symmetric):
    """compressed-tensors' own PackedQuantizationCompressor gives back the evaluated weights."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model = make_tiny_model()
    quantized = quantize_model(model, int4.QuantArgs(4, 32, symmetric))
    export.export_checkpoint(tmp_path / "ct", model, tiny_tokenizer(), quantized, "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = {k: v for k, v in qc["config_groups"]["group_0"]["weights"].items() if v is not None}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    tensors = C.read_tensors(C.weight_files(tmp_path / "ct"))
    for name, module in model.named_modules():
        if name in quantized:
            local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
            out = PackedQuantizationCompressor.decompress(local, scheme)
            assert torch.equal(out["weight"], module.weight.data), name


def test_compressed_tensors_library_compresses_like_us():
    """Its compressor, given our scales and zero points (signed, as it keeps them), writes our tensors."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from compress.quant import formats as F

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * 0.05
    qw = int4.quantize(w, int4.QuantArgs(4, 32, False))
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=4, group_size=32, strategy="group", symmetric=False)
    )
    zp_signed = (qw.zeros - 8).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(
        {"weight": qw.dequantize(), "weight_scale": qw.scales, "weight_zero_point": zp_signed}, scheme
    )
    ours = F.ct_pack(qw)
    for key in ("weight_packed", "weight_zero_point", "weight_shape"):
        assert torch.equal(theirs[key], ours[key]), key


def test_transformers_loads_our_symmetric_compressed_tensors(tmp_path, quantized_tiny):
    """Plain transformers with the compressed-tensors package installed: same logits, no code of ours."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, quantized = quantized_tiny
    export.export_checkpoint(tmp_path / "ct", model, tiny_tokenizer(), quantized, "compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.equal(logits(theirs), logits(model))


def test_transformers_accepts_our_gptq_config(tmp_path, quantized_tiny):
    from transformers import GPTQConfig

    model, quantized = quantized_tiny
    export.export_checkpoint(tmp_path / "g", model, None, quantized, "gptq")
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    parsed = GPTQConfig.from_dict(qc)
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.desc_act, parsed.format) == (4, 32, True, False, "gptq")


def test_shards_and_index(tmp_path, quantized_tiny):
    model, quantized = quantized_tiny
    info = export.export_checkpoint(tmp_path / "s", model, tiny_tokenizer(), quantized, "gptq", max_shard_size=20_000)
    assert len(info["weight_files"]) > 2
    index = json.loads((tmp_path / "s" / C.INDEX).read_text())
    assert set(index["weight_map"].values()) == set(info["weight_files"])
    assert all(f.startswith("model-0000") for f in info["weight_files"])
    assert not (tmp_path / "s" / C.SINGLE).exists()
    ckpt = C.read(tmp_path / "s")
    assert ckpt.quantized.keys() == quantized.keys()


def test_corrupt_files_give_one_line_errors(tmp_path, quantized_tiny, capsys):
    from compress.cli import main

    model, quantized = quantized_tiny
    out = tmp_path / "ckpt"
    export.export_checkpoint(out, model, tiny_tokenizer(), quantized, "gptq")
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format: gptq" in printed and "quantized linears: 14" in printed and "files verified" in printed
    weights = out / C.SINGLE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match=r"checksum mismatch for model\.safetensors"):
        C.read(out)
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compress: error:") and "checksum mismatch" in err and "\n" not in err
    # Without the manifest, a truncated file is still caught by the safetensors reader.
    (out / C.MANIFEST).unlink()
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(C.CheckpointError, match="not a readable safetensors file"):
        C.read(out)


def test_interrupted_export_leaves_nothing(tmp_path, quantized_tiny, monkeypatch):
    import safetensors.torch

    model, quantized = quantized_tiny
    calls = []
    real = safetensors.torch.save_file

    def dying_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while writing the second shard
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        export.export_checkpoint(out, model, tiny_tokenizer(), quantized, "gptq", max_shard_size=20_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_bad_requests(tmp_path, quantized_tiny):
    model, quantized = quantized_tiny
    with pytest.raises(C.CheckpointError, match="unknown export format"):
        export.export_checkpoint(tmp_path / "x", model, None, quantized, "awq")
    with pytest.raises(C.CheckpointError, match="needs quantized layers"):
        export.export_checkpoint(tmp_path / "x", model, None, {}, "gptq")
    mixed = dict(quantized)
    name = next(iter(mixed))
    mixed[name] = int4.quantize(model.get_submodule(name).weight.data, int4.QuantArgs(4, 64, True))
    with pytest.raises(C.CheckpointError, match="one bits/group_size/sym"):
        export.export_checkpoint(tmp_path / "x", model, None, mixed, "gptq")
    assert not (tmp_path / "x").exists()
    with pytest.raises(C.CheckpointError, match="not found"):
        C.read(tmp_path / "nothing")


def test_mixed_schemes_compressed_tensors(tmp_path, quantized_tiny):
    model, quantized = quantized_tiny
    name = "model.layers.1.mlp.down_proj"
    mixed = dict(quantized)
    mixed[name] = int4.quantize(model.get_submodule(name).weight.data, int4.QuantArgs(4, 64, False))
    model.get_submodule(name).weight.data = mixed[name].dequantize()
    export.export_checkpoint(tmp_path / "m", model, None, mixed, "compressed-tensors")
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    ckpt = C.read(tmp_path / "m")
    for n, qw in mixed.items():
        assert_same(qw, ckpt.quantized[n])


@pytest.mark.integration
def test_rtn_recipe_exports_gptq_that_reloads_to_the_same_perplexity(tmp_path, capsys):
    """`compress run` on the RTN recipe ends with a GPTQ checkpoint; reloaded, it scores the same."""
    import yaml

    from compress import data, evaluate
    from compress.cli import main

    recipe = yaml.safe_load(open("recipes/smollm2-rtn-w4g128.yaml"))
    assert recipe["export"]["format"] == "gptq"
    recipe["data"]["evaluation"] = {"seq_len": 256, "max_windows": 2}
    recipe["eval"]["before"] = False
    recipe["export"]["output"] = str(tmp_path / "out")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["checkpoint_format"] == "gptq" and report["export"]["quantized_linears"] == 210
    assert C.verify(out) > 5
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "quantized linears: 210" in capsys.readouterr().out
    loaded = models.load(out)
    corpus = data.load_corpus("wiki")
    windows = data.evaluation_windows(loaded.tokenizer, corpus.evaluation, 256, max_windows=2)
    ppl = evaluate.perplexity(loaded.model, windows, batch_size=2, progress=False)["perplexity"]
    assert ppl == pytest.approx(report["evaluation"]["after"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_ragged_last_group_is_written_with_a_note(tmp_path, fmt):
    """Group 48 on widths 64 and 128, as group 128 on the embedded model's 576: readable, and said so."""
    model = make_tiny_model()
    quantized = quantize_model(model, int4.QuantArgs(4, 48, True))
    info = export.export_checkpoint(tmp_path / "r", model, tiny_tokenizer(), quantized, fmt)
    assert any("does not divide input width 64, 128" in n for n in info["notes"])
    ckpt = C.read(tmp_path / "r")
    for name, qw in quantized.items():
        assert_same(qw, ckpt.quantized[name])
    assert torch.equal(logits(models.load(tmp_path / "r").model), logits(model))


def test_what_a_hard_kill_leaves_does_not_look_finished(tmp_path, quantized_tiny):
    """A SIGKILL can leave the staging folder: hidden, named .partial, without manifest, and refused."""
    model, quantized = quantized_tiny
    staging = tmp_path / ".ckpt.partial"
    export.save(staging, model, None, quantized, "gptq")  # written, but never closed with a manifest
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(C.CheckpointError, match="unfinished export"):
        C.read(staging)
    with pytest.raises(C.CheckpointError, match=r"no manifest\.json"):
        C.verify(staging)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "float"])
def test_export_dtype_casts_only_unquantized_tensors(tmp_path, fmt):
    """export.dtype bfloat16 halves the float tensors; the int4 weights read back bit-exact."""
    model = make_tiny_model()
    quantized = quantize_model(model, int4.QuantArgs(4, 32, True))
    out = tmp_path / "bf16"
    export.export_checkpoint(out, model, tiny_tokenizer(), quantized, fmt, dtype=torch.bfloat16)
    ckpt = C.read(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(ckpt.tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight.bfloat16())
    floats = {n: t for n, t in ckpt.tensors.items() if t.is_floating_point()}
    assert floats and all(t.dtype == torch.bfloat16 for t in floats.values())
    if fmt != "float":
        for name, qw in quantized.items():
            assert_same(qw, ckpt.quantized[name])
    loaded = models.load(str(out))
    assert next(loaded.model.parameters()).dtype in (torch.bfloat16, torch.float32)
    from compress.runtime.loader import load_folder

    runtime_model, _ = load_folder(out, backend="reference")
    assert runtime_model is not None
