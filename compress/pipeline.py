"""One compression job: recipe → model → stages → evaluation → files.

All files go to a temporary folder beside the output, renamed into place only when the
job is complete: an interrupted job never leaves a folder that looks finished.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from compress import data as D
from compress import evaluate, models, report, stages
from compress import recipe as R
from compress.arch import head_counts, kv_cache_bytes_per_token
from compress.calibrate import run_layerwise
from compress.quant.common import QuantizingStage

log = logging.getLogger("compress")


class OutputExists(FileExistsError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise R.RecipeError(f"device: '{name}' asked for, but no CUDA device is available")
    return device


def peak_memory(device: torch.device) -> dict:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"host_rss": rss_kib * 1024}
    if device.type == "cuda":
        out["device_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


def weight_bytes(model: torch.nn.Module, quantized: dict) -> tuple[int, int]:
    """(bytes of all unique weights at 16 bits, bytes after quantization)."""
    params = {}
    for name, p in model.named_parameters():
        params.setdefault(p.data_ptr(), (name, p.numel()))
    total16 = sum(n for _, n in params.values()) * 2
    after = total16
    for qw in quantized.values():
        after += qw.nbytes_packed() - qw.codes.numel() * 2
    return total16, after


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise OutputExists(f"output folder {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, out: Path) -> None:
    """Swap the finished staging folder into place."""
    old = out.parent / f".{out.name}.old"
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def run(
    recipe: R.Recipe,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run a recipe end to end; returns the report (also written to the output folder)."""
    out = Path(output) if output else recipe.output_dir()
    tmp = prepare_output(out, overwrite)
    try:
        result = _run(recipe, out, tmp, progress)
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _run(recipe: R.Recipe, out: Path, tmp: Path, progress: bool) -> dict:
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)

    t = time.perf_counter()
    loaded = models.load(recipe.model, recipe.dtype, "cpu", recipe.trust_remote_code)
    model, tokenizer, arch = loaded.model, loaded.tokenizer, loaded.arch
    heads, kv_heads, _ = head_counts(model.config)
    kv_before = kv_cache_bytes_per_token(model.config)
    model_info = {
        "source": recipe.model,
        "architecture": arch.name,
        "parameters": models.parameter_count(model),
        "layers": model.config.num_hidden_layers,
        "heads": heads,
        "kv_heads": kv_heads,
    }
    timing["load model"] = time.perf_counter() - t

    t = time.perf_counter()
    corpus = D.load_corpus(recipe.data.source, recipe.data.eval_fraction, recipe.data.text_field)
    ev = recipe.data.evaluation
    eval_windows = D.evaluation_windows(tokenizer, corpus.evaluation, ev.seq_len, ev.max_windows)
    built = [stages.TimedStage(stages.build(s)) for s in recipe.stages]
    needs_calibration = any(getattr(s, "needs_calibration", True) for s in built)
    calib = recipe.data.calibration
    calib_windows = (
        D.calibration_windows(tokenizer, corpus.calibration, calib.samples, calib.seq_len, recipe.seed)
        if needs_calibration
        else None
    )
    timing["load data"] = time.perf_counter() - t

    evaluation: dict = {}
    if recipe.eval.perplexity:
        evaluation = {"data": corpus.describe(), "bos": D.bos_id(tokenizer) is not None}
    if recipe.eval.perplexity and recipe.eval.before:
        t = time.perf_counter()
        model.to(device)
        evaluation["before"] = evaluate.perplexity(
            model, eval_windows, recipe.batch_size, device, progress, desc="perplexity before"
        )
        model.to("cpu")
        timing["evaluate before"] = time.perf_counter() - t

    if built:
        for s in built:
            if hasattr(s.stage, "prepare"):
                s.stage.prepare(model, arch)
        windows = calib_windows if calib_windows is not None else eval_windows[:1]
        final = run_layerwise(model, arch, windows, built, device, recipe.batch_size, progress)
        for s in built:
            if hasattr(s.stage, "finish"):
                t = time.perf_counter()
                s.stage.finish(model, arch, final)
                s.seconds += time.perf_counter() - t
            timing[f"stage {s.name}"] = s.seconds
        model.to("cpu")

    quantized: dict = {}
    for s in built:
        if isinstance(s.stage, QuantizingStage):
            quantized.update(s.stage.quantized)

    if recipe.eval.perplexity:
        t = time.perf_counter()
        model.to(device)
        evaluation["after"] = evaluate.perplexity(
            model, eval_windows, recipe.batch_size, device, progress, desc="perplexity after"
        )
        model.to("cpu")
        timing["evaluate after"] = time.perf_counter() - t

    w16, w_after = weight_bytes(model, quantized)
    result = {
        "recipe": recipe.model_dump(mode="json"),
        "recipe_yaml": recipe.to_yaml(),
        "model": model_info,
        "device": str(device),
        "stages": [
            {"type": b.name, "summary": _summary(e), "seconds": b.seconds}
            for e, b in zip(recipe.stages, built, strict=True)
        ],
        "evaluation": evaluation,
        "size": {
            "weights_16bit": w16,
            "weights_after": w_after,
            "quantized_linears": len(quantized),
            "kv_bytes_per_token_before": kv_before,
            "kv_bytes_per_token_after": kv_cache_bytes_per_token(model.config),
        },
        "timing": timing,
        "notes": [n for s in built for n in getattr(s.stage, "notes", [])],
    }

    (tmp / "recipe.yaml").write_text(recipe.to_yaml())
    if recipe.export.format != "none":
        from compress import export

        t = time.perf_counter()
        info = export.save(
            tmp,
            model,
            tokenizer,
            quantized,
            fmt=recipe.export.format,
            max_shard_size=R.parse_size(recipe.export.max_shard_size),
            recipe=recipe,
        )
        timing["export"] = time.perf_counter() - t
        result["export"] = {"format": recipe.export.format, "path": str(out), **(info or {})}
        result["notes"] += (info or {}).get("notes", [])
    timing["total"] = time.perf_counter() - t_start
    result["peak_memory"] = peak_memory(device)
    report.write(tmp, result)
    if recipe.export.format != "none":
        export.write_manifest(tmp)
    return result


def _summary(entry) -> str:
    fields = entry.model_dump(exclude={"type", "ignore"})
    inner = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    return f"{entry.type}({inner})"
