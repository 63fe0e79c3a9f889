"""One compression job: recipe → model → stages → evaluation → files.

All files go to a temporary folder beside the output, renamed into place only when the
job is complete: an interrupted job never leaves a folder that looks finished.

Where files go: the output folder is wherever the user says (absolute, relative, ``..``
included: the recipe is the user's own). Nothing is written outside it except its
staging sibling ``.<name>.partial`` (and ``.<name>.old`` for the instant of the swap).
The output folder may not be the filesystem root, the home folder, the current folder
or one of its parents, nor contain the recipe, model or data; ``--overwrite`` replaces
only a folder that compress wrote (it holds ``recipe.yaml``) or an empty one.

The staging folder also holds per-layer progress (compress/resume.py): a run killed
halfway continues with ``resume=True`` (``compress run --resume``) from its last
completed layer, with a result identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from compress import data as D
from compress import evaluate, models, report, stages
from compress import recipe as R
from compress.arch import decoder_layers, head_counts, kv_cache_bytes_per_token
from compress.calibrate import LayerInputs, capture_layer_inputs, run_layerwise
from compress.quant.common import QuantizingStage
from compress.resume import Progress, ResumeError, fingerprint

log = logging.getLogger("compress")


class OutputError(ValueError):
    """An output folder that must not be written (one line, exit 2 in the CLI)."""


class OutputExists(OutputError, FileExistsError):
    pass


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job; the message says what was kept."""


def fault(point: str) -> None:
    """Test hook for interruption tests: ``COMPRESS_FAULT=ACTION@POINT``.

    ACTION ``kill`` sends this process SIGKILL at POINT; ``pause`` prints a marker to
    stderr and sleeps (so a test can send SIGINT at a known point). Points: ``after_before_eval``,
    ``before_save:I``, ``mid_save:I``, ``after_save:I``, ``after_layers``, ``before_commit``.
    """
    spec = os.environ.get("COMPRESS_FAULT")
    if not spec:
        return
    action, _, where = spec.partition("@")
    if where != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        print(f"compress-fault: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(120)


def check_recipe_for_model(recipe: R.Recipe, config) -> None:
    """Recipe values that only the model can rule out; one-line RecipeError naming the field."""
    heads, kv_heads, _ = head_counts(config)
    layers = config.num_hidden_layers
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, R.GQAStage):
            n = stage.num_key_value_heads
            if heads % n:
                raise R.RecipeError(
                    f"stages.{i}.num_key_value_heads: {n} does not divide the model's {heads} query heads"
                )
            if n > kv_heads:
                raise R.RecipeError(
                    f"stages.{i}.num_key_value_heads: {n} is more than the model's {kv_heads} KV heads"
                )
        if isinstance(stage, R.DropLayersStage) and stage.keep > layers:
            raise R.RecipeError(f"stages.{i}.keep: {stage.keep} is more than the model's {layers} layers")


