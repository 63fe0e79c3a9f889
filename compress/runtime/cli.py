"""``compress generate``: stream generated text, then report prefill and decode speed."""

from __future__ import annotations

import argparse
import sys

from compress.runtime.errors import RuntimeInputError


def generate(args: argparse.Namespace) -> int:
    from compress.runtime.generate import load

    if args.temperature < 0:
        raise RuntimeInputError("--temperature must be >= 0 (0 means greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise RuntimeInputError("--top-p must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise RuntimeInputError("--top-k must be >= 1")
    if args.max_new_tokens < 1:
        raise RuntimeInputError("--max-new-tokens must be >= 1")
    backend = "cpu" if args.backend == "kernel" and args.device == "cpu" else args.backend
    try:
        llm = load(args.checkpoint, device=args.device, backend=backend, head=getattr(args, "head", "float"))
    except ValueError as e:  # a back end that cannot run on the device
        raise RuntimeInputError(str(e)) from e

    if args.draft:
        return _speculative(args, llm)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = llm.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        stream=emit,
    )
    sys.stdout.write("\n")
    backends = ", ".join(f"{n} {b}" for b, n in sorted(llm.info.backends.items())) or "float weights"
    print(
        f"[{llm.info.quant_format}: {backends} on {llm.device.type}] prefill {result.prompt_tokens} tokens "
        f"at {result.prefill_tokens_per_s:.1f} tok/s, decode {result.decode_steps} tokens at "
        f"{result.decode_tokens_per_s:.1f} tok/s (stopped: {result.stop_reasons[0]})",
        file=sys.stderr,
    )
    return 0


def _speculative(args: argparse.Namespace, llm) -> int:
    try:
        from compress.runtime import speculative
    except ImportError as e:
        raise RuntimeInputError("speculative decoding (--draft) is not available in this build") from e
    entry = getattr(speculative, "cli_generate", None)
    if entry is None:
        raise RuntimeInputError("speculative decoding (--draft) is not available in this build")
    return entry(args, llm)
