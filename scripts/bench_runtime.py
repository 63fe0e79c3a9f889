#!/usr/bin/env python
"""Decode speed side by side in one run: transformers ``generate`` against our runtime.

Same prompt, greedy, batch 1, ``--new-tokens`` new tokens each. Rows: transformers float32 and
bfloat16 (its own KV cache), our runtime in float, our runtime int4 (kernel back end, output
layer kept float), and int4 with the output layer quantized too (``head='int4'``). The int4
weights are round-to-nearest g128 symmetric, made in memory (or ``--checkpoint`` an exported
int4 folder). Rounds are interleaved so that load changes on a shared machine hit every row
alike; the median round is reported. Also prints the memory-bandwidth bound: weight bytes
read per token against a measured copy bandwidth.

    python scripts/bench_runtime.py --device cpu --new-tokens 128 --out eval/results/runtime-cpu.md
    python scripts/bench_runtime.py --device cuda --compile --out eval/results/runtime-h100.md

``--random-weights`` builds the model from config.json with random weights (same shapes,
same speed): for machines that have the embedded model's config and tokenizer but not its weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.quant.int4 import QuantArgs, quantize
from compress.runtime.generate import Runtime
from compress.runtime.loader import build_model, load_folder

PROMPT = "The history of the Roman Empire begins with the founding of the city of Rome, and"
# The embedded model's shapes (SmolLM2-135M), for --model smollm2-shapes on a machine without its files.
SMOLLM2_SHAPES = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes per second moved by a large copy (bytes read plus bytes written)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):  # on the clock of the speeds (CPU time: what one thread copies while it runs)
        t = CLOCK()
        dst.copy_(src)
        sync(device)
        times.append(CLOCK() - t)
    return 2 * src.numel() * 4 / min(times)


def hf_weight_bytes(model) -> int:
    """Bytes of every matrix a decode step reads (the embedding once if tied, as the output layer)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        read = "embed_tokens" not in name or model.config.tie_word_embeddings
        if p.dim() == 2 and p.data_ptr() not in seen and read:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


CLOCK = time.perf_counter


