"""The process-per-method harness that bench_awq.py and bench_gptq.py share.

Each method runs in a fresh process (its own peak-memory figure, no shared caches) on windows that
the driver cuts once and hands over in a safetensors file.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_windows(path: Path, calibration: int, eval_windows: int, seq_len: int, seed: int, eval_skip: int = 0) -> dict:
    """Cut the windows once and write them to ``path`` (atomically: two drivers may share a --keep-dir).

    ``eval_skip``: evaluate on windows ``eval_skip`` .. ``eval_skip + eval_windows`` of the evaluation
    text, so that a proxy study choosing settings never sees the windows a reported run uses."""
    import torch
    from safetensors.torch import save_file

    from compress import data, models

    loaded = models.load("smollm2", "float32", "cpu")
    corpus = data.load_corpus("wiki")
    calib = data.calibration_windows(loaded.tokenizer, corpus.calibration, calibration, seq_len, seed)
    evalw = data.evaluation_windows(loaded.tokenizer, corpus.evaluation, seq_len, eval_skip + eval_windows)
    evalw = evalw[eval_skip:]
    if evalw.shape[0] < eval_windows:
        raise SystemExit(f"the evaluation text has only {evalw.shape[0] + eval_skip} windows of {seq_len} tokens")
    if path.exists():  # a reused --keep-dir: its results are only comparable on the same windows
        from safetensors.torch import load_file

        old = load_file(str(path))
        if not (torch.equal(old["calibration"], calib) and torch.equal(old["evaluation"], evalw)):
            raise SystemExit(f"{path} holds other windows than these options give: use another --keep-dir")
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file({"calibration": calib.contiguous(), "evaluation": evalw.contiguous()}, str(partial))
    os.replace(partial, path)
    return {
        "data": corpus.describe(),
        "calibration": list(calib.shape),
        "evaluation": list(evalw.shape),
        "evaluation_first_window": eval_skip,
    }


def run_worker(script: str, job: str, windows: Path, args: list[str], threads: int,
               timeout: float | None = None, python: str | None = None, env: dict | None = None,
               cwd: Path | None = None) -> dict:
    """Run ``script --worker job`` in a fresh process (under ``python``: another virtual
    environment's interpreter, default this one's; in ``cwd``, default the repository root,
    for a peer that writes files where it runs); its JSON result, or {"error": ...}."""
    windows = windows.resolve()
    out = windows.parent / f"{job}.json"
    cmd = [python or sys.executable, str(Path(script).resolve()), "--worker", job, "--windows", str(windows),
           "--json", str(out), "--threads", str(threads), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"job": job, "error": f"killed after {timeout} s", "process_seconds": time.perf_counter() - t}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        return {"job": job, "error": "\n".join(tail), "process_seconds": time.perf_counter() - t}
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - t
    return result


def versions() -> str:
    parts = []
    for name in ("torch", "transformers", "llmcompressor", "compressed_tensors"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except Exception:  # a missing peer is reported, not fatal
            parts.append(f"{name} missing")
    return ", ".join(parts)
