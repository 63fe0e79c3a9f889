"""The layer-by-layer calibration engine.

Capture the inputs of the first decoder layer, then for each layer in turn: move it to
the compute device, let every stage collect statistics through hooks and rewrite it,
run the rewritten layer to produce the next layer's inputs, and move it back. Memory on
the device is one decoder layer plus one layer's activations, not the whole model.

The engine knows nothing of any algorithm: a stage is anything with
``apply_layer(ctx: LayerContext)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compress.arch import Arch, decoder_layers, get_module
from compress.quant.int4 import QuantizedWeight

# Weights whose memory was handed back, each with the record to rewrite it from.
Parked = list[tuple[Tensor, QuantizedWeight]]


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """What a decoder layer receives: hidden states per batch and the other arguments."""

    hidden: list[Tensor]
    kwargs: list[dict]

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def to_storage(t: Tensor, store: torch.device | str) -> Tensor:
    """``t`` on ``store``. From a GPU to CPU memory (offloaded activations) the copy goes into
    page-locked memory without waiting: the GPU's stream orders it before any later copy back,
    and CPU code that reads the values must synchronize first (the engine does, once a layer)."""
    store = torch.device(store)
    if t.device == store:
        return t
    if t.is_cuda and store.type == "cpu":
        return empty_in_storage(t, t.shape, store).copy_(t, non_blocking=True)
    return t.to(store, non_blocking=True)  # asynchronous when ``t`` is page-locked


def empty_in_storage(like: Tensor, shape: tuple, store: torch.device) -> Tensor:
    """An empty tensor of ``like``'s dtype on ``store``, page-locked when that is CPU memory and
    ``like`` is on a GPU (see :func:`to_storage`)."""
    pin = like.is_cuda and store.type == "cpu"
    return torch.empty(shape, dtype=like.dtype, device=store, pin_memory=pin)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    arch: Arch,
    windows: Tensor,
    batch_size: int,
    device: torch.device | str,
    store: torch.device | str | None = None,
) -> LayerInputs:
    """Run the model up to its first decoder layer on every batch of ``windows``; the hidden
    states are kept on ``store`` (default: ``device``), the other arguments on ``device``.

    The parts before the first layer (embedding, rotary tables) run where the model lives: on a
    GPU run they would otherwise bring the embedding (a vocabulary's worth of rows, often the
    largest single weight) onto the device just to look up rows. An argument equal to the first
    batch's (the rotary tables of same-length windows) is kept once and shared."""
    layers = decoder_layers(model, arch)
    first = layers[0]
    hidden: list[Tensor] = []
    kwargs: list[dict] = []
    home = _module_device(get_module(model, arch.embed_path))
    device = torch.device(device)
    store = device if store is None else torch.device(store)

    class Catcher(nn.Module):
        def __init__(self, wrapped: nn.Module):
            super().__init__()
            self.wrapped = wrapped
            # Attributes transformers reads from a layer while building its inputs.
            self.attention_type = getattr(wrapped, "attention_type", "full_attention")

        def forward(self, hidden_states, *args, **kw):
            if store.type == "cpu" and device.type == "cuda" and not hidden_states.is_cuda:
                hidden_states = hidden_states.pin_memory()  # as every offloaded activation
            hidden.append(to_storage(hidden_states, store))
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "cache", "use_cache")}
            kwargs.append(_to(_shared_with(kw, kwargs[0]) if kwargs else kw, device))
            raise _StopForward

    layers[0] = Catcher(first)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(home)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
    return LayerInputs(hidden, kwargs)


