"""Several recipes, one protocol: a results matrix (Markdown + JSON) and a plot of
perplexity against model size.

Every recipe runs on the same model, dtype, device, seed, evaluation data and windows
(those of the first recipe, or the command line's overrides); a float row (no stages) is
the baseline. Outputs go to ``<out>.md``, ``<out>.json`` and ``<out>.png``, each written
to a temporary file and renamed when complete. Rows finished by an interrupted run are
kept in ``.<out>.rows/`` and reused by the next run of the same comparison.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from compress import assets
from compress import recipe as R

FLOAT_NAME = "float"


@dataclass
class Protocol:
    """What every row shares; ``None`` fields keep the first recipe's value."""

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    seed: int | None = None
    eval_seq_len: int | None = None
    eval_max_windows: int | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int | None = None


def model_slug(model: str) -> str:
    """A file name for a model: the embedded one is 'smollm2-135m'."""
    if model in assets.MODEL_ALIASES:
        return "smollm2-135m"
    name = Path(model.rstrip("/")).name or model
    name = re.sub(r"\.(gguf|safetensors)$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"


def unify(recipes: list[R.Recipe], protocol: Protocol) -> tuple[list[R.Recipe], list[str]]:
    """Copies of ``recipes`` with the shared protocol applied, a float baseline first,
    and notes naming what was changed in a recipe."""
    if not recipes:
        raise R.RecipeError("compare: give at least one recipe")
    names = [r.name for r in recipes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise R.RecipeError(f"compare: recipe names must differ ({', '.join(duplicates)} repeated)")
    if FLOAT_NAME in names:
        raise R.RecipeError(f"compare: '{FLOAT_NAME}' is the baseline row's name; rename that recipe")
    first = recipes[0]
    model = protocol.model or first.model
    dtype = protocol.dtype or first.dtype
    device = protocol.device or first.device
    seed = first.seed if protocol.seed is None else protocol.seed
    data = first.data.model_copy(deep=True)
    if protocol.eval_seq_len:
        data.evaluation.seq_len = protocol.eval_seq_len
    if protocol.eval_max_windows:
        data.evaluation.max_windows = protocol.eval_max_windows
    notes: list[str] = []
    out: list[R.Recipe] = []
    baseline = R.parse({"name": FLOAT_NAME, "model": model, "export": {"format": "none"}}, "float baseline")
    for r in [baseline, *recipes]:
        r = r.model_copy(deep=True)
        changed = []
        for key, value in (("model", model), ("dtype", dtype), ("device", device), ("seed", seed)):
            if getattr(r, key) != value:
                changed.append(f"{key} {getattr(r, key)!r}→{value!r}")
                setattr(r, key, value)
        calibration = r.data.calibration.model_copy()
        if protocol.calib_samples:
            calibration.samples = protocol.calib_samples
        if protocol.calib_seq_len:
            calibration.seq_len = protocol.calib_seq_len
        if r.data.model_dump(exclude={"calibration"}) != first.data.model_dump(exclude={"calibration"}):
            changed.append("evaluation data set to the first recipe's")
        r.data = data.model_copy(deep=True)
        r.data.calibration = calibration
        r.eval.perplexity = True
        r.eval.before = False  # the float row is the "before" of every row
        if protocol.tasks:
            r.eval.lm_eval.tasks = list(protocol.tasks)
        if protocol.limit:
            r.eval.lm_eval.limit = protocol.limit
        if protocol.batch_size:
            r.batch_size = protocol.batch_size
        r.eval.lm_eval.batch_size = r.batch_size  # lm-eval batches like the perplexity does
        r.export.format = "none"  # sizes are computed, no checkpoint needed
        if changed and r.name != FLOAT_NAME:
            notes.append(f"{r.name}: {', '.join(changed)} (same protocol for every row)")
        out.append(r)
    # lm-eval tasks: the union of the recipes' tasks, the same for every row.
    tasks = list(dict.fromkeys(t for r in out for t in r.eval.lm_eval.tasks))
    limit = next((r.eval.lm_eval.limit for r in out if r.eval.lm_eval.limit), None)
    for r in out:
        r.eval.lm_eval.tasks = tasks
        r.eval.lm_eval.limit = limit
    return out, notes


def row(result: dict) -> dict:
    """One results-matrix row from a pipeline report."""
    rec = result["recipe"]
    stages = rec.get("stages") or []
    quant = next((s for s in stages if s["type"] in ("rtn", "gptq")), None)
    gqa = next((s for s in stages if s["type"] == "gqa"), None)
    ev = result.get("evaluation") or {}
    size = result["size"]
    timing = result.get("timing") or {}
    return {
        "name": rec["name"],
        "method": "+".join(s["type"] for s in stages) or "float",
        "stages": [s["summary"] for s in result.get("stages", [])],
        "bits": quant["bits"] if quant else 16,
        "group_size": quant["group_size"] if quant else None,
        "symmetric": quant["symmetric"] if quant else None,
        "kv_heads": gqa["num_key_value_heads"] if gqa else result["model"]["kv_heads"],
        "perplexity": (ev.get("after") or {}).get("perplexity"),
        "lm_eval": ev.get("lm_eval") or {},
        "weight_bytes": size["weights_after"],
        "weight_bytes_16bit": size["weights_16bit"],
        "kv_bytes_per_token": size["kv_bytes_per_token_after"],
        "compress_seconds": sum(v for k, v in timing.items() if k.startswith("stage ")),
        "wall_seconds": timing.get("total"),
    }


# The table shows at most two metrics per task, in this order of preference; the JSON has all.
TABLE_METRICS = ("acc", "acc_norm", "exact_match", "word_perplexity", "bits_per_byte", "byte_perplexity")


def _main_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) columns of the table."""
    cols: list[tuple[str, str]] = []
    tasks = list(dict.fromkeys(task for r in rows for task in r["lm_eval"]))
    for task in tasks:
        present = {m for r in rows for m in r["lm_eval"].get(task, {}) if not m.endswith("_stderr")}
        chosen = [m for m in TABLE_METRICS if m in present][:2] or sorted(present)[:2]
        cols += [(task, m) for m in chosen]
    return cols


def _mib(n: float) -> str:
    x = n / 2**20
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def to_markdown(doc: dict, plot_name: str | None) -> str:
    p = doc["protocol"]
    rows = doc["rows"]
    base = next((r for r in rows if r["name"] == FLOAT_NAME), None)
    metric_cols = _main_metrics(rows)
    head = ["recipe", "method", "bits", "group", "KV heads", "perplexity", "Δ vs float"]
    head += [f"{task} {metric}" for task, metric in metric_cols]
    head += ["weights MiB", "vs fp16", "KV B/token", "compress s", "wall s"]
    lines = [
        f"# Results: {doc['model_slug']}",
        "",
        f"Produced by `{doc['command']}` on {doc['created']} ({doc['machine']}).",
        "",
        f"Model `{p['model']}` ({p['parameters'] / 1e6:.1f} M parameters), dtype {p['dtype']}, device "
        f"{p['device']}, seed {p['seed']}. Perplexity: evaluation split of `{p['data']}` "
        f"({p['evaluation_documents']} documents, never used for calibration), {p['windows']} windows × "
        f"{p['seq_len']} tokens. Calibration: {p['calibration']}."
        + (f" lm-eval: {', '.join(p['tasks'])}" + (f", first {p['limit']} examples per task." if p["limit"] else ".")
           if p["tasks"] else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|",
    ]
    for r in rows:
        ppl = r["perplexity"]
        delta = (
            f"{ppl / base['perplexity'] - 1:+.1%}"
            if ppl and base and base["perplexity"] and r is not base
            else "–"
        )
        cells = [
            r["name"],
            r["method"],
            str(r["bits"]),
            str(r["group_size"]) if r["group_size"] is not None else "–",
            str(r["kv_heads"]),
            f"{ppl:.3f}" if ppl else "–",
            delta,
        ]
        for task, metric in metric_cols:
            scores = r["lm_eval"].get(task, {})
            v, err = scores.get(metric), scores.get(f"{metric}_stderr")
            cells.append("–" if v is None else f"{v:.4g} ± {err:.2g}" if err else f"{v:.4g}")
        cells += [
            _mib(r["weight_bytes"]),
            f"{r['weight_bytes'] / r['weight_bytes_16bit']:.2f}×" if r["weight_bytes_16bit"] else "–",
            str(r["kv_bytes_per_token"]),
            f"{r['compress_seconds']:.0f}",
            f"{r['wall_seconds']:.0f}" if r["wall_seconds"] is not None else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Weights: every parameter at 16 bits, quantized linears at their packed size (int4 codes, fp16 "
        "scales, zero points); tied embeddings counted once. KV B/token: fp16 keys and values of all layers. "
        "compress s: the stages' time; wall s: the whole job (load, calibrate, compress, evaluate). "
        "All lm-eval metrics are in the JSON file.",
        "",
    ]
    if plot_name:
        lines += [f"![perplexity against weight bytes]({plot_name})", ""]
    if doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    lines += ["Stages per row:", ""]
    lines += [f"- **{r['name']}**: {', '.join(r['stages']) or 'none (float baseline)'}" for r in rows]
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity against weight bytes, one labelled point per row (PNG, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rows of one size sit on top of each other: distinct markers and a legend, not labels on the points.
    markers = "osD^vP<>Xdph"
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    try:
        for i, r in enumerate(rows):
            if not r["perplexity"]:
                continue
            x = r["weight_bytes"] / 2**20
            is_float = r["name"] == FLOAT_NAME
            ax.scatter([x], [r["perplexity"]], s=90 if is_float else 45, zorder=3, alpha=0.85, label=r["name"],
                       marker="*" if is_float else markers[i % len(markers)], color="black" if is_float else None)
        ppls = [r["perplexity"] for r in rows if r["perplexity"]]
        if ppls and max(ppls) > 10 * min(ppls):
            ax.set_yscale("log")  # one broken row must not flatten the others
        ax.margins(0.15)
        ax.set_xlabel("weight bytes (MiB)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; results are for everyone
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compare(
    recipe_paths: list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    protocol: Protocol | None = None,
    command: str | None = None,
    progress: bool = True,
    log=print,
    fresh: bool = False,
) -> dict:
    """Run every recipe (and the float baseline) under one protocol; write the matrix."""
    from compress import pipeline

    protocol = protocol or Protocol()
    recipes = [R.load(p) for p in recipe_paths]  # all validated before any work
    runs, notes = unify(recipes, protocol)
    if runs[0].eval.lm_eval.tasks:
        from compress import lm_eval_adapter

        lm_eval_adapter.check_offline(runs[0].eval.lm_eval.tasks)
    slug = model_slug(runs[0].model)
    out = Path(out) if out else Path("eval") / "results" / slug
    out = out.with_suffix("") if out.suffix in (".md", ".json", ".png") else out
    out.parent.mkdir(parents=True, exist_ok=True)

    # Finished rows are kept beside the output until the matrix is written: an interrupted
    # comparison, run again with the same recipes and protocol, redoes only the missing rows.
    rows_dir = out.parent / f".{out.name}.rows"
    if fresh and rows_dir.exists():
        shutil.rmtree(rows_dir)
    rows_dir.mkdir(exist_ok=True)
    results = []
    for i, r in enumerate(runs, 1):
        saved = rows_dir / f"{r.name}.json"
        key = fingerprint(r)
        if saved.exists():
            cached = json.loads(saved.read_text())
            if cached.get("fingerprint") == key:
                log(f"[{i}/{len(runs)}] {r.name}: done in an earlier run, reused")
                results.append(cached["result"])
                continue
        log(f"[{i}/{len(runs)}] {r.name}")
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.run-") as work:
            t = time.perf_counter()
            result = pipeline.run(r, Path(work) / r.name, overwrite=True, progress=progress)
            result.setdefault("timing", {}).setdefault("total", time.perf_counter() - t)
        payload = json.dumps({"fingerprint": key, "result": result}, default=str)
        _atomic_write(saved, lambda p, text=payload: p.write_text(text))
        results.append(json.loads(payload)["result"])

    first = results[0]
    ev = first["evaluation"]
    r0 = runs[0]
    doc = {
        "model_slug": slug,
        "output": str(out),
        "command": command or "compress compare " + " ".join(str(p) for p in recipe_paths),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {_torch_version()}",
        "protocol": {
            "model": r0.model,
            "parameters": first["model"]["parameters"],
            "dtype": r0.dtype,
            "device": first["device"],
            "seed": r0.seed,
            "data": r0.data.source,
            "evaluation_documents": ev["data"]["evaluation_documents"],
            "windows": ev["after"]["windows"],
            "seq_len": ev["after"]["seq_len"],
            "calibration": _calibration_text(runs[1:]),
            "tasks": r0.eval.lm_eval.tasks,
            "limit": r0.eval.lm_eval.limit,
        },
        "notes": notes,
        "rows": [row(res) for res in results],
        "reports": results,
    }
    png = out.with_suffix(".png")
    _atomic_write(png, lambda p: plot(doc["rows"], p, f"{slug}: perplexity against weight bytes"))
    _atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(doc, indent=2, default=str) + "\n"))
    _atomic_write(out.with_suffix(".md"), lambda p: p.write_text(to_markdown(doc, png.name)))
    shutil.rmtree(rows_dir, ignore_errors=True)
    return doc


def fingerprint(recipe: R.Recipe) -> str:
    """What a row depends on: the unified recipe and the package version."""
    import hashlib

    from compress import __version__

    return hashlib.sha256(f"{__version__}\n{recipe.to_yaml()}".encode()).hexdigest()[:16]


def _calibration_text(runs: list[R.Recipe]) -> str:
    settings = sorted({(r.data.calibration.samples, r.data.calibration.seq_len) for r in runs})
    if not settings:
        return "none"
    return "; ".join(f"{n} windows × {s} tokens of the calibration split" for n, s in settings)


def _torch_version() -> str:
    import torch

    return torch.__version__
