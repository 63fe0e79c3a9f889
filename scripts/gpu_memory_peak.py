"""What was on the GPU at the peak of a run: from a torch memory snapshot (bench_gptq.py
--gpu-memory-snapshots), the allocations live when allocated bytes were highest, grouped by
where they were made.

    python scripts/gpu_memory_peak.py /tmp/snaps/ours-sym-offload.memory.pickle --top 15

The snapshot is a pickle: read only snapshots you made yourself.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import defaultdict
from pathlib import Path

# Frames inside these are the allocator's and torch's own, not who asked for the memory.
_LIBRARY_PARTS = ("/torch/", "<frozen", "/contextlib.py", "/functools.py")


def live_at_peak(events: list[dict]) -> tuple[int, int, list[dict]]:
    """(peak allocated bytes, index of the event that reached it, the allocations live then).

    Replays a device trace: ``alloc`` adds a block, ``free_requested`` takes it away (the
    allocator's allocated-bytes count drops then, even when the block waits for its streams),
    ``free_completed`` too when no request was seen. Frees of blocks allocated before the trace
    began are ignored, so the figure is what the traced part of the run added."""
    live: dict[int, dict] = {}
    total = peak = 0
    peak_index = -1
    peak_live: dict[int, dict] = {}
    requested: set[int] = set()
    for index, event in enumerate(events):
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            live[addr] = event
            total += event["size"]
            if total > peak:
                peak, peak_index, peak_live = total, index, dict(live)
        elif action == "free_requested" or (action == "free_completed" and addr not in requested):
            block = live.pop(addr, None)
            if block is not None:
                total -= block["size"]
                if action == "free_requested":
                    requested.add(addr)
        elif action == "free_completed":
            requested.discard(addr)
    return peak, peak_index, list(peak_live.values())


def where(frames: list[dict]) -> str:
    """The innermost frame outside torch (who asked), with the innermost frame of the project's
    own code when that is further out."""
    python = [f for f in frames if f.get("filename", "").endswith(".py")]  # C++ frames, if recorded, are torch's
    outside = [f for f in python if not any(part in f["filename"] for part in _LIBRARY_PARTS)]
    if not outside:
        return "(torch internals)"
    first = outside[0]
    label = f"{Path(first['filename']).name}:{first['line']} {first['name']}"
    own = next((f for f in outside if "/compress/" in f.get("filename", "")), None)
    if own is not None and own is not first:
        label += f"  <- {Path(own['filename']).name}:{own['line']} {own['name']}"
    return label


def summarize(live: list[dict], top: int) -> list[tuple[str, int, int]]:
    """(where, bytes, blocks) for the ``top`` largest groups of ``live``."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for block in live:
        group = groups[where(block.get("frames", []))]
        group[0] += block["size"]
        group[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    return [(name, size, count) for name, (size, count) in ranked[:top]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", type=Path, help="a .pickle written by torch.cuda.memory._dump_snapshot")
    p.add_argument("--top", type=int, default=15, help="how many groups to list")
    p.add_argument("--device", type=int, default=0, help="which device's trace")
    opts = p.parse_args(argv)
    try:
        with open(opts.snapshot, "rb") as f:
            snapshot = pickle.load(f)
        events = snapshot["device_traces"][opts.device]
    except (OSError, pickle.UnpicklingError, KeyError, IndexError, EOFError) as e:
        print(f"error: cannot read a memory snapshot from {opts.snapshot}: {e}", file=sys.stderr)
        return 1
    peak, index, live = live_at_peak(events)
    print(f"{opts.snapshot.name}: {len(events)} events; peak {peak / 2**20:.1f} MiB allocated at event {index}, "
          f"{len(live)} blocks live")
    for name, size, count in summarize(live, opts.top):
        print(f"{size / 2**20:9.2f} MiB {count:5d} x  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