class HFRow:
    def __init__(self, name: str, model, ids: torch.Tensor):
        self.name, self.model, self.ids = name, model, ids
        self.weight_bytes = hf_weight_bytes(model)

    def run(self, new_tokens: int) -> float:
        device = self.ids.device
        mask = torch.ones_like(self.ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            sync(device)
            t = CLOCK()
            self.model.generate(self.ids, max_new_tokens=1, **kw)
            sync(device)
            t1 = CLOCK()
            self.model.generate(self.ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            sync(device)
            t2 = CLOCK()
        prefill = t1 - t
        return (new_tokens - 1) / max(t2 - t1 - prefill, 1e-9)


class OurRow:
    def __init__(self, name: str, runtime: Runtime, ids: list[int]):
        self.name, self.runtime, self.ids = name, runtime, ids
        self.weight_bytes = runtime.info.weight_bytes

    def run(self, new_tokens: int) -> float:
        # No EOS: every row decodes exactly new_tokens tokens.
        return self.runtime.generate_ids([self.ids], new_tokens).decode_tokens_per_s


def build_hf(folder: Path | None, random_weights: bool, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        config = AutoConfig.from_pretrained(folder) if folder else AutoConfig.for_model(**SMOLLM2_SHAPES)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.to(device, dtype).eval().requires_grad_(False)


def quantize_model(hf) -> dict:
    return {
        name: quantize(mod.weight.float().cpu(), QuantArgs(4, 128, True))
        for name, mod in hf.named_modules()
        if isinstance(mod, torch.nn.Linear) and name != "lm_head"
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="model folder, 'smollm2' (the embedded model) or 'smollm2-shapes' (random weights, no files)")
    p.add_argument("--checkpoint", help="an exported int4 folder for the int4 rows (default: RTN in memory)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (with --threads 1, robust on a machine shared with other jobs)")
    p.add_argument("--compile", action="store_true", help="also rows with the compiled decode step")
    p.add_argument("--random-weights", action="store_true", help="random weights with the model's shapes")
    p.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    p.add_argument("--out", help="write a Markdown table here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
        Runtime.clock = staticmethod(time.process_time)
    device = torch.device(args.device)
    from transformers import AutoTokenizer

    folder: Path | None = Path(args.model)
    if args.model == "smollm2":
        from compress.models import embedded_model_dir

        folder = embedded_model_dir()
    if args.model == "smollm2-shapes":
        folder, args.random_weights = None, True
        tokenizer, ids = None, list(range(1, 18))  # 17 ids, the length of PROMPT in its tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(PROMPT)["input_ids"]
    ids_t = torch.tensor([ids], device=device)
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # int4 on the kernels runs bfloat16 activations (the CPU kernel's fast path), as load() does.
    int4_dtype = torch.bfloat16

    hf32 = build_hf(folder, args.random_weights, torch.float32, torch.device("cpu"))
    records = quantize_model(hf32) if not args.checkpoint else None
    config = hf32.config.to_dict()
    state = {k: v.detach() for k, v in hf32.state_dict().items()}

    def ours(dtype, quantized, head="float", compile=False) -> Runtime:
        if args.checkpoint and quantized:
            model, info = load_folder(args.checkpoint, device=device, dtype=dtype, backend="kernel", head=head)
        else:
            model, info = build_model(config, state, records if quantized else None, device=device, dtype=dtype,
                                      backend="kernel", head=head)
        return Runtime(model, tokenizer, info, eos_ids=set(), compile_decode=compile)

    rows: list = []
    want = lambda name: name not in args.skip  # noqa: E731
    if want("transformers float32"):
        rows.append(HFRow("transformers float32", hf32.to(device), ids_t))
    if want("transformers bfloat16"):
        rows.append(HFRow("transformers bfloat16", build_hf(folder, args.random_weights, torch.bfloat16, device),
                          ids_t))
    fname = "float32" if float_dtype == torch.float32 else "bfloat16"
    if want(f"ours {fname}"):
        rows.append(OurRow(f"ours {fname}", ours(float_dtype, False), ids))
    if want("ours int4"):
        rows.append(OurRow("ours int4", ours(int4_dtype, True), ids))
    if want("ours int4 + int4 head"):
        rows.append(OurRow("ours int4 + int4 head", ours(int4_dtype, True, head="int4"), ids))
    if args.compile:
        rows.append(OurRow(f"ours {fname} compiled", ours(float_dtype, False, compile=True), ids))
        rows.append(OurRow("ours int4 compiled", ours(int4_dtype, True, compile=True), ids))
        rows.append(OurRow("ours int4 + int4 head compiled", ours(int4_dtype, True, head="int4", compile=True), ids))

    for row in rows:  # warm-up (and compilation, at the timed cache size) outside the timed rounds
        row.run(args.new_tokens if args.compile else 8)
    results: dict[str, list[float]] = {row.name: [] for row in rows}
    for r in range(args.rounds):
        for row in rows:
            results[row.name].append(row.run(args.new_tokens))
            print(f"round {r + 1}: {row.name}: {results[row.name][-1]:.1f} tok/s", flush=True)

    bandwidth = copy_bandwidth(device)
    base = statistics.median(results[rows[0].name])
    bf16_name = "transformers bfloat16"
    base_bf16 = statistics.median(results[bf16_name]) if bf16_name in results else None
    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores"
    lines = [
        f"# Runtime decode speed ({device.type})",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        "",
        f"Hardware: {hw}; torch {torch.__version__}. Model: {args.model}"
        f"{' (random weights, same shapes)' if args.random_weights else ''}; prompt of {len(ids)} tokens, "
        f"{args.new_tokens} new tokens, greedy, batch 1; {args.clock} clock; "
        f"median of {args.rounds} interleaved rounds "
        f"(every round: {', '.join(f'{x:.1f}' for x in results[rows[0].name])} tok/s for the first row).",
        f"Copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); bound = bandwidth / weight bytes per token.",
        "",
        "| row | decode tok/s | × transformers float32 |"
        + (" × transformers bfloat16 |" if base_bf16 else "")
        + " weight MB/token | bound tok/s | share of bound |",
        "| --- | ---: | ---: |" + (" ---: |" if base_bf16 else "") + " ---: | ---: | ---: |",
    ]
    for row in rows:
        med = statistics.median(results[row.name])
        bound = bandwidth / row.weight_bytes
        line = f"| {row.name} | {med:.1f} | {med / base:.2f} |"
        if base_bf16:
            line += f" {med / base_bf16:.2f} |"
        line += f" {row.weight_bytes / 1e6:.1f} | {bound:.0f} | {med / bound:.0%} |"
        lines.append(line)
    lines += ["", "Raw rounds (tok/s): " + json.dumps({k: [round(x, 1) for x in v] for k, v in results.items()})]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
