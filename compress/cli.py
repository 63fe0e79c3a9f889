"""The ``compress`` command. Orchestration only: every user error is one line, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: reported in one line."""
    from compress.arch import UnsupportedArchitecture
    from compress.assets import AssetError
    from compress.checkpoint import CheckpointError
    from compress.data import DataError
    from compress.lm_eval_adapter import LMEvalError
    from compress.models import ModelLoadError
    from compress.pipeline import OutputError
    from compress.quant.gptq import GPTQError
    from compress.recipe import RecipeError
    from compress.resume import ResumeError
    from compress.runtime.errors import RuntimeInputError

    errors: list[type[BaseException]] = [
        RecipeError, ModelLoadError, DataError, UnsupportedArchitecture, OutputError, ResumeError, AssetError,
        CheckpointError, LMEvalError, RuntimeInputError, GPTQError,
        FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
    ]
    return tuple(errors)


def cmd_run(args: argparse.Namespace) -> int:
    from compress import pipeline, recipe

    r = recipe.load(args.recipe)
    if args.device:
        r = recipe.parse({**r.model_dump(mode="json"), "device": args.device}, "--device")
    result = pipeline.run(
        r, args.output, overwrite=args.overwrite, progress=not args.quiet, resume=args.resume,
        protect=[Path(args.recipe)],
    )
    out = Path(args.output) if args.output else r.output_dir()
    ev = result.get("evaluation") or {}
    parts = [f"done: {out}/report.md"]
    if ev.get("before"):
        parts.append(f"perplexity before {ev['before']['perplexity']:.3f}")
    if ev.get("after"):
        parts.append(f"after {ev['after']['perplexity']:.3f}")
    print(", ".join(parts))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from compress import data, evaluate, models, pipeline

    device = pipeline.resolve_device(args.device)
    if args.tasks:
        from compress import lm_eval_adapter

        lm_eval_adapter.check_offline(args.tasks)  # before the slow model load
    loaded = models.load(args.model, args.dtype, device, args.trust_remote_code)
    result: dict = {"model": args.model}
    if not args.tasks or args.perplexity:
        corpus = data.load_corpus(args.data, args.eval_fraction, args.text_field)
        windows = data.evaluation_windows(loaded.tokenizer, corpus.evaluation, args.seq_len, args.max_windows)
        ppl = evaluate.perplexity(loaded.model, windows, args.batch_size, device, not args.quiet)
        result["perplexity"] = {**ppl, **corpus.describe(), "bos": data.bos_id(loaded.tokenizer) is not None}
    if args.tasks:
        result["lm_eval"] = lm_eval_adapter.run_tasks(
            loaded,
            args.tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            device=device,
            num_fewshot=args.num_fewshot,
            data=args.data,
            eval_fraction=args.eval_fraction,
            text_field=args.text_field,
            seed=args.seed,
        )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        if "perplexity" in result:
            p = result["perplexity"]
            print(
                f"perplexity {p['perplexity']:.4f} on {p['windows']} windows × {p['seq_len']} tokens "
                f"({p['tokens_scored']} scored) of the evaluation split of {p['source']}"
            )
        for task, metrics in (result.get("lm_eval") or {}).items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr")))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from compress import compare

    protocol = compare.Protocol(
        model=args.model,
        device=args.device,
        eval_seq_len=args.seq_len,
        eval_max_windows=args.max_windows,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        tasks=compare_tasks(args.tasks),
        limit=args.limit,
        batch_size=args.batch_size,
    )
    command = "compress " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    doc = compare.compare(
        args.recipes, args.out, protocol, command=command, progress=not args.quiet, log=log, fresh=args.fresh
    )
    out = doc["output"]
    print(f"done: {out}.md, {out}.json, {out}.png ({len(doc['rows'])} rows)")
    return 0


def compare_tasks(tasks: list[str] | None) -> list[str]:
    from compress.lm_eval_adapter import split_task_names

    return split_task_names(tasks or [])


def cmd_inspect(args: argparse.Namespace) -> int:
    from compress import export

    return export.inspect_cli(args.checkpoint, verify=not args.no_verify)


def cmd_generate(args: argparse.Namespace) -> int:
    from compress.runtime import cli as runtime_cli

    return runtime_cli.generate(args)


