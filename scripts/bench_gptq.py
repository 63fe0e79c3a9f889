"""GPTQ side by side: float, RTN, our GPTQ, llm-compressor's GPTQModifier and GPTQModel, one run.

Every method runs in its own process (fresh peak-memory figure, no shared caches) on the
same calibration and evaluation windows, which the driver cuts once and hands over in a
safetensors file. Our code and llm-compressor run on the driver's interpreter (a virtual
environment that has llm-compressor; the project's own .venv stays untouched), GPTQModel on
another one's (``--gptqmodel-python``: its requirements differ), all with the same torch
thread count. GPTQModel reads the float model from a Hugging Face folder the driver writes
once; its saved GPTQ checkpoint is read back by compress.checkpoint and dequantized into the
float model for the evaluation.

    /work/bench-venv/bin/python scripts/bench_gptq.py --calibration 32 --eval-windows 40 \
        --jobs float,ours-sym,peer-sym,gptqmodel-sym --gptqmodel-python /work/gptqmodel-venv/bin/python

Prints a table and writes it, with the command, to eval/results/gptq-vs-peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import make_windows, peak_rss_bytes, run_worker  # noqa: E402  (scripts/ is on sys.path)
from bench_common import versions as bench_versions  # noqa: E402

# (job name, what it is) in run order. Our jobs' options are read from the name's parts
# (see ours_options); "mse" is the per-group clip search (MSEGrid: grid 100, shrinks down to
# 0.2, norm 2.4, patience 5), the peer's "mse" its MSE weight observer set to the same grid; "ft" is the
# float target (GPTAQ: GPTQ fitting the float model's outputs; "ft0.25": strength 0.25; "fw32": its drift
# term estimated on the first 32 calibration windows).
JOBS = {
    "float": "float32 model, no quantization",
    "rtn-sym": "RTN w4 g{g} symmetric",
    "rtn-asym": "RTN w4 g{g} asymmetric",
    "ours-sym": "our GPTQ w4 g{g} sym, act-order static, true-sequential",
    "ours-asym": "our GPTQ w4 g{g} asym, act-order static, true-sequential",
    "ours-sym-noact": "our GPTQ w4 g{g} sym, act-order off",
    "ours-asym-noact": "our GPTQ w4 g{g} asym, act-order off",
    "ours-sym-gidx": "our GPTQ w4 g{g} sym, act-order with g_idx",
    "ours-asym-gidx": "our GPTQ w4 g{g} asym, act-order with g_idx",
    "ours-sym-seq-off": "our GPTQ w4 g{g} sym, act-order static, true-sequential off",
    "ours-asym-seq-off": "our GPTQ w4 g{g} asym, act-order static, true-sequential off (as the peer)",
    "ours-sym-mse": "our GPTQ w4 g{g} sym, act-order static, true-sequential, MSE clip search per group",
    "ours-asym-mse": "our GPTQ w4 g{g} asym, act-order static, true-sequential, MSE clip search per group",
    "ours-asym-mse-seq-off": "our GPTQ w4 g{g} asym, act-order static, MSE clip search, true-sequential off",
    "ours-sym-ft": "our GPTQ w4 g{g} sym, act-order static, true-sequential, float target (GPTAQ)",
    "ours-asym-ft": "our GPTQ w4 g{g} asym, act-order static, true-sequential, float target (GPTAQ)",
    "ours-sym-mse-ft": "our GPTQ w4 g{g} sym, act-order static, true-sequential, MSE clip search, float target",
    "ours-asym-mse-ft": "our GPTQ w4 g{g} asym, act-order static, true-sequential, MSE clip search, float target",
    **{
        f"ours-{kind}-ft{a}": f"our GPTQ w4 g{{g}} {kind}, act-order static, true-sequential, float target strength {a}"
        for kind in ("sym", "asym")
        for a in ("0.25", "0.5")
    },
    **{
        f"ours-{kind}-mse-ft{a}": f"our GPTQ w4 g{{g}} {kind}, act-order static, true-sequential, MSE clip search, "
        f"float target strength {a}"
        for kind in ("sym", "asym")
        for a in ("0.25", "0.5")
    },
    **{
        f"ours-{kind}-ft0.25-fw{n}": f"our GPTQ w4 g{{g}} {kind}, act-order static, true-sequential, float target "
        f"strength 0.25 estimated on the first {n} windows"
        for kind in ("sym", "asym")
        for n in (16, 32, 64)
    },
    # GPU variants: activations offloaded ("-offload"), the walk's window chunk ("-chunkN").
    **{
        f"ours-{kind}{ft}{off}" + (f"-chunk{n}" if n else ""): f"our GPTQ w4 g{{g}} {kind}, act-order static, "
        "true-sequential"
        + (", float target strength 0.25" if ft else "")
        + (", activations offloaded to CPU memory" if off else "")
        + (f", the walk {n} windows at a time" if n else "")
        + " (a GPU run)"
        for kind in ("sym", "asym")
        for ft in ("", "-ft0.25")
        for off in ("", "-offload")
        for n in (None, 2, 4, 8)
        if off or n
    },
    "ours-sym-eager": "our GPTQ w4 g{g} sym, act-order static, true-sequential, the sweep not replayed from CUDA "
    "graphs (a GPU run)",
    "ours-sym-damp0.001": "our GPTQ w4 g{g} sym, act-order static, dampening 0.001",
    "ours-asym-damp0.001": "our GPTQ w4 g{g} asym, act-order static, dampening 0.001",
    "ours-sym-damp0.1": "our GPTQ w4 g{g} sym, act-order static, dampening 0.1",
    "ours-asym-damp0.1": "our GPTQ w4 g{g} asym, act-order static, dampening 0.1",
    "peer-sym": "llm-compressor GPTQModifier w4 g{g} sym (actorder static)",
    "gptqmodel-sym": "GPTQModel w4 g{g} sym (desc_act with static groups, damp 0.01, true-sequential)",
    "gptqmodel-asym": "GPTQModel w4 g{g} asym (desc_act with static groups, damp 0.01, true-sequential)",
    "gptqmodel-sym-gptaq": "GPTQModel w4 g{g} sym, as gptqmodel-sym plus GPTAQ (alpha 0.25)",
    "gptqmodel-asym-gptaq": "GPTQModel w4 g{g} asym, as gptqmodel-asym plus GPTAQ (alpha 0.25)",
    "peer-asym": "llm-compressor GPTQModifier w4 g{g} asym (actorder static)",
    "peer-sym-mse": "llm-compressor GPTQModifier w4 g{g} sym (actorder static), MSE weight observer, same grid",
    "peer-asym-mse": "llm-compressor GPTQModifier w4 g{g} asym (actorder static), MSE weight observer, same grid",
}
# Any of our jobs with its calibration forward's products in bfloat16 ("-bf16": GPTQStage's compute_dtype).
JOBS.update({f"{job}-bf16": f"{what}, forward in bfloat16" for job, what in list(JOBS.items())
             if job.startswith("ours-")})


def ours_options(job: str) -> dict:
    """GPTQStage keyword arguments for one of our jobs, from the parts of its name (and
    "offload", which the worker reads: run_layerwise's offload_activations)."""
    parts = job.split("-")
    damp = [float(p[len("damp") :]) for p in parts if p.startswith("damp")]
    return {
        "act_order": "none" if "noact" in parts else "g_idx" if "gidx" in parts else "static",
        "true_sequential": "seq-off" not in job,
        "mse": "mse" in parts,
        "float_target": next((float(p[2:] or 1) for p in parts if p.startswith("ft")), 0.0),
        "float_target_windows": next((int(p[2:]) for p in parts if p.startswith("fw")), None),
        "damp_percent": damp[0] if damp else 0.01,
        "compute_dtype": "bfloat16" if "bf16" in parts else None,
    }


# ---------------------------------------------------------------------------
# Workers: one method each, in a fresh process
# ---------------------------------------------------------------------------


def worker(job: str, windows_path: str, group: int, batch_size: int, threads: int, float_dir: str | None,
           device: str = "cpu") -> dict:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    if job.startswith("gptqmodel"):
        return gptqmodel_worker(job, windows_path, group, batch_size, float_dir)
    from compress import models

    tensors = load_file(windows_path)
    calib, evalw = tensors["calibration"], tensors["evaluation"]
    loaded = models.load("smollm2", "float32", "cpu")
    model = loaded.model
    rss_loaded = peak_rss_bytes()
    symmetric = "-asym" not in job
    info: dict = {"job": job, "threads": torch.get_num_threads(), "device": device}
    cuda = device.startswith("cuda")
    snapshot = os.environ.get("BENCH_GPU_MEMORY_SNAPSHOT") if cuda else None
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
        if snapshot:  # every allocation of the quantization, with its Python stack (scripts/gpu_memory_peak.py)
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

    t = time.perf_counter()
    cpu = time.process_time()
    if job.startswith(("rtn", "ours")):
        from compress.calibrate import run_layerwise
        from compress.quant.int4 import QuantArgs

        args = QuantArgs(4, group, symmetric)
        if job.startswith("rtn"):
            from compress.quant.rtn import RTNStage

            stage = RTNStage(args, ["lm_head"])
            windows = calib[:1]  # RTN needs no data; the engine wants something to run
        else:
            from compress.quant.gptq import GPTQStage

            stage = GPTQStage(args, ["lm_head"], **ours_options(job))
            chunk = [p[len("chunk") :] for p in job.split("-") if p.startswith("chunk")]
            if chunk:
                stage.window_chunk = int(chunk[0])
            stage.cuda_graphs = "eager" not in job.split("-")
            windows = calib
        run_layerwise(model, loaded.arch, windows, [stage], device, batch_size, progress=False,
                      offload_activations="-offload" in job)
        info["quantized_linears"] = len(stage.quantized)
        info["notes"] = list(getattr(stage, "notes", []))
    elif job.startswith("peer"):
        # On a CUDA machine llm-compressor's sequential pipeline runs each layer on the GPU by itself.
        info.update(run_peer(model, loaded.tokenizer, calib, group, symmetric, batch_size, mse=job.endswith("mse")))
    if cuda:
        torch.cuda.synchronize(device)
        info["peak_gpu_quantize"] = torch.cuda.max_memory_allocated(device)
        if snapshot:
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
            info["gpu_memory_snapshot"] = snapshot
    info["quantize_seconds"] = time.perf_counter() - t if job != "float" else 0.0
    # CPU time (all threads): fairer than wall time when the cores are shared with other jobs.
    info["quantize_cpu_seconds"] = time.process_time() - cpu if job != "float" else 0.0
    info["peak_rss_quantize"] = peak_rss_bytes()
    info["rss_after_load"] = rss_loaded

    t = time.perf_counter()
    info["eval"] = _perplexity_on(device, model, evalw, batch_size, info)
    info["eval_seconds"] = time.perf_counter() - t
    return info


def _perplexity_on(device: str, model, windows, batch_size: int, info: dict) -> dict:
    """The evaluation on ``device``; on a GPU, where a peer's onloading wrappers may be left on the
    model, any failure falls back to the CPU (and says so in ``info``)."""
    from compress import evaluate

    if device.startswith("cuda"):
        try:
            model.to(device)
            return evaluate.perplexity(model, windows, batch_size, device, progress=False)
        except Exception as e:  # reported in the results, never silent
            info.setdefault("notes", []).append(f"evaluated on the CPU: on {device}: {str(e).splitlines()[0][:120]}")
            model.to("cpu")
    return evaluate.perplexity(model, windows, batch_size, "cpu", progress=False)


def run_peer(model, tokenizer, calib, group: int, symmetric: bool, batch_size: int, mse: bool = False) -> dict:
    """llm-compressor's GPTQModifier through its oneshot entry point, on our windows.

    ``mse``: its MSE weight observer ("mse", which GPTQModifier runs memoryless on the original
    weights, as our act-order static does) with our MSEGrid's grid, shrink range, norm and patience."""
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from compress.quant.gptq import MSEGrid

    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": group,
                **(_peer_mse_observer(MSEGrid()) if mse else {}),
            },
        }
    }
    modifier = GPTQModifier(
        config_groups=scheme, ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static"
    )
    ids = calib.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=len(ids),
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    quantized = sum(1 for m in model.modules() if hasattr(m, "weight_scale"))
    return {"peer_version": llmcompressor.__version__, "quantized_linears": quantized}


