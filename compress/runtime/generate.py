"""Generation on the runtime model: prefill, then one-token decode steps on the static cache.

    llm = compress.runtime.load("out/ckpt", device="cpu")
    result = llm.generate("Hello", max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1)
    result.text, result.decode_tokens_per_s
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from compress.runtime.errors import RuntimeInputError
from compress.runtime.loader import LoadInfo, load_folder
from compress.runtime.model import Transformer
from compress.runtime.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    texts: list[str]  # generated text of each prompt (prompt excluded, cut at a stop string)
    tokens: list[list[int]]  # generated ids of each prompt (EOS excluded)
    prompt_tokens: int  # padded prompt length
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    batch: int = 1
    stop_reasons: list[str] = field(default_factory=list)  # "eos", "stop", "length"

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_steps / self.decode_s if self.decode_s else 0.0


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeInputError("device 'cuda' requested but no CUDA GPU is available")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runtime:
    """A loaded model with its tokenizer, ready to generate."""

    # Timer of the reported speeds; benchmarks on a shared CPU swap in time.process_time.
    clock = staticmethod(time.perf_counter)

    def __init__(self, model: Transformer, tokenizer, info: LoadInfo, eos_ids: set[int] | None = None,
                 compile_decode: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.eos_ids = set(eos_ids or ())
        self.device = model.device
        self._decode = self._compiled_decode() if compile_decode else None

    @property
    def context_length(self) -> int:
        return self.model.args.max_position_embeddings

    # -- text <-> ids -----------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # a bare model (tests): ids only
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation -------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = 0,
        stop: list[str] | None = None,
        chat: bool = True,
        stream: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate for one prompt or a batch (left-padded). ``stream`` gets text pieces (batch of one).

        ``chat`` wraps each prompt in the tokenizer's chat template when it has one (as ``compress generate``
        does): an instruct model given a raw question often ends at once. ``encode(..., chat=False)`` and
        ``generate_ids`` take raw text or ids.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self.encode(p, chat) for p in prompts]
        params = SamplingParams(temperature, top_k, top_p)
        result = self.generate_ids(ids, max_new_tokens, params, seed, stop=stop, stream=stream)
        return result

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        seed: int | None = 0,
        stop: list[str] | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        params = params or SamplingParams()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeInputError("empty prompt")
        batch, length = len(prompts), max(len(p) for p in prompts)
        if length >= self.context_length:
            raise RuntimeInputError(
                f"the prompt has {length} tokens; the model's context is {self.context_length} "
                "(shorten the prompt)"
            )
        max_new_tokens = min(max_new_tokens, self.context_length - length)
        pad_id = next(iter(self.eos_ids), 0)
        pad_lens = [length - len(p) for p in prompts]
        tokens = torch.tensor([[pad_id] * n + p for n, p in zip(pad_lens, prompts)], device=self.device)
        model = self.model
        needed = length + max_new_tokens
        if model.max_batch != batch or model.max_len < needed:
            # Round up so that nearby lengths reuse the cache; a compiled step (static shapes over
            # the whole cache) starts at 1024 positions so that it seldom recompiles.
            floor = 1024 if self._decode is not None else 0
            model.setup_caches(batch, min(max(-(-needed // 64) * 64, floor), self.context_length))
        model.set_padding(pad_lens if any(pad_lens) else None)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)

        out: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        done = [False] * batch
        texts = [""] * batch
        streamed = 0
        result = GenerationResult(texts, out, length, batch=batch)

        _sync(self.device)
        t0 = self.clock()
        with torch.inference_mode():
            model.slice_kv = True
            # Every position at once: a decode step takes a view instead of building a tensor.
            positions = torch.arange(length + max_new_tokens, device=self.device)
            logits = model(tokens, positions[:length])
            next_ids = sample(logits[:, -1], params, generator)
            _sync(self.device)
            t1 = self.clock()
            result.prefill_s = t1 - t0
            for step in range(max_new_tokens):
                ids_list = next_ids.tolist()
                for b, token in enumerate(ids_list):
                    if done[b]:
                        continue
                    if token in self.eos_ids:
                        done[b], reasons[b] = True, "eos"
                        continue
                    out[b].append(token)
                    if stop:
                        texts[b] = self.decode(out[b])
                        cut = _first_stop(texts[b], stop)
                        if cut is not None:
                            texts[b], done[b], reasons[b] = texts[b][:cut], True, "stop"
                if stream is not None and batch == 1:
                    hold = max((len(x) for x in stop or []), default=1) - 1  # a stop string may be starting
                    streamed = _stream_piece(self, out[0], texts[0] if stop else None, streamed, stream,
                                             done[0] or step == max_new_tokens - 1, hold)
                if all(done) or step == max_new_tokens - 1:
                    break
                at = length + step
                # The compiled step gets a fresh tensor, as before (CUDA graphs copy their inputs).
                pos = positions[at : at + 1] if self._decode is None else torch.tensor([at], device=self.device)
                logits = self._step(next_ids.view(batch, 1), pos)
                next_ids = sample(logits[:, -1], params, generator)
                result.decode_steps += 1
            _sync(self.device)
            result.decode_s = self.clock() - t1
        for b in range(batch):
            if reasons[b] != "stop":
                texts[b] = self.decode(out[b])
        result.stop_reasons = reasons
        return result

    def _step(self, token: Tensor, pos: Tensor) -> Tensor:
        if self._decode is None:
            return self.model(token, pos)
        self.model.slice_kv = False  # static shapes: attend over the whole (masked) cache
        try:
            return self._decode(token, pos).clone()  # CUDA graphs reuse their output buffer
        finally:
            self.model.slice_kv = True

    def _compiled_decode(self):
        """The one-token step compiled once (CUDA graphs on CUDA); prefill stays eager."""
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        return torch.compile(self.model, mode=mode, dynamic=False)


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _stream_piece(rt: Runtime, ids: list[int], text: str | None, streamed: int,
                  emit: Callable[[str], None], final: bool, hold: int = 0) -> int:
    """Emit the newly decoded text; until the end, hold back an incomplete UTF-8 character and
    the last ``hold`` characters (they may begin a stop string)."""
    full = text if text is not None else rt.decode(ids)
    if not final:
        if full.endswith("\ufffd"):
            return streamed
        full = full[: len(full) - hold] if hold else full
    if len(full) > streamed:
        emit(full[streamed:])
        return len(full)
    return streamed


def eos_ids_for(folder: Path, config: dict, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [config.get("eos_token_id")]
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        except json.JSONDecodeError:
            pass
    if tokenizer is not None:
        sources.append(getattr(tokenizer, "eos_token_id", None))
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, list):
            ids.update(int(i) for i in s)
    return ids


def load(
    path: str | Path,
    device: str | torch.device = "auto",
    backend: str = "auto",
    dtype: torch.dtype | str | None = None,
    head: str = "float",
    compile: bool = False,
) -> Runtime:
    """Load an exported checkpoint (GPTQ, compressed-tensors) or float model folder.

    ``dtype`` of activations and float weights, by default bfloat16 on CUDA, and on CPU bfloat16
    for int4 checkpoints on the kernel (its fast path takes bfloat16), float32 otherwise.
    ``backend`` for int4 linears: auto (kernel for the device), kernel, reference.
    ``head='int4'`` quantizes a float output layer at load (faster decode, slightly different logits).
    ``compile`` compiles the decode step (CUDA graphs on CUDA).
    """
    from transformers import AutoTokenizer

    folder = Path(str(path)).expanduser()
    if str(path) in ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "embedded"):
        from compress.models import embedded_model_dir

        folder = embedded_model_dir()
    dev = resolve_device(device)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model, info = load_folder(folder, device=dev, dtype=dtype, backend=backend, head=head)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise RuntimeInputError(f"{folder}: cannot load the tokenizer ({e})") from e
    config = json.loads((folder / "config.json").read_text())
    return Runtime(model, tokenizer, info, eos_ids_for(folder, config, tokenizer), compile_decode=compile)