def _shared_with(obj, first):
    """``obj`` with every tensor equal to its counterpart in ``first`` replaced by that one."""
    if isinstance(obj, Tensor):
        same = isinstance(first, Tensor) and obj.shape == first.shape and obj.dtype == first.dtype
        return first if same and torch.equal(obj, first.to(obj.device)) else obj
    if isinstance(obj, (tuple, list)) and isinstance(first, (tuple, list)) and len(obj) == len(first):
        return type(obj)(_shared_with(o, f) for o, f in zip(obj, first))
    if isinstance(obj, dict) and isinstance(first, dict):
        return {k: _shared_with(v, first[k]) if k in first else v for k, v in obj.items()}
    return obj


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@dataclass
class LayerContext:
    """One decoder layer under calibration, handed to each stage in turn."""

    index: int
    name: str  # e.g. "model.layers.3"
    layer: nn.Module
    arch: Arch
    config: object
    inputs: LayerInputs  # its hidden states on ``device``, or in CPU memory when offloaded
    device: torch.device
    model: nn.Module | None = None
    log: list[str] = field(default_factory=list)
    # The layer's outputs on ``inputs`` with its current weights, when a stage computed them on
    # the way (GPTQ's step-by-step pass): the engine then skips its own forward. Reset before
    # each stage, so only the last stage's (still valid) outputs are used.
    outputs: list[Tensor] | None = None
    # True while the running stage is the layer's last: it may then drop entries of
    # ``inputs.hidden`` once used (a list of the layer's own, which nothing else reads after
    # the last stage), provided it sets ``outputs``. Lets a stage free the layer's inputs at
    # its largest working set instead of keeping them to the end.
    inputs_disposable: bool = False
    # True when, besides, the input tensors are the engine's own (not handed in by its caller):
    # the stage may then also write over them.
    inputs_overwritable: bool = False

    def submodule(self, name: str) -> nn.Module:
        return get_module(self.layer, name)

    def inputs_to_device(self) -> None:
        """Bring offloaded hidden states to the device (in place), for code that reads them there."""
        hidden = self.inputs.hidden
        for b, h in enumerate(hidden):
            if h is not None and h.device != self.device:
                hidden[b] = h.to(self.device, non_blocking=True)

    @torch.no_grad()
    def forward(self, hooks: dict[str, Callable] | None = None, keep_outputs: bool = True) -> list[Tensor]:
        """Run the layer on every input batch, with forward hooks on named submodules."""
        outputs = []
        with self.hooked(hooks or {}):
            for h, kw in zip(self.inputs.hidden, self.inputs.kwargs, strict=True):
                out = _first(self.layer(h.to(self.device, non_blocking=True), **kw))
                if keep_outputs:
                    outputs.append(out)
        return outputs

    @contextlib.contextmanager
    def hooked(self, hooks: dict[str, Callable]) -> Iterator[None]:
        handles = [self.submodule(n).register_forward_hook(fn) for n, fn in hooks.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class LayerStage(Protocol):
    """One step applied to each decoder layer. A stage whose ``reads_offloaded_inputs`` is True
    takes the layer's hidden states where they are kept (CPU memory when offloaded) and moves
    what it works on to ``ctx.device`` itself; any other gets them on the device."""

    name: str

    def apply_layer(self, ctx: LayerContext) -> None: ...


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_EAGER_THRESHOLD = 1 << 20
_TRANSIENT_THRESHOLD = 8 << 20
_mallopt = None  # glibc's mallopt once release_freed_memory_eagerly has set it up


def release_freed_memory_eagerly(threshold: int = _EAGER_THRESHOLD) -> None:
    """Have glibc serve blocks from ``threshold`` bytes up by mmap, so that freeing one
    returns it to the OS at once (Linux/glibc only; elsewhere nothing happens).

    A layer's activations and n x n buffers are several MB each. Under glibc's default
    (a threshold that adapts up to 32 MiB) they come from the heap, whose freed space stays
    resident and fragmented: over a 30-layer run that added ~130 MB to the peak RSS of the
    embedded model. With this, RSS follows the memory really in use. The price is system time:
    every mmap'd block is fresh pages the kernel faults in and zeroes, which is why loops that
    make and free the same few-MB transients thousands of times run under
    :func:`transients_on_heap`.
    """
    global _mallopt
    if _mallopt is not None or not sys.platform.startswith("linux"):
        return
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)  # not glibc: leave the allocator alone
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, int(threshold))
        _mallopt = (mallopt, getattr(libc, "malloc_trim", None), int(threshold))


@contextlib.contextmanager
def transients_on_heap(threshold: int = _TRANSIENT_THRESHOLD) -> Iterator[None]:
    """Serve blocks below ``threshold`` from the heap inside the block (when
    :func:`release_freed_memory_eagerly` is in effect), for a loop that makes and frees
    same-sized transients over and over: they then reuse the same freed heap space instead of
    each being fresh pages. Nothing long-lived may be allocated inside, or it fragments the heap.

    GPTQ's walk runs each sub-block window by window in here (1-3 MB transients on the embedded
    model), writing into tensors made outside; :func:`run_layerwise` trims the heap after each
    layer. 6 layers at 128 x 512 calibration: 13.4 s of system time and 1203 MB peak RSS with
    every block from 1 MiB up mmap'd; 9.3 s and 1211 MB with the MLP alone in here (the heap
    trimmed after each batch); 2.3 s and 1258 MB with every sub-block in here, the heap trimmed
    after each layer and the walk writing over tensors it no longer needs; 5.9 s but 1282 MB
    with the threshold at 8 MiB throughout (other allocations fragment the heap).
    """
    if _mallopt is None:
        yield
        return
    mallopt, _, eager = _mallopt
    mallopt(_M_MMAP_THRESHOLD, max(int(threshold), eager))
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, eager)