def gptqmodel_worker(job: str, windows_path: str, group: int, batch_size: int, float_dir: str) -> dict:
    """GPTQModel on the float model's Hugging Face folder: quantize (timed, its peak RSS taken
    after), save in its GPTQ format, then read that checkpoint back with compress.checkpoint and
    evaluate the float model with the dequantized weights by the project's protocol.

    Settings as our default GPTQ's and the other peer's: desc_act with static groups (act-order
    "static"), dampening 0.01, true-sequential, ``lm_head`` in float; the rest its defaults
    (among them offloading finished layers to disk)."""
    import tempfile

    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from compress import checkpoint, evaluate

    tensors = load_file(windows_path)
    calib, evalw = tensors["calibration"], tensors["evaluation"]
    extra = {}
    if job.endswith("gptaq"):
        from gptqmodel.quantization.config import GPTAQConfig

        extra["gptaq"] = GPTAQConfig(alpha=0.25, device="cpu")
    config = QuantizeConfig(
        bits=4, group_size=group, sym="-asym" not in job, desc_act=True, static_groups=True, act_group_aware=False,
        damp_percent=0.01, true_sequential=True, lm_head=False, **extra,
    )
    model = GPTQModel.load(float_dir, config, device="cpu", dtype=torch.float32)
    info: dict = {"job": job, "threads": torch.get_num_threads(), "rss_after_load": peak_rss_bytes(),
                  "peer_version": f"gptqmodel {gptqmodel.__version__}"}
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
    t, cpu = time.perf_counter(), time.process_time()
    model.quantize(data, batch_size=1)
    info["quantize_seconds"] = time.perf_counter() - t
    info["quantize_cpu_seconds"] = time.process_time() - cpu
    info["peak_rss_quantize"] = peak_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="gptqmodel-out-") as out:
        model.save(out)
        del model
        ckpt = checkpoint.read(out)
    floats = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    for name, qw in ckpt.quantized.items():
        floats.get_submodule(name).weight.data = qw.dequantize()
    info["quantized_linears"] = len(ckpt.quantized)
    t = time.perf_counter()
    info["eval"] = evaluate.perplexity(floats, evalw, batch_size, "cpu", progress=False)
    info["eval_seconds"] = time.perf_counter() - t
    return info


