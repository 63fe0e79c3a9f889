"""Writing checkpoints: GPTQ, compressed-tensors ``pack-quantized`` or plain float safetensors.

:func:`save` writes weights, config, tokenizer and recipe into a folder that the caller
stages (the pipeline renames its staging folder into place once the report is written);
:func:`write_manifest` closes it with a checksum per file. :func:`export_checkpoint` does
both around its own staging folder, for use outside a recipe run.

Layout details of the two int4 formats live in :mod:`compress.quant.formats`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from compress.checkpoint import INDEX, MANIFEST, SINGLE, CheckpointError, build_manifest
from compress.quant import formats as F
from compress.quant.int4 import QuantizedWeight

FORMATS = ("gptq", "compressed-tensors", "float")
DEFAULT_SHARD = 2 * 10**9

__all__ = ["FORMATS", "CheckpointError", "export_checkpoint", "inspect_cli", "save", "write_manifest"]


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


def unique_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once: (tensors, {dropped name: kept name}).

    The output embedding is the one dropped, as ``save_pretrained`` does: loaders re-tie it
    from ``tie_word_embeddings``.
    """
    state = model.state_dict()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_name = next((n for n, m in model.named_modules() if m is out_emb), None) if out_emb is not None else None
    out_key = f"{out_name}.weight" if out_name else None
    order = sorted(state, key=lambda n: (n == out_key, n))  # the output embedding last: it is the one dropped
    kept: dict[tuple, str] = {}
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    for name in order:
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in kept:
            tied[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t
    return tensors, tied


def model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def checkpoint_tensors(
    model: nn.Module, quantized: dict[str, QuantizedWeight], fmt: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], str | None]:
    """Every tensor to write, by name, and the GPTQ checkpoint_format (None for other formats).

    ``dtype`` casts the unquantized floating tensors (embeddings, norms, float linears); quantization
    scales keep the precision they were computed in, so the int4 weights stay exact.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format '{fmt}' (use one of {', '.join(FORMATS)})")
    tensors, tied = unique_state_dict(model)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    if dtype is not None:
        quantized_weights = {f"{prefix}.weight" for prefix in quantized} if fmt != "float" else set()
        tensors = {
            n: t.to(dtype) if t.is_floating_point() and n not in quantized_weights else t for n, t in tensors.items()
        }
    if fmt == "float" or not quantized:
        if fmt != "float":
            raise CheckpointError(f"export format '{fmt}' needs quantized layers, and there are none")
        return tensors, None
    for prefix in quantized:
        if f"{prefix}.weight" in tied:
            raise CheckpointError(f"{prefix} is tied to {tied[f'{prefix}.weight']}: quantizing a tied weight "
                                  "cannot be exported; add it to the stage's ignore list")
        if f"{prefix}.weight" not in tensors:
            raise CheckpointError(f"quantized layer {prefix} has no weight in the model")
    checkpoint_format = None
    if fmt == "gptq":
        _uniform(quantized, "GPTQ")
        checkpoint_format = (
            F.GPTQ_V1 if all(F.gptq_checkpoint_format(q) == F.GPTQ_V1 for q in quantized.values()) else F.GPTQ_V2
        )
    scale_dtype = model_dtype(model) if model_dtype(model) in (torch.float32, torch.float16) else torch.float16
    for prefix, qw in quantized.items():
        weight = tensors.pop(f"{prefix}.weight")
        if tuple(weight.shape) != qw.shape:
            raise CheckpointError(f"{prefix}: model weight {list(weight.shape)} but quantized record {list(qw.shape)}")
        try:
            if fmt == "gptq":
                packed = F.gptq_pack(qw, checkpoint_format)
            else:
                packed = F.ct_pack(qw, scale_dtype)
        except F.FormatError as e:
            raise CheckpointError(f"{prefix}: {e}") from None
        tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
    return tensors, checkpoint_format


def _uniform(quantized: dict[str, QuantizedWeight], what: str) -> tuple[int, int, bool]:
    schemes = {(q.bits, q.group_size, q.symmetric) for q in quantized.values()}
    if len(schemes) > 1:
        raise CheckpointError(
            f"{what} stores one bits/group_size/sym for the whole model; layers use {sorted(schemes)}"
        )
    return next(iter(schemes))


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def _quant_stage(recipe) -> object | None:
    return getattr(recipe, "quant_stage", None) if recipe is not None else None


def _in_block(name: str) -> str | None:
    """``self_attn.q_proj`` for ``model.layers.3.self_attn.q_proj``; None outside the decoder blocks."""
    parts = name.split(".")
    for i in range(len(parts) - 2):
        if parts[i] in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return ".".join(parts[i + 2 :])
    return None


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def gptq_config(quantized: dict[str, QuantizedWeight], checkpoint_format: str, model: nn.Module, recipe) -> dict:
    """``quantization_config`` of the GPTQ format (also written as quantize_config.json)."""
    bits, group_size, sym = _uniform(quantized, "GPTQ")
    stage = _quant_stage(recipe)
    act_order = getattr(stage, "act_order", "none")
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": any(q.has_act_order_g_idx() for q in quantized.values()),
        "sym": sym,
        "static_groups": act_order == "static",
        "true_sequential": bool(getattr(stage, "true_sequential", True)),
        "damp_percent": float(getattr(stage, "damp_percent", 0.01)),
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,  # the name transformers 5 uses; checkpoint_format for older readers
        "lm_head": any(n == "lm_head" or n.endswith(".lm_head") for n in quantized),
        "meta": {"quantizer": ["compress"], "method": getattr(stage, "type", "rtn")},
    }
    # Loaders quantize every linear inside the decoder blocks unless told otherwise.
    done = {r for n in quantized if (r := _in_block(n))}
    skipped = {r for n in linear_names(model) if n not in quantized and (r := _in_block(n))}
    if skipped & done:
        raise CheckpointError(
            f"GPTQ cannot say that {sorted(skipped & done)[0]} is quantized in some blocks and not in others; "
            "export as compressed-tensors"
        )
    if skipped:
        config["modules_in_block_to_quantize"] = [sorted(done)]
    return config


def ct_config(quantized: dict[str, QuantizedWeight], model: nn.Module) -> dict:
    """``quantization_config`` of compressed-tensors ``pack-quantized``: one config group per scheme."""
    schemes: dict[tuple, list[str]] = {}
    for name, q in sorted(quantized.items()):
        schemes.setdefault((q.bits, q.group_size, q.symmetric, q.has_act_order_g_idx()), []).append(name)
    groups = {}
    for i, ((bits, group_size, sym, reordered), names) in enumerate(schemes.items()):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(schemes) == 1 else names,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": sym,
                "group_size": None if group_size == -1 else group_size,
                "strategy": "channel" if group_size == -1 else "group",
                "block_structure": None,
                "dynamic": False,
                "actorder": "group" if reordered else None,
                "observer": "minmax",
                "observer_kwargs": {},
            },
            "input_activations": None,
            "output_activations": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [n for n in linear_names(model) if n not in quantized],
        "kv_cache_scheme": None,
    }


def config_dict(
    model: nn.Module, quantization_config: dict | None, folder: Path, dtype: torch.dtype | None = None
) -> dict:
    """The model's config.json, plus the quantization config and fields older loaders need."""
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    dtype = str(dtype or model_dtype(model)).removeprefix("torch.")
    config["dtype"] = dtype
    config["torch_dtype"] = dtype  # the name transformers 4.x reads
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        # transformers 5 writes rope_parameters only; older loaders would fall back to 10000.
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if quantization_config:
        config["quantization_config"] = quantization_config
    return config


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def shard(tensors: dict[str, Tensor], max_shard_size: int) -> list[dict[str, Tensor]]:
    """Split in name order into shards of at most ``max_shard_size`` bytes (a larger tensor goes alone)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensor_bytes(tensors[name])
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    return shards


def _save_file(part: dict[str, Tensor], path: Path, metadata: dict) -> None:
    import safetensors.torch

    safetensors.torch.save_file(part, path, metadata=metadata)
    # safetensors creates the file owner-only; a checkpoint is meant to be shared like the other files.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_weights(folder: Path, tensors: dict[str, Tensor], max_shard_size: int, metadata: dict) -> list[str]:
    parts = shard(tensors, max_shard_size)
    if len(parts) == 1:
        _save_file(parts[0], folder / SINGLE, metadata)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for name, part in zip(names, parts, strict=True):
        _save_file(part, folder / name, metadata)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(tensor_bytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def save(
    folder: str | os.PathLike,
    model: nn.Module,
    tokenizer,
    quantized: dict[str, QuantizedWeight],
    fmt: str = "gptq",
    max_shard_size: int = DEFAULT_SHARD,
    recipe=None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Write the checkpoint into ``folder`` (a staging folder: the caller renames it when complete).

    ``dtype``: store the unquantized tensors in this dtype (default: the model's).
    Returns what was written: format, GPTQ checkpoint_format, files, bytes, quantized layer count.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, checkpoint_format = checkpoint_tensors(model, quantized, fmt, dtype)
    qconfig = None
    if fmt == "gptq":
        qconfig = gptq_config(quantized, checkpoint_format, model, recipe)
    elif fmt == "compressed-tensors":
        qconfig = ct_config(quantized, model)
    config = config_dict(model, qconfig, folder, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if qconfig and fmt == "gptq":
        (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe is not None and not (folder / "recipe.yaml").exists():
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
    files = write_weights(folder, tensors, max_shard_size, {"format": "pt"})
    notes = []
    ragged = sorted({q.shape[1] for q in quantized.values() if q.group_size != -1 and q.shape[1] % q.group_size})
    if ragged and fmt != "float":
        gs = next(iter(quantized.values())).group_size
        notes.append(
            f"group size {gs} does not divide input width {', '.join(map(str, ragged))}: the last group of those "
            "layers is shorter (ceil(in / group) groups). compress, AutoGPTQ and GPTQModel read this; vLLM and "
            "the compressed-tensors decompressor need whole groups (choose a group size dividing the width)."
        )
    if checkpoint_format == F.GPTQ_V2:
        notes.append(
            "GPTQ written as checkpoint_format gptq_v2 (zero points stored as they are): some asymmetric "
            "groups have zero point 0, which the v1 layout (zero - 1) cannot hold. GPTQModel reads v2; "
            "v1-only loaders (older AutoGPTQ, vLLM's gptq kernels) would not."
        )
    return {
        "format": fmt,
        "checkpoint_format": checkpoint_format,
        "quantized_linears": len(quantized) if fmt != "float" else 0,
        "weight_files": files,
        "weight_bytes": sum((folder / f).stat().st_size for f in files),
        "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "notes": notes,
    }


def write_manifest(folder: str | os.PathLike) -> dict:
    """Write manifest.json (size and sha256 of every file): the last file of a finished export."""
    folder = Path(folder)
    manifest = build_manifest(folder)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.rename(folder / MANIFEST)
    return manifest


def export_checkpoint(
    out: str | os.PathLike,
    model: nn.Module,
    tokenizer,
    quantized: dict[str, QuantizedWeight],
    fmt: str = "gptq",
    max_shard_size: int = DEFAULT_SHARD,
    recipe=None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> dict:
    """:func:`save` + :func:`write_manifest` into a staging folder renamed to ``out`` only when complete."""
    from compress.pipeline import commit_output, prepare_output

    out = Path(out)
    tmp = prepare_output(out, overwrite)
    try:
        info = save(tmp, model, tokenizer, quantized, fmt, max_shard_size, recipe, dtype)
        write_manifest(tmp)
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


# ---------------------------------------------------------------------------
# compress inspect
# ---------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def describe(folder: str | os.PathLike) -> dict:
    """What ``compress inspect`` prints, from the config and the safetensors headers."""
    from compress import checkpoint as C

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    config = C.read_config(folder)
    fmt = C.detect_format(config)
    files = C.weight_files(folder)
    shapes = C.tensor_shapes(files)
    qc = config.get("quantization_config") or {}
    leaf = {"gptq": "qweight", "compressed-tensors": "weight_packed"}.get(fmt)
    quantized = sorted(
        (n.rsplit(".", 1)[0] for n in shapes if leaf and n.endswith("." + leaf)),
        key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")],  # layers.10 after layers.9
    )
    qnames = {f"{p}." for p in quantized}
    q_bytes = f_bytes = 0
    float_dtypes: set[str] = set()
    for name, (shape, dtype) in shapes.items():
        n = 1
        for d in shape:
            n *= d
        size = n * _DTYPE_BYTES.get(dtype, 4)
        if any(name.startswith(p) for p in qnames) and not name.endswith(".bias"):
            q_bytes += size
        else:
            f_bytes += size
            float_dtypes.add(dtype)
    info = {
        "path": str(folder),
        "format": fmt,
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "layers": config.get("num_hidden_layers"),
        "quantized": quantized,
        "float_tensors": len(shapes) - sum(1 for n in shapes if any(n.startswith(p) for p in qnames)),
        "float_dtypes": sorted(float_dtypes),
        "quantized_bytes": q_bytes,
        "float_bytes": f_bytes,
        "weight_files": [f.name for f in files],
        "weight_file_bytes": sum(f.stat().st_size for f in files),
        "folder_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "tied_embeddings": bool(config.get("tie_word_embeddings")),
    }
    if fmt == "gptq":
        bits, group_size, sym, cf = C.gptq_settings(qc)
        info["scheme"] = (
            f"bits {bits}, group size {group_size}, {'symmetric' if sym else 'asymmetric'}, "
            f"desc_act {bool(qc.get('desc_act'))}, checkpoint_format {cf}"
        )
    elif fmt == "compressed-tensors":
        parts = []
        for gname, g in (qc.get("config_groups") or {}).items():
            w = g.get("weights") or {}
            parts.append(
                f"{gname}: bits {w.get('num_bits')}, {w.get('strategy')} "
                f"{'' if w.get('group_size') is None else 'size ' + str(w.get('group_size')) + ', '}"
                f"{'symmetric' if w.get('symmetric') else 'asymmetric'}, actorder {w.get('actorder')}"
            )
        info["scheme"] = "; ".join(parts)
    return info


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def inspect_cli(folder: str | os.PathLike, verify: bool = True) -> int:
    """Print a checkpoint's format, layers, sizes and checksum status; exit 2 on a bad checksum."""
    from compress import checkpoint as C

    info = describe(folder)
    q = info["quantized"]
    print(f"checkpoint: {info['path']}")
    print(f"format: {info['format']}" + (f" ({info['scheme']})" if info.get("scheme") else ""))
    print(f"model: {info['architecture']}, {info['layers']} layers, tied embeddings {info['tied_embeddings']}")
    if q:
        print(f"quantized linears: {len(q)} (first {q[0]}, last {q[-1]})")
    print(f"float tensors: {info['float_tensors']} ({', '.join(info['float_dtypes']) or '-'})")
    print(
        f"sizes: quantized {_fmt_bytes(info['quantized_bytes'])}, float {_fmt_bytes(info['float_bytes'])}; "
        f"weight files {_fmt_bytes(info['weight_file_bytes'])} in {len(info['weight_files'])} file(s); "
        f"folder {_fmt_bytes(info['folder_bytes'])}"
    )
    if not verify:
        print("checksums: not verified (--no-verify)")
        return 0
    if C.read_manifest(Path(folder)) is None:
        print(f"checksums: no {MANIFEST} (not written by compress, or the export did not finish)")
        return 0
    n = C.verify(folder)
    print(f"checksums: {n} files verified against {MANIFEST}")
    return 0
