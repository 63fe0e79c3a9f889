"""The benchmark helpers in scripts/ that carry logic of their own."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


def test_live_at_peak_replays_allocations_and_frees():
    peak_tool = _script("gpu_memory_peak")
    ours = [_frame("/x/torch/nn/functional.py", 1, "linear"), _frame("/r/compress/quant/gptq.py", 900, "walk")]
    theirs = [_frame("??", 0, "c10::cuda::CUDACachingAllocator::malloc"), _frame("/x/torch/cuda/memory.py", 5, "x"),
              _frame("/site/transformers/llama.py", 7, "forward"),
              _frame("/r/compress/quant/gptq.py", 1200, "apply")]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 50, "frames": theirs},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},  # already counted at the request
        {"action": "alloc", "addr": 3, "size": 120, "frames": ours},
        {"action": "alloc", "addr": 4, "size": 10, "frames": ours},  # the peak: 50 + 120 + 10
        {"action": "free_completed", "addr": 3, "size": 120},  # no request seen: counts here
        {"action": "free_requested", "addr": 99, "size": 1000},  # allocated before the trace: ignored
        {"action": "alloc", "addr": 5, "size": 60, "frames": ours},
    ]
    peak, index, live = peak_tool.live_at_peak(events)
    assert (peak, index) == (180, 5) and sorted(b["addr"] for b in live) == [2, 3, 4]
    summary = peak_tool.summarize(live, top=5)
    assert summary[0] == ("gptq.py:900 walk", 130, 2)
    assert summary[1] == ("llama.py:7 forward  <- gptq.py:1200 apply", 50, 1)


def test_unreadable_snapshot_is_one_error_line(tmp_path, capsys):
    peak_tool = _script("gpu_memory_peak")
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"not a pickle")
    assert peak_tool.main([str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read a memory snapshot")
    wrong = tmp_path / "wrong.pickle"
    wrong.write_bytes(pickle.dumps({"segments": []}))
    assert peak_tool.main([str(wrong)]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_live_at_peak_agrees_with_the_allocator(tmp_path):
    peak_tool = _script("gpu_memory_peak")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=10_000)
    a = torch.empty(3 << 20, device="cuda")
    b = torch.empty(1 << 20, device="cuda")
    del a
    c = torch.empty(2 << 20, device="cuda")
    path = tmp_path / "s.pickle"
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)
    expected = torch.cuda.max_memory_allocated() - base
    del b, c
    with open(path, "rb") as f:
        peak, _, _ = peak_tool.live_at_peak(pickle.load(f)["device_traces"][0])
    assert peak == expected
