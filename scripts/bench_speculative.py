"""Speculative decoding side by side: plain, each draft kind, and transformers' assisted generation.

One run, same prompts, greedy: open-ended prompts and input-grounded ones (rewrite or summarize a
paragraph of the corpus's evaluation split). Rows:
  runtime plain                 the float target, one token per pass
  runtime + draft D             each --draft checkpoint, e.g. the int4 self-draft built by
                                recipes/smollm2-draft.yaml (optionally also with adaptive k)
  runtime + prompt lookup       n-gram draft, no model
  transformers plain / assisted (assistant_model: the same draft weights, dequantized) / prompt lookup
Every row is checked against plain greedy output (speculative decoding must not change it).

    python scripts/bench_speculative.py --draft outputs/smollm2-draft --draft-head float shortlist --k 3 4 \
        --siblings 0 2 --threads 1 --clock cpu --out eval/results/speculative-cpu.md

Defaults are those of `compress generate --draft`: shortlist head, k=3, 2 siblings, the target's KV.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.runtime.generate import Runtime, load
from compress.runtime.sampling import SamplingParams
from compress.runtime.speculative import ModelDraft, PromptLookupDraft, generate_runtime, kv_compatible

CLOCK = time.perf_counter

OPEN_ENDED = [  # varied kinds of open-ended text: story, explanation, list, letter, comparison, description
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a ten-year-old why the sky is blue.",
    "Give me five tips for staying focused while studying at home.",
    "Write a polite email to a neighbor asking them to keep their dog quiet at night.",
    "What are the main differences between a city bike and a mountain bike?",
    "Describe a perfect autumn day in a small mountain village.",
]
GROUNDED = [
    "Rewrite the following paragraph in plain English, keeping every fact:\n\n{p}",
    "Summarize the following paragraph in two or three sentences:\n\n{p}",
]


def corpus_paragraphs(n: int, words: int = 110) -> list[str]:
    """The first n evaluation documents of the embedded corpus, cut near ``words`` words on a sentence end."""
    from compress import data

    out = []
    for doc in data.load_corpus("wiki").evaluation:
        text = " ".join(doc.split())
        if len(text.split()) < words // 2:
            continue
        cut = " ".join(text.split()[:words])
        end = max(cut.rfind(". "), cut.rfind("."))
        out.append(cut[: end + 1] if end > len(cut) // 2 else cut)
        if len(out) == n:
            break
    return out


@dataclass
class Row:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    proposed: int = 0
    accepted: int = 0
    passes: int = 0
    exact: list[bool] = field(default_factory=list)

    def add(self, tokens, seconds, exact, decode_tokens=0, decode_seconds=0.0, proposed=0, accepted=0, passes=0):
        self.tokens += tokens
        self.seconds += seconds
        self.decode_tokens += decode_tokens
        self.decode_seconds += decode_seconds
        self.proposed += proposed
        self.accepted += accepted
        self.passes += passes
        self.exact.append(exact)


def hf_models(target_dir: Path, draft_dir: Path | None, device: torch.device, dtype: torch.dtype):
    """transformers target, and a transformers copy of the target carrying the draft's dequantized weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).to(device).eval()
    if draft_dir is None:
        return hf, None
    from compress import checkpoint

    quantized = checkpoint.read(draft_dir).quantized
    assistant = copy.deepcopy(hf)
    modules = dict(assistant.named_modules())
    with torch.no_grad():
        for name, qw in quantized.items():
            modules[name].weight.copy_(qw.dequantize().to(dtype))
    return hf, assistant