def check_finite(model: torch.nn.Module) -> None:
    """A model with NaN or Inf weights cannot be compressed meaningfully: say where."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise models.ModelLoadError(f"model weight {name} holds NaN or Inf values")


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


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_path(out: Path, overwrite: bool, protect: list[Path] | tuple = ()) -> None:
    """The rules of the module docstring; OutputError naming the problem."""
    real = out.expanduser().resolve()
    home = Path.home().resolve()
    if real == Path(real.anchor) or real == home:
        raise OutputError(f"output folder {out}: refusing to write to the filesystem root or home folder")
    if _is_within(Path.cwd().resolve(), real):
        raise OutputError(f"output folder {out}: it is the current folder or one of its parents")
    for p in protect:
        if p and _is_within(Path(p).expanduser().resolve(), real):
            raise OutputError(f"output folder {out} would contain or replace the input {p}")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"output path {out} exists and is not a folder")
        if not overwrite:
            raise OutputExists(f"output folder {out} exists; pass --overwrite to replace it")
        if not (out / "recipe.yaml").is_file() and any(out.iterdir()):
            raise OutputError(
                f"output folder {out} exists and was not written by compress (no recipe.yaml); "
                "refusing to replace it, even with --overwrite"
            )


def prepare_output(
    out: Path, overwrite: bool, resume: bool = False, protect: list[Path] | tuple = ()
) -> Path:
    """Check the output path and make (or, resuming, keep) its staging folder."""
    check_output_path(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    if tmp.exists() and not tmp.is_dir():
        raise OutputError(f"staging path {tmp} exists and is not a folder; remove it")
    if tmp.exists() and resume and (tmp / "progress").is_dir():
        # Keep the progress; anything else there is from an unfinished export.
        for child in tmp.iterdir():
            if child.name != "progress":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        return tmp
    if resume:
        log.warning("compress: nothing to resume in %s; starting from the beginning", tmp)
    elif (tmp / "progress" / "state.json").is_file():
        log.warning("compress: discarding the progress of an interrupted run in %s (--resume continues it)", tmp)
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


def _inputs_of(recipe: R.Recipe) -> list[Path]:
    """Local files a recipe reads: the output folder must not swallow them."""
    return [Path(p) for p in (recipe.model, recipe.data.source) if Path(p).expanduser().exists()]


def run(
    recipe: R.Recipe,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    protect: list[Path] | tuple = (),
) -> dict:
    """Run a recipe end to end; returns the report (also written to the output folder).

    ``resume`` continues an interrupted run of the same recipe from its last completed layer.
    """
    out = Path(output) if output else recipe.output_dir()
    if recipe.eval.lm_eval.tasks:
        from compress import lm_eval_adapter

        lm_eval_adapter.check_offline(recipe.eval.lm_eval.tasks)  # before hours of compression
    tmp = prepare_output(out, overwrite, resume, [*protect, *_inputs_of(recipe)])
    try:
        result = _run(recipe, out, tmp, progress, resume)
        fault("before_commit")
        commit_output(tmp, out)
    except BaseException as e:
        state = tmp / "progress" / "state.json"
        kept = state.is_file() and _done_layers(state) > 0
        if kept and not isinstance(e, ResumeError):
            where = f"progress kept in {tmp}; run the same command with --resume to continue"
            if isinstance(e, KeyboardInterrupt):
                raise JobInterrupted(where) from None
            log.warning("compress: %s", where)
        elif not isinstance(e, ResumeError):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _done_layers(state: Path) -> int:
    import json

    try:
        return int(json.loads(state.read_text()).get("done_layers", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _run(recipe: R.Recipe, out: Path, tmp: Path, progress: bool, resume: bool = False) -> dict:
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)

    t = time.perf_counter()
    loaded = models.load(recipe.model, recipe.dtype, "cpu", recipe.trust_remote_code)
    model, tokenizer, arch = loaded.model, loaded.tokenizer, loaded.arch
    check_recipe_for_model(recipe, model.config)
    check_finite(model)
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

    # Progress for --resume: the recipe without where it writes (moving the output moves the staging too).
    dump = recipe.model_dump(mode="json")
    dump["export"].pop("output", None)
    saved = Progress(tmp, fingerprint(R.Recipe.model_validate(dump).to_yaml(), model.config.num_hidden_layers))
    point = None
    if resume and saved.exists():
        saved.load_state()
    else:
        saved.start()

    evaluation: dict = {}
    if recipe.eval.perplexity:
        evaluation = {"data": corpus.describe(), "bos": D.bos_id(tokenizer) is not None}
    if recipe.eval.perplexity and recipe.eval.before:
        if saved.state.get("evaluation_before"):
            evaluation["before"] = saved.state["evaluation_before"]
            timing.update({k: v for k, v in saved.state.get("timing", {}).items() if k == "evaluate before"})
        else:
            t = time.perf_counter()
            model.to(device)
            evaluation["before"] = evaluate.perplexity(
                model, eval_windows, recipe.batch_size, device, progress, desc="perplexity before"
            )
            model.to("cpu")
            timing["evaluate before"] = time.perf_counter() - t
            saved.state["timing"] = dict(timing)
            saved.note_evaluation_before(evaluation["before"])
    fault("after_before_eval")

    if built:
        for s in built:
            if hasattr(s.stage, "prepare"):
                s.stage.prepare(model, arch)
        windows = calib_windows if calib_windows is not None else eval_windows[:1]
        layers = decoder_layers(model, arch)
        start, inputs = 0, None
        if saved.state.get("done_layers"):
            point = saved.restore(model, layers, built)
            captured = capture_layer_inputs(model, arch, windows, recipe.batch_size, device)
            start, inputs = point.done_layers, LayerInputs(
                [h.to(device) for h in point.inputs_hidden], captured.kwargs
            )
            log.warning("compress: resuming after layer %d of %d", start, len(layers))

        def on_layer_done(i: int, done: LayerInputs) -> None:
            fault(f"before_save:{i}")
            saved.save_layer(i, f"{arch.layers_path}.{i}", layers[i], built, done)
            fault(f"after_save:{i}")

        final = run_layerwise(
            model, arch, windows, built, device, recipe.batch_size, progress,
            start_layer=start, inputs=inputs, on_layer_done=on_layer_done,
            offload_activations=recipe.offload_activations,
        )
        fault("after_layers")
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
    for s in built:  # a stage that removed layers renumbers the records (drop_layers)
        if hasattr(s.stage, "rename_quantized"):
            quantized = s.stage.rename_quantized(quantized)

    if recipe.eval.perplexity:
        t = time.perf_counter()
        model.to(device)
        evaluation["after"] = evaluate.perplexity(
            model, eval_windows, recipe.batch_size, device, progress, desc="perplexity after"
        )
        model.to("cpu")
        timing["evaluate after"] = time.perf_counter() - t

    if recipe.eval.lm_eval.tasks:
        evaluation["lm_eval"] = _lm_eval(recipe, model, tokenizer, device)
        timing["lm-eval"] = evaluation["lm_eval"].pop("_seconds")

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
            dtype=None if recipe.export.dtype == "auto" else getattr(torch, recipe.export.dtype),
        )
        timing["export"] = time.perf_counter() - t
        result["export"] = {"format": recipe.export.format, "path": str(out), **(info or {})}
        # The staging folder also holds resume progress, which is deleted on commit: count what stays.
        result["export"]["bytes"] = sum(
            p.stat().st_size for p in tmp.rglob("*") if p.is_file() and saved.dir not in p.parents
        )
        result["notes"] += (info or {}).get("notes", [])
    timing["total"] = time.perf_counter() - t_start
    result["peak_memory"] = peak_memory(device)
    if point is not None:
        result["resumed_after_layer"] = point.done_layers
    # Progress is not part of the result; removed before the manifest lists the files.
    shutil.rmtree(tmp / "progress", ignore_errors=True)
    report.write(tmp, result)
    if recipe.export.format != "none":
        export.write_manifest(tmp)
    return result


def _lm_eval(recipe: R.Recipe, model, tokenizer, device: torch.device) -> dict:
    """The recipe's lm-eval tasks on the compressed model (same corpus split as perplexity)."""
    from compress import lm_eval_adapter

    t = time.perf_counter()
    cfg = recipe.eval.lm_eval
    model.to(device)
    scores = lm_eval_adapter.run_tasks(
        model,
        cfg.tasks,
        tokenizer=tokenizer,
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        device=device,
        data=recipe.data.source,
        eval_fraction=recipe.data.eval_fraction,
        text_field=recipe.data.text_field,
        seed=recipe.seed,
    )
    model.to("cpu")
    return {**scores, "_seconds": time.perf_counter() - t}


def _summary(entry) -> str:
    fields = entry.model_dump(exclude={"type", "ignore"})
    inner = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    return f"{entry.type}({inner})"