def trim_heap() -> None:
    """Hand the heap's freed pages back to the OS (glibc, once :func:`release_freed_memory_eagerly`
    is in effect). Called after each layer rather than after each :func:`transients_on_heap` block,
    so that the next block reuses the pages the last one freed instead of faulting them in afresh."""
    if _mallopt is not None and _mallopt[1] is not None:
        _mallopt[1](0)


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    arch: Arch,
    windows: Tensor,
    stages: list[LayerStage],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    start_layer: int = 0,
    inputs: LayerInputs | None = None,
    on_layer_done: Callable[[int, LayerInputs], None] | None = None,
    offload_activations: bool = False,
    park_finished_layers: bool = True,
) -> LayerInputs:
    """Apply ``stages`` to each decoder layer in turn; returns the last layer's outputs.

    ``start_layer`` and ``inputs`` resume a run whose earlier layers are already done.
    ``offload_activations``: keep the calibration activations in the model's home memory (the
    CPU) rather than on ``device`` (a GPU), moving what is being worked on over as it is needed,
    so that the device holds one layer and a batch's worth of activations, not every window's
    (as the peers do): for models whose activations do not fit on the device. The copies go
    through page-locked memory without waiting; each window still crosses the bus several times a
    layer (about 1.2x the time on an H200). A stage that cannot work on offloaded inputs
    gets them on the device (see :class:`LayerStage`). ``park_finished_layers``: release the memory
    of each finished layer's quantized weights until the end of the run, when they are rewritten
    from their records (:func:`park_quantized_weights`); the result is the same.
    """
    release_freed_memory_eagerly()
    device = torch.device(device)
    layers = decoder_layers(model, arch)
    home = next(model.parameters()).device
    store = home if offload_activations else device
    callers_inputs = inputs is not None
    if inputs is None:
        inputs = capture_layer_inputs(model, arch, windows, batch_size, device, store)
    else:
        inputs = LayerInputs([to_storage(h, store) for h in inputs.hidden], inputs.kwargs)
    bar = tqdm(range(start_layer, len(layers)), desc="layers", disable=not progress, unit="layer")
    parked: Parked = []
    try:
        for i in bar:
            layer = layers[i].to(device)
            # The context gets its own list of the hidden states (a stage may drop its entries),
            # and the engine keeps no other reference to those it made itself.
            kwargs = inputs.kwargs
            own_inputs = LayerInputs(list(inputs.hidden), kwargs)
            del inputs
            ctx = LayerContext(i, f"{arch.layers_path}.{i}", layer, arch, model.config, own_inputs, device, model)
            del own_inputs
            for stage in stages:
                bar.set_postfix_str(stage.name)
                ctx.outputs = None
                ctx.inputs_disposable = stage is stages[-1]
                ctx.inputs_overwritable = ctx.inputs_disposable and not (callers_inputs and i == start_layer)
                if not getattr(stage, "reads_offloaded_inputs", False):
                    ctx.inputs_to_device()
                stage.apply_layer(ctx)
            # The compressed layer's outputs feed the next layer.
            outputs = ctx.outputs if ctx.outputs is not None else ctx.forward()
            inputs = LayerInputs([to_storage(h, store) for h in outputs], kwargs)
            del outputs
            if device.type == "cuda":  # offloaded copies land before anything on the CPU reads them
                torch.cuda.synchronize(device)
            ctx.inputs.hidden.clear()
            ctx.outputs = None
            layers[i].to(home)
            trim_heap()
            if on_layer_done is not None:
                on_layer_done(i, inputs)
            if park_finished_layers:
                parked += park_quantized_weights(layers[i], ctx.name, stages)
    finally:
        unpark(parked)
    return inputs


def park_quantized_weights(layer: nn.Module, prefix: str, stages: list[LayerStage]) -> Parked:
    """Hand back the memory of a finished layer's quantized weights until :func:`unpark` rewrites
    them from their records: nothing reads a finished layer until the run ends, and its float
    weights would otherwise stay resident, a model's worth by the last layer (on the embedded
    model, 0.45 GB of pages of the mapped checkpoint, written over with the dequantized values).
    Only weights that are exactly their record's dequantized values, in CPU memory, are parked."""
    parked = []
    for stage in stages:
        for name, record in getattr(stage, "quantized", {}).items():
            if not name.startswith(prefix + "."):
                continue
            weight = get_module(layer, name[len(prefix) + 1 :]).weight.data
            if weight.device.type != "cpu" or not torch.equal(weight, record.dequantize(weight.dtype)):
                continue
            if release_pages(weight):
                parked.append((weight, record))
    return parked


def unpark(parked: Parked) -> None:
    """Write parked weights back from their records (the values they had when parked)."""
    for weight, record in parked:
        weight.copy_(record.dequantize(weight.dtype))
    parked.clear()


_MADV_DONTNEED = 4  # Linux


def release_pages(t: Tensor) -> int:
    """Return to the OS the whole memory pages inside ``t``'s bytes (a CPU tensor; Linux only):
    their contents read as zeros, or as the mapped file's bytes, until written again. The pages
    it shares with its neighbours stay. Returns the bytes released (0: nothing done)."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    begin = t.data_ptr()
    start = -(-begin // page) * page
    end = (begin + t.numel() * t.element_size()) // page * page
    if end <= start:
        return 0
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        return 0
    return end - start


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
