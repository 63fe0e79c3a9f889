"""Loading causal LMs: a Hugging Face folder, a safetensors file, a GGUF file, a hub id,
or the embedded default by a short name."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress import assets
from compress.arch import Arch, arch_for_model_type


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    arch: Arch
    source: str

    @property
    def config(self):
        return self.model.config


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_model_dir() -> Path:
    """The embedded GGUF, dequantized once into a safetensors folder in the cache."""
    folder = assets.cache_dir() / assets.EMBEDDED_MODEL.name / "hf"
    if (folder / "config.json").exists():
        return folder
    gguf_path = assets.embedded_gguf()
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".hf-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency
        raise ModelLoadError("loading GGUF needs the 'gguf' package") from e
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic number)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # A damaged file fails anywhere in the GGUF reader (struct.error, IndexError...).
    except Exception as e:
        raise ModelLoadError(f"could not load GGUF {path}: {_reason(e)}") from e
    # The weights are dequantized to plain floats: drop the GGUF marker, so the model
    # saves and exports like any float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model, tokenizer


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load(
    source: str | os.PathLike = "smollm2",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; check that its architecture is supported."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    src = str(source)
    path = Path(src).expanduser()
    kwargs = {"trust_remote_code": trust_remote_code}

    if src in assets.MODEL_ALIASES:
        path = embedded_model_dir()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        if not (path.parent / "config.json").exists():
            raise ModelLoadError(f"{path}: a safetensors file needs a config.json beside it")
        model, tokenizer = _load_folder(path.parent, torch_dtype, kwargs, weights=path)
    elif path.is_dir() and _is_int4_checkpoint(path):
        model, tokenizer = _load_int4_checkpoint(path, torch_dtype, kwargs)
    elif path.is_dir():
        model, tokenizer = _load_folder(path, torch_dtype, kwargs)
    elif path.exists():
        raise ModelLoadError(f"{path}: not a model folder, .gguf or .safetensors file")
    elif src.startswith((".", "/", "~")) or src.count("/") > 1 or "/" not in src:
        raise ModelLoadError(f"model not found: {src}")
    else:
        # A hub id: only from the local hub cache when offline.
        offline = _hub_offline()
        try:
            config = AutoConfig.from_pretrained(src, local_files_only=offline, **kwargs)
            arch_for_model_type(config.model_type)
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=offline, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch_dtype, local_files_only=offline, **kwargs
            )
        except OSError as e:
            why = (
                "offline (HF_HUB_OFFLINE is set) and not in the local hub cache" if offline else str(e).splitlines()[0]
            )
            raise ModelLoadError(f"could not load hub model '{src}': {why}") from e
    arch = arch_for_model_type(getattr(model.config, "model_type", "unknown"))
    model.eval().requires_grad_(False)
    model.to(device)
    return LoadedModel(model, tokenizer, arch, src)


def _load_folder(path: Path, dtype: torch.dtype, kwargs: dict, weights: Path | None = None):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json, not a Hugging Face model folder")
    try:
        config_data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise ModelLoadError(f"{path / 'config.json'}: not valid JSON ({_reason(e)})") from e
    if not isinstance(config_data, dict):
        raise ModelLoadError(f"{path / 'config.json'}: not a JSON object")
    arch_for_model_type(config_data.get("model_type", "unknown"))
    if (path / "manifest.json").exists():
        # An exported float checkpoint: check its files before trusting them.
        from compress.checkpoint import CheckpointError, verify

        try:
            verify(path)
        except CheckpointError as e:
            raise ModelLoadError(str(e)) from None
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if weights is not None:
            from safetensors.torch import load_file

            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
            missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
            missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
            if missing or unexpected:
                raise ModelLoadError(
                    f"{weights}: tensors do not match config (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            model.tie_weights()
        else:
            # use_safetensors: never unpickle a pytorch_model.bin from an unknown source.
            # ignore_mismatched_sizes + output_loading_info: we get the list of what does not
            # fit and raise on it, where transformers would fill missing weights with random
            # values and only warn (or point at a log for size mismatches).
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=True, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True, **kwargs,
            )
            tied = config.tie_word_embeddings
            missing = sorted(k for k in info.get("missing_keys", []) if k != "lm_head.weight" or not tied)
            mismatched = sorted(_mismatch(k) for k in info.get("mismatched_keys", []))
            if mismatched:
                raise ModelLoadError(f"{path}: tensors do not match config.json: {', '.join(mismatched[:2])}")
            if missing:
                raise ModelLoadError(
                    f"{path}: config.json names tensors the weights lack ({len(missing)}, e.g. {missing[:2]})"
                )
    except ModelLoadError:
        raise
    # Loading untrusted files fails in many ways (SafetensorError, size mismatches, config
    # validation errors of huggingface_hub...): each means the same to the user.
    except Exception as e:
        raise ModelLoadError(f"could not load model from {path}: {_reason(e)}") from e
    return model, tokenizer


def _mismatch(entry) -> str:
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        name, in_file, in_config = entry
        return f"{name} is {list(in_file)} in the weights, {list(in_config)} by the config"
    return str(entry)


def _reason(e: BaseException) -> str:
    """The informative line of a library's (often multi-line) error message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for key in ("size mismatch", "ValueError:", "incomplete metadata", "header"):
        for line in lines:
            if key in line:
                return line[:300]
    return lines[0][:300] if lines else type(e).__name__


def _is_int4_checkpoint(path: Path) -> bool:
    from compress.checkpoint import is_quantized_checkpoint

    return is_quantized_checkpoint(path)


def _load_int4_checkpoint(path: Path, dtype: torch.dtype, kwargs: dict):
    """A GPTQ / compressed-tensors folder through our own unpacker, as a float (dequantized) model.

    Needs no GPTQ back end; checksums are verified when the folder has a manifest.
    """
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compress import checkpoint as C

    model_type = json.loads((path / "config.json").read_text()).get("model_type", "unknown")
    arch_for_model_type(model_type)
    try:
        ckpt = C.read(path)
        config = AutoConfig.from_pretrained(path, **kwargs)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except C.CheckpointError as e:
        raise ModelLoadError(str(e)) from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load checkpoint {path}: {str(e).splitlines()[0]}") from e
    missing, unexpected = model.load_state_dict(ckpt.float_state_dict(dtype), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: tensors do not match config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model, tokenizer


def parameter_count(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())
