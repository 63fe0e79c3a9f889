"""Per-layer progress of a compression job, so that an interrupted job can resume.

After each completed decoder layer the pipeline writes, into ``<staging>/progress``:

* ``layer_NNNN.safetensors``: that layer's tensors after every stage, the quantized
  records (codes, scales, zeros, g_idx) stages made for it, and the RNG state;
* ``inputs_NNNN.safetensors``: the next layer's input hidden states;
* ``stageJ_NNNN.pt``: the cross-layer state of stages that define ``resume_state()``
  (plain dicts of tensors, numbers and strings, read back with ``weights_only=True``);
* ``state.json`` last, atomically: the recipe fingerprint and how many layers are done.

Every file is written to a temporary name and renamed, and ``state.json`` only names
files that are complete, so a job killed at any instant (SIGKILL included) resumes from
its last completed layer. Other keyword arguments of the layers (masks, rotary
embeddings) are recomputed from the calibration windows, which are deterministic.

Resuming restores the tensors bit for bit, so the result equals an uninterrupted run.
A stage that keeps state across layers other than quantized records and notes must
define ``resume_state() -> dict`` and ``load_resume_state(state: dict)``. A stage that
changes the shapes of a layer's tensors (MHA→GQA) must also define
``restore_layer(model, layer, index)``, which puts back what tensors do not carry (module
attributes such as head counts, the config); without it such progress is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.calibrate import LayerInputs
from compress.quant.int4 import QuantizedWeight

FORMAT = 1


class ResumeError(ValueError):
    """Progress that cannot be resumed; the message says why and what to do."""


def fingerprint(recipe_yaml: str, num_layers: int) -> str:
    """What must not change between the interrupted run and the resumed one."""
    h = hashlib.sha256()
    h.update(f"format {FORMAT}\nlayers {num_layers}\ntorch {torch.__version__}\n".encode())
    h.update(recipe_yaml.encode())
    return h.hexdigest()


def _atomic_save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _quant_records(stage) -> dict[str, QuantizedWeight] | None:
    records = getattr(stage, "quantized", None)
    return records if isinstance(records, dict) else None


@dataclass
class ResumePoint:
    """What a resumed run starts from."""

    done_layers: int
    inputs_hidden: list[Tensor] | None
    evaluation_before: dict | None
    timing: dict[str, float] = field(default_factory=dict)


class Progress:
    """The ``progress`` folder of one staging folder."""

    def __init__(self, staging: Path, fingerprint: str):
        self.dir = staging / "progress"
        self.fingerprint = fingerprint
        self.state: dict = {}

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.state = {"format": FORMAT, "fingerprint": self.fingerprint, "done_layers": 0, "stages": {}}
        self._write_state()

    def _write_state(self) -> None:
        _atomic_write_text(json.dumps(self.state, indent=1), self.state_path)

    def note_evaluation_before(self, result: dict) -> None:
        self.state["evaluation_before"] = result
        self._write_state()

    def note_timing(self, timing: dict[str, float]) -> None:
        self.state["timing"] = dict(timing)
        self._write_state()

    # -- writing -----------------------------------------------------------------

    def save_layer(self, index: int, layer_name: str, layer: nn.Module, stages: list, inputs: LayerInputs) -> None:
        """Everything layer ``index`` changed, then the state that marks it done."""
        from compress.pipeline import fault

        tensors: dict[str, Tensor] = {f"layer.{k}": v for k, v in layer.state_dict().items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        stage_meta: dict[str, dict] = {}
        for j, s in enumerate(stages):
            stage = getattr(s, "stage", s)
            meta = stage_meta.setdefault(str(j), {"records": {}})
            records = _quant_records(stage)
            saved = set(self.state["stages"].get(str(j), {}).get("records", {}))
            for name, qw in (records or {}).items():
                if name in saved:
                    continue
                prefix = f"stage{j}.{name}."
                tensors[prefix + "codes"] = qw.codes
                tensors[prefix + "scales"] = qw.scales
                tensors[prefix + "zeros"] = qw.zeros
                if qw.g_idx is not None:
                    tensors[prefix + "g_idx"] = qw.g_idx
                meta["records"][name] = [index, qw.bits, qw.group_size, qw.symmetric, qw.g_idx is not None]
            meta["notes"] = list(getattr(stage, "notes", []) or [])
            meta["seconds"] = float(getattr(s, "seconds", 0.0))
            if hasattr(stage, "resume_state"):
                torch.save(stage.resume_state(), self.dir / f"stage{j}_{index:04d}.pt.tmp")
                os.replace(self.dir / f"stage{j}_{index:04d}.pt.tmp", self.dir / f"stage{j}_{index:04d}.pt")
        _atomic_save_tensors(tensors, self.dir / f"layer_{index:04d}.safetensors")
        _atomic_save_tensors(
            {f"hidden.{b}": h for b, h in enumerate(inputs.hidden)}, self.dir / f"inputs_{index:04d}.safetensors"
        )
        fault(f"mid_save:{index}")
        for j, meta in stage_meta.items():
            old = self.state["stages"].setdefault(j, {"records": {}})
            old["records"].update(meta["records"])
            old["notes"], old["seconds"] = meta["notes"], meta["seconds"]
        self.state["done_layers"] = index + 1
        self.state["layer_names"] = [*self.state.get("layer_names", [])[:index], layer_name]
        self._write_state()
        # Earlier inputs and stage states are superseded once state.json names the new ones.
        for stale in [self.dir / f"inputs_{index - 1:04d}.safetensors", *self.dir.glob(f"stage*_{index - 1:04d}.pt")]:
            stale.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------

    def load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            raise ResumeError(f"{self.state_path}: unreadable progress ({e}); run without --resume") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ResumeError(f"{self.state_path}: unknown progress format; run without --resume")
        if state.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"{self.dir.parent} holds progress of a different recipe, model depth or torch version; "
                "run without --resume to start over"
            )
        self.state = state
        return state

    def restore(self, model: nn.Module, layers: nn.ModuleList, stages: list) -> ResumePoint:
        """Put the saved layers, records and stage states back; return where to continue."""
        state = self.state
        done = int(state["done_layers"])
        try:
            for i in range(done):
                saved = load_file(str(self.dir / f"layer_{i:04d}.safetensors"))
                reshaped = _restore_layer(layers[i], {k[6:]: v for k, v in saved.items() if k.startswith("layer.")}, i)
                fixers = [st for st in (getattr(s, "stage", s) for s in stages) if hasattr(st, "restore_layer")]
                if reshaped and not fixers:
                    raise ResumeError(
                        f"layer {i}: a stage changed tensor shapes ({reshaped[0]}) and cannot be resumed; "
                        "run without --resume"
                    )
                for stage in fixers:
                    stage.restore_layer(model, layers[i], i)
                if i == done - 1:
                    torch.set_rng_state(saved["rng.cpu"])
                    if "rng.cuda" in saved and torch.cuda.is_available():
                        torch.cuda.set_rng_state(saved["rng.cuda"])
                for j, s in enumerate(stages):
                    _restore_records(getattr(s, "stage", s), j, i, saved, state["stages"].get(str(j), {}))
            hidden = None
            if done:
                inputs = load_file(str(self.dir / f"inputs_{done - 1:04d}.safetensors"))
                hidden = [inputs[f"hidden.{b}"] for b in range(len(inputs))]
        except (OSError, SafetensorError, KeyError) as e:
            raise ResumeError(f"{self.dir}: progress files damaged ({e}); run without --resume") from None
        for j, s in enumerate(stages):
            stage = getattr(s, "stage", s)
            meta = state["stages"].get(str(j), {})
            if isinstance(vars(stage).get("notes"), list) and meta.get("notes") is not None:
                stage.notes[:] = meta["notes"]
            if hasattr(s, "seconds"):
                s.seconds = float(meta.get("seconds", 0.0))
            path = self.dir / f"stage{j}_{done - 1:04d}.pt"
            if done and hasattr(stage, "load_resume_state"):
                if not path.is_file():
                    raise ResumeError(f"{path}: missing; run without --resume")
                stage.load_resume_state(torch.load(path, map_location="cpu", weights_only=True))
        return ResumePoint(done, hidden, state.get("evaluation_before"), dict(state.get("timing", {})))


def _restore_layer(layer: nn.Module, saved: dict[str, Tensor], index: int) -> list[str]:
    """Put the saved tensors into ``layer``; returns the names whose shape changed."""
    current = layer.state_dict(keep_vars=True)
    if set(current) != set(saved):
        raise ResumeError(f"layer {index}: saved tensors do not match the model; run without --resume")
    reshaped = [name for name, target in current.items() if tuple(target.shape) != tuple(saved[name].shape)]
    for name, target in current.items():
        # .data, not copy_: a stage may have changed the shape (e.g. fewer KV heads).
        target.data = saved[name].to(target.device)
    return reshaped


def _restore_records(stage, j: int, layer_index: int, saved: dict[str, Tensor], meta: dict) -> None:
    records = _quant_records(stage)
    if records is None:
        return
    for name, (index, bits, group_size, symmetric, has_g_idx) in meta.get("records", {}).items():
        if index != layer_index:
            continue
        prefix = f"stage{j}.{name}."
        records[name] = QuantizedWeight(
            saved[prefix + "codes"],
            saved[prefix + "scales"],
            saved[prefix + "zeros"],
            bits,
            group_size,
            symmetric,
            saved[prefix + "g_idx"] if has_g_idx else None,
        )