def hf_generate(hf, ids: list[int], new_tokens: int, eos: set[int], **kwargs) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=hf.device)
    sync(hf.device)
    t = CLOCK()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=next(iter(eos), 0), **kwargs)
    sync(hf.device)
    seconds = CLOCK() - t
    gen = out[0, len(ids):].tolist()
    return [t for t in gen if t not in eos], seconds


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2", help="target checkpoint (default: the embedded float model)")
    p.add_argument("--draft", nargs="*", default=["outputs/smollm2-draft"],
                   help="draft checkpoints (e.g. the int4 self-draft), one row each; none: prompt lookup only")
    p.add_argument("--draft-head", nargs="+", default=["shortlist"], choices=["float", "int4", "shortlist"],
                   help="the draft's output layer, one row each: as stored; int4 at load (faster, agrees less "
                   "often); shortlist: int4 ranking with the best 16 rescored on the stored weights")
    p.add_argument("--k", type=int, nargs="+", default=[3], help="draft tokens per pass for the model draft, "
                   "one row each")
    p.add_argument("--lookup-k", type=int, default=8, help="draft tokens per pass for prompt lookup")
    p.add_argument("--lookup-ngram", type=int, default=3, help="longest n-gram prompt lookup matches")
    p.add_argument("--adaptive", action="store_true", help="also run each model draft with adaptive k")
    p.add_argument("--draft-kv", choices=["target", "own", "both"], default="target",
                   help="a self-draft takes the target's keys and values (no draft prefill), computes its own, "
                   "or both rows")
    p.add_argument("--siblings", type=int, nargs="+", default=[2],
                   help="greedy verify passes also check the model draft's second choices at the first N positions; "
                   "one row per value")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=len(OPEN_ENDED),
                   help=f"prompts of each kind (open-ended: at most {len(OPEN_ENDED)}; input-grounded)")
    p.add_argument("--kinds", nargs="+", default=["open-ended", "input-grounded"],
                   choices=["open-ended", "input-grounded"], help="which kinds of prompt to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (with --threads 1, robust on a machine shared with other jobs)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
        Runtime.clock = staticmethod(time.process_time)
    device = torch.device(args.device)

    target = load(args.target, device=device)
    # Plain decoding on its own copy: speculation swaps the target's linears for packed ones.
    plain_target = load(args.target, device=device)
    target_dir = Path(target.info.source)
    drafts = {(d, h): load(d, device=device, head=h) for d in args.draft for h in args.draft_head}
    paragraphs = corpus_paragraphs(args.prompts)
    prompts = {
        "open-ended": OPEN_ENDED[: args.prompts],
        "input-grounded": [GROUNDED[i % len(GROUNDED)].format(p=para) for i, para in enumerate(paragraphs)],
    }
    encoded = {kind: [target.encode(t, chat=True) for t in texts] for kind, texts in prompts.items()
               if kind in args.kinds}
    eos = target.eos_ids
    greedy = SamplingParams()

    hf, assistants = None, {}
    if not args.no_transformers:
        hf, _ = hf_models(target_dir, None, device, target.model.dtype)
        assistants = {d: hf_models(target_dir, Path(d), device, target.model.dtype)[1] for d in args.draft}

    def run_plain(ids, n):
        r = plain_target.generate_ids([ids], n, greedy)
        return r.tokens[0], r.prefill_s + r.decode_s, r.decode_steps, r.decode_s, 0, 0, r.decode_steps

    def run_spec(draft, drt, k, adaptive=False, siblings=0):
        def fn(ids, n):
            toks, s = generate_runtime(target, draft, drt, ids, n, k, greedy, adaptive=adaptive, clock=CLOCK,
                                       siblings=siblings)
            return (toks, s.prefill_seconds + s.decode_seconds, s.new_tokens - 1, s.decode_seconds,
                    s.proposed, s.accepted, s.target_passes)
        return fn

    def run_hf(**kw):
        def fn(ids, n):
            toks, secs = hf_generate(hf, ids, n, eos, **kw)
            return toks, secs, 0, 0.0, 0, 0, 0
        return fn

    methods = {"runtime plain": run_plain}
    for (d, head), drt in drafts.items():
        label = f"`{Path(d).name}` ({drt.info.quant_format}, head {head})"
        shared = kv_compatible(target.model, drt.model)
        kv_modes = {"target": [shared], "own": [False], "both": [False, True] if shared else [False]}[args.draft_kv]
        for share in kv_modes:
            def make(share=share, drt=drt):
                return ModelDraft(drt.model, device, kv_source=target.model if share else None)
            tag = ", target's KV" if share else ""
            for k in args.k:
                for sib in args.siblings:
                    stag = f", {sib} siblings" if sib else ""
                    methods[f"runtime + draft {label}{tag}, k={k}{stag}"] = run_spec(make(), drt, k, siblings=sib)
                    if args.adaptive:
                        methods[f"runtime + draft {label}{tag}, adaptive k from {k}{stag}"] = run_spec(
                            make(), drt, k, adaptive=True, siblings=sib)
    lookup = PromptLookupDraft(max_ngram=args.lookup_ngram)
    methods[f"runtime + prompt lookup, k={args.lookup_k}"] = run_spec(lookup, None, args.lookup_k)
    if hf is not None:
        methods["transformers plain"] = run_hf()
        for d, assistant in assistants.items():
            methods[f"transformers assisted, draft `{Path(d).name}` dequantized"] = run_hf(assistant_model=assistant)
        methods[f"transformers prompt lookup, {args.lookup_k}"] = run_hf(prompt_lookup_num_tokens=args.lookup_k)

    # Warm-up: allocations, kernel choice, first-call overheads; not timed.
    for fn in methods.values():
        fn(next(iter(encoded.values()))[0], 4)

    rows = {kind: {name: Row(name) for name in methods} for kind in encoded}
    for kind, prompt_ids in encoded.items():
        for ids in prompt_ids:
            reference = None
            for name, fn in methods.items():  # interleaved: every method on a prompt before the next prompt
                toks, secs, dtok, dsec, prop, acc, passes = fn(ids, args.new_tokens)
                reference = toks if reference is None else reference
                rows[kind][name].add(len(toks), secs, toks == reference, dtok, dsec, prop, acc, passes)
                print(f"{kind:15s} {name:45s} {len(toks):4d} tok {secs:7.2f} s exact={toks == reference}",
                      file=sys.stderr)

    lines = [
        "# Speculative decoding: side by side",
        "",
        f"Target `{args.target}` (float, {target.model.dtype}), drafts {', '.join(f'`{d}`' for d in args.draft)} "
        f"(output layer: {', '.join(args.draft_head)}); prompt lookup up to {args.lookup_ngram}-grams; "
        f"device {device}, "
        f"{args.clock} clock, torch threads {torch.get_num_threads()}; greedy, {args.new_tokens} new tokens, "
        f"{args.prompts} prompts per kind (chat template). Speedup: end-to-end tokens/s (prefill included) over "
        "the same framework's plain decoding; decode speedup: decode tokens/s (after the first token, "
        "the target's prefill excluded) over plain decoding's. 'exact': output identical to plain greedy on "
        "every prompt.",
        "",
        "Command: `" + " ".join(shlex.quote(a) for a in ["python", *sys.argv]) + "`",
        "",
    ]
    for kind, by_name in rows.items():
        lines += [f"## {kind}", "", "| method | tokens | tok/s | decode tok/s | speedup | decode speedup | "
                  "acceptance | tokens / target pass | exact |", "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        base = {"runtime": by_name["runtime plain"]}
        if "transformers plain" in by_name:
            base["transformers"] = by_name["transformers plain"]
        for name, r in by_name.items():
            tps = r.tokens / r.seconds if r.seconds else 0.0
            b = base[name.split()[0]]
            speed = tps / (b.tokens / b.seconds) if b.seconds and b.tokens else 0.0
            dec = f"{r.decode_tokens / r.decode_seconds:.1f}" if r.decode_seconds else "-"
            dec_speed = "-"
            if r.decode_seconds and b.decode_seconds and b.decode_tokens:
                dec_speed = f"{(r.decode_tokens / r.decode_seconds) / (b.decode_tokens / b.decode_seconds):.2f}x"
            acc = f"{r.accepted / r.proposed:.0%}" if r.proposed else "-"
            per = f"{r.decode_tokens / r.passes:.2f}" if r.passes else "-"
            lines.append(f"| {name} | {r.tokens} | {tps:.1f} | {dec} | {speed:.2f}x | {dec_speed} | {acc} | {per} | "
                         f"{'yes' if all(r.exact) else 'NO'} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
