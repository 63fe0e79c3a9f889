"""The job report: report.json (everything) and report.md (for people)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _ppl(entry: dict | None) -> str:
    return f"{entry['perplexity']:.3f}" if entry else "–"


KV_CONTEXT = 2048  # context length the report sizes the KV cache for


def _kv_context_lines(s: dict) -> list[str]:
    """KV cache of one sequence of KV_CONTEXT tokens, and the saving, when it changed."""
    before, after = s.get("kv_bytes_per_token_before"), s.get("kv_bytes_per_token_after")
    if not before or not after:
        return []
    lines = [
        f"| KV cache at {KV_CONTEXT} tokens (fp16), before | {_fmt_bytes(before * KV_CONTEXT)} |",
        f"| KV cache at {KV_CONTEXT} tokens (fp16), after | {_fmt_bytes(after * KV_CONTEXT)} |",
    ]
    if after != before:
        lines.append(f"| KV cache saving | {1 - after / before:.1%} (×{before / after:.2f} more tokens) |")
    return lines


def lm_eval_lines(scores: dict | None) -> list[str]:
    """A table of lm-eval scores (task, metric, value), or nothing."""
    if not scores:
        return []
    lines = ["## lm-eval", "", "| task | metric | value |", "|---|---|---:|"]
    for task, metrics in scores.items():
        lines += [f"| {task} | {k} | {v:.4f} |" for k, v in metrics.items() if not k.endswith("_stderr")]
    return [*lines, ""]


def to_markdown(r: dict) -> str:
    lines = [f"# compress report: {r['recipe']['name']}", ""]
    m = r["model"]
    lines += [
        f"- **Model**: `{m['source']}` ({m['architecture']}, {m['parameters'] / 1e6:.1f} M parameters, "
        f"{m['layers']} layers, {m['heads']} query heads, {m['kv_heads']} KV heads)",
        f"- **Stages**: {', '.join(s['summary'] for s in r['stages']) or 'none'}",
        f"- **Device**: {r['device']}; dtype {r['recipe']['dtype']}",
        "",
        "## Perplexity",
        "",
    ]
    ev = r.get("evaluation") or {}
    if ev:
        before, after = ev.get("before"), ev.get("after")
        lines += [
            "| | perplexity | windows × seq_len | tokens scored |",
            "|---|---:|---|---:|",
        ]
        for label, e in (("before", before), ("after", after)):
            if e:
                lines.append(f"| {label} | {_ppl(e)} | {e['windows']} × {e['seq_len']} | {e['tokens_scored']} |")
        if before and after:
            lines += ["", f"Change: {after['perplexity'] / before['perplexity'] - 1:+.2%}."]
        bos_note = "each window starts with BOS" if ev.get("bos") else "the tokenizer adds no BOS, none inserted"
        lines += [
            "",
            f"Evaluation split of `{ev['data']['source']}` ({ev['data']['evaluation_documents']} documents, never "
            f"used for calibration); documents joined with blank lines, tokenized once, non-overlapping windows, "
            f"tail dropped; {bos_note}.",
            "",
        ]
    else:
        lines += ["Not evaluated.", ""]
    lines += lm_eval_lines(ev.get("lm_eval"))
    s = r["size"]
    lines += [
        "## Size",
        "",
        "| | bytes |",
        "|---|---:|",
        f"| weights at 16 bits | {_fmt_bytes(s['weights_16bit'])} |",
        f"| weights after compression | {_fmt_bytes(s['weights_after'])} |",
        f"| KV cache per token (fp16), before | {_fmt_bytes(s['kv_bytes_per_token_before'])} |",
        f"| KV cache per token (fp16), after | {_fmt_bytes(s['kv_bytes_per_token_after'])} |",
        *_kv_context_lines(s),
        "",
        f"Quantized linears: {s['quantized_linears']}.",
        "",
        "## Time and memory",
        "",
        "| step | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["timing"].items()]
    lines += ["", f"Peak memory: {_fmt_bytes(r['peak_memory']['host_rss'])} host RSS"]
    if r["peak_memory"].get("device_allocated"):
        lines[-1] += f", {_fmt_bytes(r['peak_memory']['device_allocated'])} on the device"
    lines += [""]
    if r.get("export"):
        e = r["export"]
        lines += ["## Export", "", f"Format `{e['format']}` in `{e['path']}` ({_fmt_bytes(e.get('bytes'))}).", ""]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += ["## Recipe", "", "```yaml", r["recipe_yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


def write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(to_markdown(result))