def _peer_mse_observer(grid) -> dict:
    kwargs = {"grid": float(grid.grid), "maxshrink": grid.max_shrink, "norm": grid.norm, "patience": grid.patience}
    return {"observer": "mse", "observer_kwargs": kwargs}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_job(job: str, windows: Path, opts) -> dict:
    args = ["--group", str(opts.group), "--batch-size", str(opts.batch_size), "--device", opts.device]
    if job.startswith("gptqmodel"):
        folder = windows.parent.resolve()
        args += ["--float-dir", str(float_model_dir(folder))]
        env = {"GPTQMODEL_CPU_WORKERS": str(max(2, opts.threads))}  # what it needs on 2 cores (issue 4)
        # In the results folder: GPTQModel writes a logs/ folder wherever it runs.
        return run_worker(__file__, job, windows, args, opts.threads, opts.timeout, opts.gptqmodel_python, env,
                          cwd=folder)
    env = None
    if opts.gpu_memory_snapshots:
        folder = Path(opts.gpu_memory_snapshots).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        env = {"BENCH_GPU_MEMORY_SNAPSHOT": str(folder / f"{job}.memory.pickle")}
    return run_worker(__file__, job, windows, args, opts.threads, timeout=opts.timeout, env=env)


def float_model_dir(folder: Path) -> Path:
    return folder / "float-model"


