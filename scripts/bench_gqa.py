"""MHA→GQA on the embedded model: perplexity of each pooling × grouping, with and without int4 after.

Side by side in one run (same windows, same model): float baseline, RTN int4 alone, then the gqa
stage for each pooling and grouping, alone and followed by RTN int4 (g128, symmetric) in the same
layer-by-layer pass, as a recipe ``[gqa, rtn]`` would do. Writes a Markdown table.

    python scripts/bench_gqa.py --kv-heads 1 --calib 16 --eval 32 --int4 rtn,gptq --out eval/results/gqa-smollm2.md
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import data, evaluate, models
from compress.arch import head_counts, kv_cache_bytes_per_token
from compress.calibrate import run_layerwise
from compress.gqa import GQAStage
from compress.gqa_math import POOLINGS
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage

INT4 = QuantArgs(4, 128, True)


VO_FLOAT = ":vo-float"  # suffix of an --int4 method: keep v_proj and o_proj in float


def int4_stage(kind: str):
    """The int4 stage run after gqa in the same layer pass (every linear but lm_head, unless ``:vo-float``)."""
    method, _, _ = kind.partition(":")
    ignore = ["lm_head"] + (["self_attn.v_proj", "self_attn.o_proj"] if kind.endswith(VO_FLOAT) else [])
    if method == "rtn":
        return RTNStage(INT4, ignore)
    from compress.quant.gptq import GPTQStage

    return GPTQStage(INT4, ignore)


def int4_label(kind: str | None) -> str:
    if kind is None:
        return "no"
    return kind.replace(VO_FLOAT, ", v/o_proj float")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--calib", type=int, default=16, help="calibration windows")
    p.add_argument("--eval", type=int, default=32, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--poolings", default=",".join(POOLINGS))
    p.add_argument("--groupings", default="contiguous,similarity")
    p.add_argument("--no-int4", action="store_true")
    p.add_argument("--int4", default="rtn",
                   help=f"int4 methods after gqa, comma-separated: rtn, gptq, each optionally with {VO_FLOAT}")
    p.add_argument("--value-ridge", default="0",
                   help="fit kinds: Tikhonov penalty of the value fit, comma-separated values (one row each)")
    p.add_argument("--balance", default="on", choices=["on", "off", "both"],
                   help="fit kinds: exact v/o basis balancing before int4 (both: a row with and one without)")
    p.add_argument("--skip-float", action="store_true", help="no gqa-free rows (float given by --baseline)")
    p.add_argument("--only-int4", action="store_true", help="no float row for each conversion, only its int4 rows")
    p.add_argument("--baseline", type=float, default=None,
                   help="float perplexity already measured on the same windows: skip the float row")
    p.add_argument("--refit", default="on", choices=["on", "off", "both"],
                   help="fit kinds: o_proj refit on activations (both: a row with and one without)")
    p.add_argument("--context", type=int, default=2048, help="context length for the KV-cache size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (oversubscribed cores crawl)")
    p.add_argument("--out", default="eval/results/gqa-smollm2.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    loaded = models.load(args.model)
    model, tok, arch = loaded.model, loaded.tokenizer, loaded.arch
    corpus = data.load_corpus("wiki")
    eval_w = data.evaluation_windows(tok, corpus.evaluation, args.seq_len, args.eval)
    calib_w = data.calibration_windows(tok, corpus.calibration, args.calib, args.seq_len, 0)
    heads, kv_before, _ = head_counts(model.config)
    kv_tok_before = kv_cache_bytes_per_token(model.config)

    def ppl(m) -> float:
        m.to(args.device)
        out = evaluate.perplexity(m, eval_w, 8, args.device, progress=False)["perplexity"]
        m.to("cpu")
        return out

    rows: list[tuple[str, str, str, float, float]] = []  # pooling, grouping, int4, ppl, seconds
    state = {"kv_after": None}

    def write() -> None:
        """Rewrite the table after every row: a run cut short still leaves its figures."""
        write_markdown(args, rows, eval_w, calib_w, kv_before, heads, kv_tok_before, state["kv_after"])

    t = time.perf_counter()
    base = args.baseline if args.baseline is not None else ppl(model)
    rows.append(("(none)", "–", "no", base, 0.0 if args.baseline is not None else time.perf_counter() - t))
    print(f"float: {base:.3f}", flush=True)
    write()
    int4 = [None] if args.no_int4 else [None, *args.int4.split(",")]
    conversions_int4 = int4[1:] if args.only_int4 and not args.no_int4 else int4
    for kind in int4[1:] if not args.skip_float else []:
        t = time.perf_counter()
        m = copy.deepcopy(model)
        run_layerwise(m, arch, calib_w if kind.startswith("gptq") else calib_w[:1], [int4_stage(kind)], args.device,
                      progress=False)
        rows.append(("(none)", "–", int4_label(kind), ppl(m), time.perf_counter() - t))
        print(f"{kind}: {rows[-1][3]:.3f}", flush=True)
        write()
    ridges = [float(r) for r in args.value_ridge.split(",")]
    balances = {"on": [True], "off": [False], "both": [True, False]}[args.balance]
    for pooling in args.poolings.split(","):
        for grouping in args.groupings.split(","):
            if grouping == "similarity" and args.kv_heads in (1, heads):
                # One group (or one head per group): there is nothing to regroup; identical by construction.
                continue
            fit = pooling != "mean"
            refits = [False] if not fit else {"on": [True], "off": [False], "both": [False, True]}[args.refit]
            for refit, ridge, balance, q in itertools.product(refits, ridges if fit else ridges[:1],
                                                               balances if fit else [True], conversions_int4):
                if q and len(refits) > 1 and not refit:
                    continue  # int4 rows only for the default (refit) variant
                t = time.perf_counter()
                m = copy.deepcopy(model)
                stages = [GQAStage(args.kv_heads, pooling, grouping, refit, balance, ridge)]
                stages[0].prepare(m, arch)
                if q:
                    stages.append(int4_stage(q))
                calibrated = stages[0].needs_calibration or (q or "").startswith("gptq")
                windows = calib_w if calibrated else calib_w[:1]
                final = run_layerwise(m, arch, windows, stages, args.device, progress=False)
                stages[0].finish(m, arch, final)
                state["kv_after"] = kv_cache_bytes_per_token(m.config)
                value = ppl(m)
                label = pooling + (" + o refit" if refit else "")
                if fit and len(ridges) > 1:
                    label += f", ridge {ridge:g}"
                if fit and not balance:
                    label += ", not balanced"
                rows.append((label, grouping, int4_label(q), value, time.perf_counter() - t))
                print(f"{label} {grouping} int4={q}: {value:.3f}", flush=True)
                write()
    print(Path(args.out).read_text())


def write_markdown(args, rows, eval_w, calib_w, kv_before, heads, kv_tok_before, kv_tok_after) -> None:
    base = rows[0][3]
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"# MHA→GQA on {args.model}: {kv_before} → {args.kv_heads} KV heads",
        "",
        f"Command: `{cmd}` (device {args.device}).",
        "",
        f"Perplexity on {eval_w.shape[0]} evaluation windows × {args.seq_len} tokens of the embedded Wikipedia "
        f"corpus's evaluation split; {calib_w.shape[0]} calibration windows × {args.seq_len} from the calibration "
        "split (fit kinds and GPTQ only). int4 = RTN or GPTQ, 4 bits, group 128, symmetric, every linear but "
        "lm_head (v_proj and o_proj included unless the row says `v/o_proj float`), applied after gqa in the "
        "same layer-by-layer pass. `+ o refit`: o_proj refit by least squares on the layer's activations after "
        "pooling (the stage's default for fit kinds, `refit_output`). Fit kinds use the stage defaults unless "
        "the row says otherwise: value ridge "
        f"{args.value_ridge.split(',')[0]} (`value_ridge`) and the balanced value basis (`balance_values`).",
        "",
        "| pooling | grouping | int4 after | perplexity | vs float | seconds |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {p_} | {g} | {q} | {v:.3f} | {v / base - 1:+.1%} | {s:.0f} |" for p_, g, q, v, s in rows]
    if args.kv_heads in (1, heads):
        lines += ["", "With one KV head (or one query head per KV head) there is a single grouping: `similarity` "
                  "is the same conversion as `contiguous`, so it is not repeated."]
    if kv_tok_after:
        lines += [
            "",
            "| KV cache (fp16) | before | after | saving |",
            "|---|---:|---:|---:|",
            f"| per token | {kv_tok_before} B | {kv_tok_after} B | {1 - kv_tok_after / kv_tok_before:.1%} |",
            f"| {args.context} tokens, one sequence | {kv_tok_before * args.context / 2**20:.1f} MiB | "
            f"{kv_tok_after * args.context / 2**20:.1f} MiB | ×{kv_tok_before / kv_tok_after:.2f} tokens |",
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
