"""The GPTQ calibration's matrix products, float32 against bfloat16, side by side on one thread.

Why `compute_dtype: bfloat16` pays where it does: the embedded model's forward products (a
window of 512 tokens through its linears) and the Hessian's banded Σ x xᵀ, timed in float32 and
in bfloat16 in one run. Prints GFLOP/s and the ratios; with ``--output`` writes them, with the
command, to a Markdown file. Timings only, nothing asserted.

    .venv/bin/python scripts/bench_calibration_products.py --output eval/results/calibration-products.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.quant.gptq import HessianAccumulator  # noqa: E402

# (tokens, in, out) of the embedded model's linears for one 512-token window: q/k/v stacked, o, gate/up, down.
SHAPES = [(512, 576, 960), (512, 576, 576), (512, 576, 3072), (512, 1536, 576)]


def seconds_per_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case (default 20)")
    parser.add_argument("--output", help="also write the table, with the command, to this Markdown file")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = ["| product | float32 GFLOP/s | bfloat16 GFLOP/s | bfloat16 / float32 |", "| --- | ---: | ---: | ---: |"]
    for tokens, fan_in, fan_out in SHAPES:
        x, w = torch.randn(tokens, fan_in), torch.randn(fan_out, fan_in)
        flops = 2 * tokens * fan_in * fan_out
        rates = [flops / seconds_per_call(lambda a=a, b=b: a @ b.T, opts.repeats) / 1e9
                 for a, b in ((x, w), (x.bfloat16(), w.bfloat16()))]
        rows.append(f"| forward {tokens} x {fan_in} → {fan_out} | {rates[0]:.0f} | {rates[1]:.0f} | "
                    f"{rates[1] / rates[0]:.2f} |")
    rows += ["", "| Hessian Σ x xᵀ of one window (float32) | full product ms | bands of 256 ms | bands of 128 ms |",
             "| --- | ---: | ---: | ---: |"]
    for features in (576, 1536):
        x = torch.randn(512, features)
        full = torch.zeros(features, features)
        times = [seconds_per_call(lambda full=full, x=x: full.addmm_(x.T, x), opts.repeats)]
        for band in (256, 128):
            acc = HessianAccumulator(features, torch.device("cpu"))
            acc.band = band
            times.append(seconds_per_call(lambda acc=acc, x=x: acc.add(x), opts.repeats))
        rows.append(f"| {features} features | " + " | ".join(f"{t * 1e3:.2f}" for t in times) + " |")
    table = "\n".join(rows)
    print(table)
    if opts.output:
        command = shlex.join([".venv/bin/python", "scripts/bench_calibration_products.py", *sys.argv[1:]])
        text = (f"# Calibration products: float32 against bfloat16 (one thread)\n\nCommand:\n\n    {command}\n\n"
                f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}; torch {torch.__version__}; "
                f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}.\n\n{table}\n")
        out = Path(opts.output)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)


if __name__ == "__main__":
    main()