def write_float_model(folder: Path) -> Path:
    """The embedded model in float32 as a Hugging Face folder (for GPTQModel, which loads from a
    path); written once per results folder, atomically."""
    import shutil

    from compress import models

    target = float_model_dir(folder)
    if (target / "config.json").exists():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    loaded = models.load("smollm2", "float32", "cpu")
    loaded.model.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(results: dict[str, dict], group: int) -> str:
    float_ppl = results.get("float", {}).get("eval", {}).get("perplexity")
    gpu = any("peak_gpu_quantize" in r for r in results.values())
    lines = [
        "| method | perplexity | Δ vs float | quantize wall s | quantize CPU s | peak RSS | RSS after load "
        + ("| peak GPU " if gpu else "") + "| eval s | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if gpu else "") + "--- |",
    ]
    for job, r in results.items():
        what = JOBS[job].format(g=group)
        if "error" in r:
            first = r["error"].splitlines()[-1] if r["error"] else "failed"
            lines.append(f"| {job} | failed | | | | | | | " + ("| " if gpu else "") + f"{what}: `{first[:160]}` |")
            continue
        ppl = r["eval"]["perplexity"]
        delta = f"{ppl - float_ppl:+.3f}" if float_ppl else ""
        secs = f"{r['quantize_seconds']:.1f}" if job != "float" else "–"
        cpu = f"{r['quantize_cpu_seconds']:.1f}" if job != "float" and "quantize_cpu_seconds" in r else "–"
        rss, load = fmt_bytes(r["peak_rss_quantize"]), fmt_bytes(r.get("rss_after_load", 0))
        gpu_peak = (f"{fmt_bytes(r['peak_gpu_quantize'])} | " if "peak_gpu_quantize" in r else "– | ") if gpu else ""
        lines.append(
            f"| {job} | {ppl:.3f} | {delta} | {secs} | {cpu} | {rss} | {load} | {gpu_peak}{r['eval_seconds']:.0f} "
            f"| {what} |"
        )
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> list[str]:
    """Each of our jobs against each peer's job of the same kind (sym/asym; llm-compressor's MSE
    observer when ours searches clips; GPTQModel's GPTAQ when ours has the float target; same
    windows), and the share of RTN's perplexity increase it keeps."""
    out = []
    float_ppl = results.get("float", {}).get("eval", {}).get("perplexity")
    for job, ours in results.items():
        if not job.startswith("ours-") or "eval" not in ours:
            continue
        kind = job[len("ours-") :]
        parts = kind.split("-")
        base = parts[0]
        peer_jobs = [f"peer-{base}-mse" if "mse" in parts else f"peer-{base}"]
        if "mse" not in parts:
            gptaq = any(p.startswith("ft") for p in parts)
            peer_jobs.append(f"gptqmodel-{base}-gptaq" if gptaq else f"gptqmodel-{base}")
        for peer_job in peer_jobs:
            peer = results.get(peer_job, {})
            if "eval" not in peer:
                continue
            extra = ""
            if ours.get("quantize_cpu_seconds") and peer.get("quantize_cpu_seconds"):
                extra = f"; CPU time ours/peer {ours['quantize_cpu_seconds'] / peer['quantize_cpu_seconds']:.3f}"
            if ours.get("peak_gpu_quantize") and peer.get("peak_gpu_quantize"):
                extra += f"; peak GPU memory ours/peer {ours['peak_gpu_quantize'] / peer['peak_gpu_quantize']:.3f}"
            ppl_ratio = ours["eval"]["perplexity"] / peer["eval"]["perplexity"]
            out.append(
                f"- {kind} vs {peer_job}: perplexity ours/peer {ppl_ratio:.4f}; "
                f"wall time ours/peer {ours['quantize_seconds'] / peer['quantize_seconds']:.3f}; "
                f"peak RSS ours/peer {ours['peak_rss_quantize'] / peer['peak_rss_quantize']:.3f}{extra}"
            )
        rtn = results.get(f"rtn-{base}", {})
        if "eval" in rtn and float_ppl:
            share = (ours["eval"]["perplexity"] - float_ppl) / (rtn["eval"]["perplexity"] - float_ppl)
            out.append(f"- {kind}: our GPTQ keeps {share:.1%} of RTN's perplexity increase over float")
    act = {j: results.get(j, {}) for j in ("ours-sym", "ours-sym-noact", "ours-sym-gidx")}
    figures = [f"{label} {r['eval']['perplexity']:.3f}" for label, r in zip(("static", "off", "g_idx"), act.values())
               if "eval" in r]
    if len(figures) > 1:
        out.append("- act-order (sym): " + ", ".join(figures))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", type=int, default=32, help="calibration windows")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-skip", type=int, default=0, help="evaluate from this window on (a disjoint proxy set)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group", type=int, default=64, help="64: the peer refuses 128 on 576-wide inputs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every method (1: the cores are shared)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds before a method's process is killed")
    p.add_argument("--device", default="cpu", help="where the layers run (cpu, cuda); the model's home is the CPU "
                   "either way, as the peers keep it. GPTQModel's jobs always run on the CPU")
    default_jobs = "float,rtn-sym,rtn-asym,ours-sym,ours-asym,ours-sym-noact,peer-sym,peer-asym"
    p.add_argument("--jobs", default=default_jobs, help="comma-separated subset of " + ", ".join(JOBS))
    p.add_argument("--output", default=str(ROOT / "eval/results/gptq-vs-peers.md"))
    p.add_argument("--keep-dir", help="keep per-method results here and reuse those already present")
    p.add_argument("--gpu-memory-snapshots", metavar="DIR", help="with --device cuda: record every GPU allocation "
                   "of each job's quantization into DIR/JOB.memory.pickle (torch's memory snapshot; "
                   "scripts/gpu_memory_peak.py says what was live at the peak)")
    peers_gptqmodel = ROOT / ".venv-peers/gptqmodel/bin/python"  # scripts/setup_peers.sh
    default_gptqmodel = str(peers_gptqmodel) if peers_gptqmodel.exists() else None
    p.add_argument("--gptqmodel-python", default=os.environ.get("GPTQMODEL_PYTHON") or default_gptqmodel,
                   help="the interpreter of a virtual environment with GPTQModel, for the gptqmodel-* jobs "
                   "(default: $GPTQMODEL_PYTHON, else .venv-peers/gptqmodel from scripts/setup_peers.sh)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--float-dir", help=argparse.SUPPRESS)
    p.add_argument("--windows", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.worker:
        result = worker(opts.worker, opts.windows, opts.group, opts.batch_size, opts.threads, opts.float_dir,
                        opts.device)
        Path(opts.json).write_text(json.dumps(result))
        return 0

    jobs = [j.strip() for j in opts.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        p.error(f"unknown jobs: {', '.join(unknown)}")
    wants_gptqmodel = any(j.startswith("gptqmodel") for j in jobs)
    if wants_gptqmodel and not opts.gptqmodel_python:
        p.error("the gptqmodel-* jobs need --gptqmodel-python (a virtual environment with gptqmodel 7.6: "
                "scripts/setup_peers.sh makes one)")
    command = "python scripts/bench_gptq.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gptq-") as tmp:
        # --keep-dir: results survive an interrupted run, and jobs already done there are reused.
        folder = Path(opts.keep_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        windows = folder / "windows.safetensors"
        meta = make_windows(windows, opts.calibration, opts.eval_windows, opts.seq_len, opts.seed, opts.eval_skip)
        print(f"data: {meta}", flush=True)
        if wants_gptqmodel:
            write_float_model(folder)
        for job in jobs:
            done = folder / f"{job}.json"
            if opts.keep_dir and done.exists():
                results[job] = json.loads(done.read_text())
                results[job].setdefault("process_seconds", 0.0)
                print(f"{job}: reused {done}", flush=True)
                continue
            results[job] = run_job(job, windows, opts)
            r = results[job]
            status = r.get("error", "").splitlines()[-1:] if "error" in r else r["eval"]["perplexity"]
            print(f"{job}: {status} ({r['process_seconds']:.0f} s)", flush=True)
    total = time.perf_counter() - t0

    load = os.getloadavg()
    versions = bench_versions()
    others = sorted({r["peer_version"] for j, r in results.items() if j.startswith("gptqmodel") and "eval" in r})
    if others:
        versions += ", " + ", ".join(others) + " (in its own virtual environment)"
    gpus = sorted({r["gpu"] for r in results.values() if "gpu" in r})
    body = [
        "# GPTQ w4: ours vs llm-compressor and GPTQModel (and RTN, float)",
        "",
        f"Command (from the repository root, {total / 60:.0f} min in all):",
        "",
        f"    {sys.executable} {command[len('python ') :]}",
        "",
        f"Model: embedded SmolLM2-135M-Instruct, float32, CPU ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {opts.threads}, "
        f"load average at the end {load[0]:.1f}: where other jobs share the cores, times are noisy)"
        + (f"; layers run on {gpus[0]} (`--device {opts.device}`), the model's home is CPU memory." if gpus else "."),
        f"Data: {meta['data']}; calibration {meta['calibration'][0]} x {meta['calibration'][1]} tokens, "
        f"evaluation {meta['evaluation'][0]} x {meta['evaluation'][1]} from window {meta['evaluation_first_window']} "
        "(the same windows for every method). "
        "Perplexity by the project's protocol (compress.evaluate). `lm_head` kept in float everywhere.",
        f"Versions: {versions}.",
        "Each method runs in its own process; quantize wall time covers only the quantization "
        "(our layer-by-layer run, llm-compressor's `oneshot`, GPTQModel's `quantize`, which includes its packing "
        "but not its `save`); peak RSS is the process's peak after quantization "
        "(model loading included). GPTQModel runs with GPTQMODEL_CPU_WORKERS=2 (what it needs on 2 cores).",
        "",
        table(results, opts.group),
        "",
        *ratios(results),
        "",
    ]
    notes = [f"- {j}: {n}" for j, r in results.items() for n in r.get("notes", [])[:5]]
    if notes:
        body += ["Notes from our stage:", "", *notes, ""]
    text = "\n".join(body)
    print(text)
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