def cmd_fetch(args: argparse.Namespace) -> int:
    from compress import assets, models

    print(f"model: {models.embedded_model_dir()}")
    print(f"corpus: {assets.embedded_corpus()}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse's default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="compress",
        description="Offline compression of causal LMs (RTN, GPTQ, AWQ, MHA→GQA) with evaluation, "
        "export to GPTQ / compressed-tensors safetensors, and a small int4 runtime.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks on errors)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: calibrate, compress, evaluate, export, report")
    run.add_argument("recipe", help="recipe YAML file (see recipes/)")
    run.add_argument("--output", "-o", help="output folder (default: the recipe's export.output)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted run from its last completed layer (same recipe, same result)",
    )
    run.add_argument("--device", help="override the recipe's device (auto, cpu, cuda)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model or exported checkpoint")
    ev.add_argument("model", help="model folder, .gguf, .safetensors, hub id, checkpoint, or 'smollm2'")
    ev.add_argument("--data", default="wiki", help="text source (default: the embedded corpus 'wiki')")
    ev.add_argument("--text-field", default="text", help="field holding the text in json/jsonl/parquet")
    ev.add_argument("--eval-fraction", type=fraction, default=0.1, help="share of documents held out (default 0.1)")
    ev.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--max-windows", type=positive_int, default=None, help="evaluate on the first N windows only")
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks (local ones in eval/tasks)")
    ev.add_argument("--perplexity", action="store_true", help="also perplexity when --tasks is given")
    ev.add_argument("--limit", type=positive_int, default=None, help="lm-eval: examples per task")
    ev.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (task default)")
    ev.add_argument("--seed", type=int, default=0, help="lm-eval: seed of sampling and of the local tasks")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--device", default="auto")
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--quiet", "-q", action="store_true")
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser(
        "compare", help="run several recipes under one protocol: results table (.md, .json) and plot (.png)"
    )
    cmp.add_argument("recipes", nargs="+", help="recipe YAML files; a float baseline row is added")
    cmp.add_argument("--out", "-o", help="output path without suffix (default eval/results/<model>)")
    cmp.add_argument("--model", help="model for every row (default: the first recipe's)")
    cmp.add_argument("--seq-len", type=int, help="perplexity window length for every row")
    cmp.add_argument("--max-windows", type=int, help="perplexity windows for every row")
    cmp.add_argument("--calib-samples", type=int, help="calibration windows for every row")
    cmp.add_argument("--calib-seq-len", type=int, help="calibration window length for every row")
    cmp.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks for every row (local: compress_local)")
    cmp.add_argument("--limit", type=int, help="lm-eval: examples per task")
    cmp.add_argument("--batch-size", type=int, help="windows per forward pass")
    cmp.add_argument("--device", help="override the recipes' device (auto, cpu, cuda)")
    cmp.add_argument("--fresh", action="store_true", help="redo rows an interrupted run already finished")
    cmp.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    cmp.set_defaults(func=cmd_compare)

    ins = sub.add_parser("inspect", help="describe an exported checkpoint and verify its checksums")
    ins.add_argument("checkpoint")
    ins.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    ins.set_defaults(func=cmd_inspect)

    gen = sub.add_parser("generate", help="generate text with the bundled runtime")
    gen.add_argument("checkpoint", help="exported checkpoint folder (int4 or float)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=True,
        help="apply the chat template if the tokenizer has one",
    )
    gen.add_argument("--draft", help="speculative decoding: a draft checkpoint or 'prompt-lookup'")
    gen.add_argument("--speculate-k", type=int, default=4, help="draft tokens per target pass")
    gen.add_argument(
        "--speculate-adaptive", action="store_true",
        help="adapt the draft length between 1 and 2x --speculate-k: longer after a fully accepted draft, "
        "shorter after a rejection",
    )
    gen.add_argument(
        "--draft-kv", default="target", choices=["target", "own"],
        help="a draft of the target's shape (built from it) takes the target's keys and values (no draft prefill, "
        "agrees more often), or computes its own",
    )
    gen.add_argument(
        "--draft-head", default="float", choices=["float", "int4", "shortlist"],
        help="the draft's output layer: as stored; int4 at load (faster draft, agrees less often); shortlist: "
        "int4 ranking with the best 16 tokens rescored on the stored weights (nearly int4 speed, the stored head's "
        "choices); the output is exact with each",
    )
    gen.add_argument("--device", default="auto")
    gen.add_argument("--backend", default="auto", help="int4 back end: auto, kernel or reference")
    gen.add_argument(
        "--head", default="float", choices=["float", "int4"],
        help="output layer: as stored, or quantized to int4 at load (faster decode on CPU, not exact)",
    )
    gen.set_defaults(func=cmd_generate)

    fetch = sub.add_parser("fetch", help="download the embedded model and corpus into the cache")
    fetch.set_defaults(func=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
    if getattr(args, "quiet", False):
        # transformers draws its own bars (loading weights) outside our progress flag.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        # pipeline.run raises JobInterrupted (a KeyboardInterrupt) naming what it kept.
        print(f"compress: interrupted; {str(e) or 'no output was left behind'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as e:
        if args.verbose:
            raise
        # One line whatever the message holds (file names and keys come from the user).
        print(f"compress: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
