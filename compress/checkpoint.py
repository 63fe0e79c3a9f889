"""Reading exported checkpoints back: manifest checks, then {name: QuantizedWeight} + float tensors.

Reads the three formats that :mod:`compress.export` writes (GPTQ v1/v2, compressed-tensors
``pack-quantized``, plain float), and GPTQ / compressed-tensors folders written by other tools
when they use the same layouts. Only safetensors files are opened: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from compress.quant import formats as F
from compress.quant.int4 import QuantizedWeight

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the problem."""


@dataclass
class Checkpoint:
    path: Path
    config: dict
    format: str  # "gptq", "compressed-tensors" or "float"
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # everything left in float
    checkpoint_format: str | None = None  # GPTQ only: "gptq" (v1) or "gptq_v2"

    @property
    def quantization_config(self) -> dict | None:
        return quantization_config(self.config)

    def float_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """A plain state dict: quantized weights dequantized (in float32, then cast), others cast."""
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in self.tensors.items()}
        for prefix, qw in self.quantized.items():
            state[f"{prefix}.weight"] = qw.dequantize(torch.float32).to(dtype)
        return state


# ---------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict:
    """Size and sha256 of every file under ``folder`` except the manifest itself."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return {"manifest_version": 1, "written_by": "compress", "files": files}


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid manifest ({e})") from None
    return manifest


def verify(folder: str | Path) -> int:
    """Check every file named in the manifest; returns how many were checked.

    Raises :class:`CheckpointError` naming the first missing, truncated or altered file,
    or when there is no manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(f"{folder}: no {MANIFEST}; not written by compress, or the export did not finish")
    for rel, entry in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{folder}: {rel} is listed in the manifest but missing")
        if p.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{folder}: {rel} has {p.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
            )
        if sha256_file(p) != entry["sha256"]:
            raise CheckpointError(f"{folder}: checksum mismatch for {rel} (the file was altered or corrupted)")
    return len(manifest["files"])


# ---------------------------------------------------------------------------
# Config and tensor files
# ---------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json, not a checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def quantization_config(config: dict) -> dict | None:
    """The config's quantization section (older compressed-tensors files call it ``compression_config``)."""
    return config.get("quantization_config") or config.get("compression_config")


def detect_format(config: dict) -> str:
    qc = quantization_config(config)
    if not qc:
        return "float"
    method = qc.get("quant_method")
    if method == "gptq":
        return "gptq"
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt != "pack-quantized":
            raise CheckpointError(f"compressed-tensors format '{fmt}' is not supported (only pack-quantized)")
        return "compressed-tensors"
    raise CheckpointError(f"quantization method '{method}' is not supported (gptq, compressed-tensors)")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those of the index, else model.safetensors."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e})") from None
        return [folder / n for n in names]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{folder}: no safetensors weights")
    return found


def read_tensors(files: list[Path]) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weight file missing")
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return tensors


def tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) from the file headers, without reading the data."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for f in files:
        try:
            with safe_open(f, "pt") as sf:
                for k in sf.keys():
                    s = sf.get_slice(k)
                    out[k] = (tuple(s.get_shape()), s.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return out


# ---------------------------------------------------------------------------
# Quantization configs
# ---------------------------------------------------------------------------


def gptq_settings(qc: dict) -> tuple[int, int, bool, str]:
    """(bits, group_size, symmetric, checkpoint_format) of a GPTQ quantization_config."""
    try:
        bits, group_size = int(qc["bits"]), int(qc.get("group_size", -1))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"GPTQ quantization_config lacks bits/group_size ({e})") from None
    fmt = qc.get("checkpoint_format", F.GPTQ_V1)
    if fmt not in (F.GPTQ_V1, F.GPTQ_V2):
        raise CheckpointError(f"GPTQ checkpoint_format '{fmt}' is not supported (gptq, gptq_v2)")
    return bits, group_size, bool(qc.get("sym", True)), fmt


def ct_scheme_for(prefix: str, qc: dict) -> dict:
    """The ``weights`` args of the config group whose targets match ``prefix``.

    Exact names and ``re:`` patterns win over class targets such as ``Linear``.
    """
    class_match = None
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights")
        for target in group.get("targets", []):
            if target == prefix or (target.startswith("re:") and re.fullmatch(target[3:], prefix)):
                return weights
            if target == "Linear" and class_match is None:
                class_match = weights
    if class_match is None:
        raise CheckpointError(f"compressed-tensors config has no group for {prefix}")
    return class_match


def ct_settings(weights: dict | None, prefix: str) -> tuple[int, int, bool]:
    if not weights or weights.get("type", "int") != "int":
        raise CheckpointError(f"{prefix}: only integer weight quantization is supported")
    strategy = weights.get("strategy", "group")
    if strategy == "group":
        group_size = int(weights["group_size"])
    elif strategy == "channel":
        group_size = -1
    else:
        raise CheckpointError(f"{prefix}: compressed-tensors strategy '{strategy}' is not supported")
    return int(weights.get("num_bits", 4)), group_size, bool(weights.get("symmetric", True))


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def read(folder: str | Path, verify_checksums: bool = True) -> Checkpoint:
    """Read a checkpoint folder into quantized records and float tensors.

    With ``verify_checksums`` and a manifest present, every file is checked first.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if folder.name.endswith(".partial"):
        raise CheckpointError(f"{folder}: an unfinished export (staging folder)")
    if verify_checksums and (folder / MANIFEST).exists():
        verify(folder)
    config = read_config(folder)
    fmt = detect_format(config)
    tensors = read_tensors(weight_files(folder))
    ckpt = Checkpoint(folder, config, fmt)
    qc = quantization_config(config) or {}
    try:
        if fmt == "gptq":
            bits, group_size, sym, ckpt.checkpoint_format = gptq_settings(qc)
            for prefix in sorted({p for n in tensors if (p := _prefix(n, "qweight"))}):
                parts = {k: tensors.pop(f"{prefix}.{k}") for k in F.GPTQ_KEYS if f"{prefix}.{k}" in tensors}
                ckpt.quantized[prefix] = F.gptq_unpack(parts, bits, group_size, sym, ckpt.checkpoint_format)
        elif fmt == "compressed-tensors":
            for prefix in sorted({p for n in tensors if (p := _prefix(n, "weight_packed"))}):
                bits, group_size, sym = ct_settings(ct_scheme_for(prefix, qc), prefix)
                parts = {k: tensors.pop(f"{prefix}.{k}") for k in F.CT_KEYS if f"{prefix}.{k}" in tensors}
                ckpt.quantized[prefix] = F.ct_unpack(parts, bits, group_size, sym)
    except (F.FormatError, KeyError) as e:
        raise CheckpointError(f"{folder}: {fmt} tensors do not match their config ({e})") from None
    ckpt.tensors = tensors
    return ckpt


def _prefix(name: str, leaf: str) -> str | None:
    return name[: -len(leaf) - 1] if name.endswith("." + leaf) else None


def is_quantized_checkpoint(folder: str | Path) -> bool:
    """True for a folder whose config names a GPTQ or compressed-tensors quantization."""
    path = Path(folder) / "config.json"
    try:
        qc = quantization_config(json.loads(path.read_text())) or {}
    except (OSError, ValueError, AttributeError):  # ValueError: bad JSON or not UTF-8
        return False
    return qc.get("quant_method") in ("gptq", "compressed-tensors")
