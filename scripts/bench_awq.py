"""AWQ side by side: float, RTN, our AWQ (+RTN, +GPTQ; GQA-aware v → o on and off), GPTQ,
and llm-compressor's AWQModifier followed by its quantization, one run.

Every method runs in its own process on the same calibration and evaluation windows (cut
once by the driver, handed over in a safetensors file), with the same torch thread count.
Ours and the peer run on the same interpreter: a separate virtual environment that has
llm-compressor (/work/main/.venv stays untouched).

    /work/bench-venv/bin/python scripts/bench_awq.py --calibration 4 --eval-windows 16

The quantizer everywhere is 4-bit asymmetric with group size 64 (the peer's W4A16_ASYM with
groups of 64: it refuses 128 on the model's 576-wide inputs); lm_head stays float.
Results are written after every job (a partial table survives an interrupted run) to
eval/results/awq-vs-peers.md, with the command.
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

JOBS = {
    "float": "float32 model, no quantization",
    "rtn": "RTN",
    "awq-rtn": "our AWQ (duo, clip, GQA-aware v→o) + RTN",
    "peer-awq": "llm-compressor AWQModifier (duo, n_grid 20) + QuantizationModifier",
    "awq-rtn-novo": "our AWQ without v→o scaling (as the references on GQA) + RTN",
    "awq-rtn-noclip": "our AWQ without the clip search + RTN",
    "gptq": "our GPTQ (act-order static)",
    "awq-gptq": "our AWQ (no clip, GQA-aware v→o) + our GPTQ (act-order static)",
    "awq-gptq-novo": "our AWQ (no clip, no v→o scaling) + our GPTQ (act-order static)",
    "awq-gptq-mse": "our AWQ (no clip, GQA-aware v→o) + our GPTQ (act-order static, per-group range search)",
    "awq-gptq-novo-mse": "our AWQ (no clip, no v→o scaling) + our GPTQ (act-order static, per-group range search)",
}


# ---------------------------------------------------------------------------
# Workers: one method each, in a fresh process
# ---------------------------------------------------------------------------


def worker(job: str, windows_path: str, opts) -> dict:
    import torch
    from safetensors.torch import load_file

    from compress import evaluate, models

    torch.set_num_threads(opts.threads)
    tensors = load_file(windows_path)
    calib, evalw = tensors["calibration"], tensors["evaluation"]
    loaded = models.load("smollm2", "float32", "cpu")
    model = loaded.model
    info: dict = {"job": job, "threads": torch.get_num_threads()}

    t, cpu = time.perf_counter(), time.process_time()
    if job == "peer-awq":
        info.update(run_peer(model, loaded.tokenizer, calib, opts))
    elif job != "float":
        info.update(run_ours(job, model, loaded.arch, calib, opts))
    info["quantize_seconds"] = time.perf_counter() - t if job != "float" else 0.0
    info["quantize_cpu_seconds"] = time.process_time() - cpu if job != "float" else 0.0
    info["peak_rss_quantize"] = peak_rss_bytes()

    t = time.perf_counter()
    info["eval"] = evaluate.perplexity(model, evalw, opts.batch_size, "cpu", progress=False)
    info["eval_seconds"] = time.perf_counter() - t
    return info


def run_ours(job: str, model, arch, calib, opts) -> dict:
    from compress.calibrate import run_layerwise
    from compress.quant.awq import AWQStage
    from compress.quant.int4 import QuantArgs

    args = QuantArgs(4, opts.group, False)
    chain: list = []
    if job.startswith("awq"):
        chain.append(
            AWQStage(
                args,
                grid=20,
                coarse_step=opts.coarse_step,
                search_tokens=opts.search_tokens,
                # GPTQ compensates each column's error and picks its own ranges: a range clipped
                # for RTN beforehand only takes that freedom away.
                clip=not (job.endswith("noclip") or "gptq" in job),
                gqa_aware_vo="novo" not in job,
            )
        )
    if "gptq" in job:
        from compress.quant.gptq import GPTQStage

        chain.append(GPTQStage(args, ["lm_head"], mse=job.endswith("mse")))
    else:
        from compress.quant.rtn import RTNStage

        chain.append(RTNStage(args, ["lm_head"]))
    windows = calib if len(chain) > 1 or job == "gptq" else calib[:1]  # RTN alone needs no data
    run_layerwise(model, arch, windows, chain, "cpu", opts.batch_size, progress=False)
    return {
        "quantized_linears": len(chain[-1].quantized),
        "notes": [n for s in chain for n in getattr(s, "notes", [])],
    }


def run_peer(model, tokenizer, calib, opts) -> dict:
    """llm-compressor's AWQModifier then QuantizationModifier through oneshot, on our windows."""
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    # Pinning memory needs an accelerator; on a CPU-only machine it fails.
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": opts.group,
            },
        }
    }
    recipe = [
        AWQModifier(duo_scaling=True, n_grid=20),
        QuantizationModifier(config_groups=scheme, ignore=["lm_head"]),
    ]
    ids = calib.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(ids),
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    quantized = sum(1 for m in model.modules() if hasattr(m, "weight_scale"))
    return {"peer_version": llmcompressor.__version__, "quantized_linears": quantized}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_job(job: str, windows: Path, opts) -> dict:
    args = ["--group", str(opts.group), "--batch-size", str(opts.batch_size),
            "--coarse-step", str(opts.coarse_step), "--search-tokens", str(opts.search_tokens)]
    return run_worker(__file__, job, windows, args, opts.threads)


def table(results: dict[str, dict]) -> str:
    float_ppl = results.get("float", {}).get("eval", {}).get("perplexity")
    lines = [
        "| method | perplexity | Δ vs float | quantize wall s | quantize CPU s | peak RSS GiB | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for job, r in results.items():
        if "error" in r:
            last = r["error"].splitlines()[-1] if r["error"] else "failed"
            lines.append(f"| {job} | failed | | | | | {JOBS[job]}: `{last[:160]}` |")
            continue
        ppl = r["eval"]["perplexity"]
        delta = f"{ppl - float_ppl:+.3f}" if float_ppl else ""
        secs = f"{r['quantize_seconds']:.0f}" if job != "float" else "–"
        cpu = f"{r['quantize_cpu_seconds']:.0f}" if job != "float" else "–"
        rss = r["peak_rss_quantize"] / 2**30
        lines.append(f"| {job} | {ppl:.3f} | {delta} | {secs} | {cpu} | {rss:.2f} | {JOBS[job]} |")
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> list[str]:
    def ok(job: str) -> dict | None:
        r = results.get(job, {})
        return r if "eval" in r else None

    def ppl(job: str) -> float:
        return results[job]["eval"]["perplexity"]

    out = []
    if ok("awq-rtn") and ok("peer-awq"):
        ours, peer = results["awq-rtn"], results["peer-awq"]
        out.append(
            f"- ours/peer: perplexity {ppl('awq-rtn') / ppl('peer-awq'):.4f}, "
            f"quantize wall time {ours['quantize_seconds'] / peer['quantize_seconds']:.3f}, "
            f"quantize CPU time {ours['quantize_cpu_seconds'] / peer['quantize_cpu_seconds']:.3f}, "
            f"peak RSS {ours['peak_rss_quantize'] / peer['peak_rss_quantize']:.3f}"
        )
    if ok("float") and ok("rtn"):
        gap = ppl("rtn") - ppl("float")
        for job in [j for j in JOBS if j not in ("float", "rtn")]:
            if ok(job):
                out.append(f"- {job} keeps {(ppl(job) - ppl('float')) / gap:.1%} of RTN's perplexity increase")
    for on, off in (("awq-rtn", "awq-rtn-novo"), ("awq-gptq", "awq-gptq-novo")):
        if ok(on) and ok(off):
            out.append(f"- GQA-aware v→o scaling, {on}: perplexity {ppl(off):.3f} → {ppl(on):.3f}")
    if ok("awq-gptq"):
        rivals = {j: ppl(j) for j in ("awq-rtn", "gptq") if ok(j)}
        if rivals:
            best = min(rivals, key=rivals.__getitem__)
            verdict = "beats" if ppl("awq-gptq") < rivals[best] else "does not beat"
            out.append(
                f"- awq-gptq {ppl('awq-gptq'):.3f} {verdict} the best of {', '.join(rivals)} "
                f"({best} {rivals[best]:.3f})"
            )
    return out


def write_report(path: Path, command: str, meta: dict, results: dict, opts, elapsed: float, done: bool) -> str:
    load = os.getloadavg()
    body = [
        f"# AWQ w4 g{opts.group}: ours vs llm-compressor (and RTN, GPTQ, float)",
        "",
        f"Command (from the repository root, {elapsed / 60:.0f} min in all{'' if done else ', run still going'}):",
        "",
        f"    {command}",
        "",
        f"Model: embedded SmolLM2-135M-Instruct (30 layers, 9 query heads, 3 KV heads), float32, CPU "
        f"({platform.machine()}, {os.cpu_count()} cores shared with other jobs; torch threads {opts.threads}; "
        f"load average {load[0]:.1f} when written: times are noisy, compare ratios).",
        f"Data: {meta['data']}; calibration {meta['calibration'][0]} x {meta['calibration'][1]} tokens, "
        f"evaluation {meta['evaluation'][0]} x {meta['evaluation'][1]} tokens, the same windows for every method. "
        "Perplexity by the project's protocol (compress.evaluate).",
        f"Quantizer: 4-bit asymmetric, group {opts.group}, lm_head float. Our AWQ: grid 20 with "
        f"coarse_step {opts.coarse_step} (every {opts.coarse_step}-th α, then refined around the best), duo scaling, "
        f"α search loss on {opts.search_tokens or 'all'} calibration tokens (statistics on all), "
        "clip search (q/k skipped) unless the job says otherwise. The peer: AWQModifier(duo_scaling=True, "
        "n_grid=20) (no clip search; v→o skipped on grouped heads), then QuantizationModifier; "
        "IntermediatesCache.pin_memory patched out (it needs an accelerator).",
        f"Versions: {bench_versions()}.",
        "Quantize wall and CPU (process) time cover the transform and quantization only (our layer-by-layer "
        "run, or the peer's oneshot); peak RSS is the process's (model loading included, the same for all).",
        "",
        table(results),
        "",
        *ratios(results),
        "",
    ]
    notes = [f"- {j}: {n}" for j, r in results.items() for n in r.get("notes", [])[:3]]
    if notes:
        body += ["Notes from our stages:", "", *notes, ""]
    text = "\n".join(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", type=int, default=16, help="calibration windows")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument("--coarse-step", type=int, default=1, help="our AWQ's coarse_step (1: the full grid)")
    p.add_argument("--search-tokens", type=int, default=4096, help="our AWQ's search_tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ", ".join(JOBS))
    p.add_argument("--output", default=str(ROOT / "eval/results/awq-vs-peers.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--windows", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.worker:
        result = worker(opts.worker, opts.windows, opts)
        Path(opts.json).write_text(json.dumps(result))
        return 0

    jobs = [j.strip() for j in opts.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        p.error(f"unknown jobs: {', '.join(unknown)}")
    args = argv if argv is not None else sys.argv[1:]
    command = f"{sys.executable} scripts/bench_awq.py " + " ".join(shlex.quote(a) for a in args)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    out = Path(opts.output)
    with tempfile.TemporaryDirectory(prefix="bench-awq-") as tmp:
        windows = Path(tmp) / "windows.safetensors"
        meta = make_windows(windows, opts.calibration, opts.eval_windows, opts.seq_len, opts.seed)
        print(f"data: {meta}", flush=True)
        for job in jobs:
            results[job] = run_job(job, windows, opts)
            r = results[job]
            status = r["error"].splitlines()[-1:] if "error" in r else round(r["eval"]["perplexity"], 4)
            print(f"{job}: {status} ({r['process_seconds']:.0f} s)", flush=True)
            write_report(out, command, meta, results, opts, time.perf_counter() - t0, done=False)
    print(write_report(out, command, meta, results, opts, time.perf_counter() - t0, done=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
