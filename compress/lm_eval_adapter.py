"""lm-eval on our models: the harness's own ``LM`` interface over any transformers causal LM
(float, fake-quantized in place, or a checkpoint loaded with ``compress.models.load``).

Local tasks (``eval/tasks``) build their documents from a corpus split at run time and
need no network. Hub tasks (hellaswag, arc_easy, wikitext, ...) download their data as
usual when online; offline they fail with one clear line (``LMEvalError``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
# Logits held at once while scoring (2**28 float32 = 1 GiB): bounds memory at long contexts.
LOGITS_BUDGET = 2**28


class LMEvalError(RuntimeError):
    """An lm-eval run that cannot start (missing package, unknown task, offline hub task)."""


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError as e:
        raise LMEvalError("lm-eval is not installed; install the 'eval' extra: pip install 'compress[eval]'") from e
    return TemplateLM


def tasks_dir() -> Path:
    """Our task definitions: ``$COMPRESS_TASKS_DIR``, else ``eval/tasks`` beside the package."""
    env = os.environ.get("COMPRESS_TASKS_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "eval" / "tasks"
    if not path.is_dir():
        raise LMEvalError(f"local task folder not found: {path} (set COMPRESS_TASKS_DIR to eval/tasks)")
    return path


def local_task_names() -> list[str]:
    """Task and group names defined in ``eval/tasks`` (read from the YAML files, cheaply)."""
    import yaml

    names = []
    for f in sorted(tasks_dir().glob("*.yaml")):
        for line in f.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key in ("task", "group") and value.strip():
                names.append(yaml.safe_load(value.strip()))
                break
    return names


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "0").strip().lower() not in ("0", "", "false", "no")
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _build_lm_class():
    TemplateLM = _require_lm_eval()

    class CompressLM(TemplateLM):
        """The harness's LM interface over a transformers causal LM already in memory.

        Scoring follows lm-eval's HF backend: no special tokens when encoding, the BOS
        (else EOS) token as the prefix of an empty context and of a rolling document,
        windows of at most ``max_length`` tokens.
        """

        def __init__(
            self,
            model: nn.Module,
            tokenizer,
            batch_size: int = 8,
            max_length: int | None = None,
            device: torch.device | str | None = None,
            max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        ) -> None:
            super().__init__()
            self.model = model
            self.tokenizer = tokenizer
            self.batch_size = max(1, int(batch_size))
            self._device = torch.device(device) if device is not None else next(model.parameters()).device
            positions = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
            self._max_length = int(max_length or min(positions, DEFAULT_MAX_LENGTH))
            self.max_gen_toks = max_gen_toks

        # -- tokens ---------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise LMEvalError("the tokenizer has no EOS token; lm-eval needs one")
            return eos

        @property
        def prefix_token_id(self) -> int:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            return bos if bos is not None else self.eot_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.tokenizer, "name_or_path", "compress").replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

        def tok_decode(self, tokens: Sequence[int]) -> str:
            return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

        # -- scoring --------------------------------------------------------------
        @torch.no_grad()
        def _logprobs(self, inputs: list[list[int]], scored: list[int]) -> list[Tensor]:
            """Log-softmax over the vocabulary at the last ``scored[i]`` positions of each input
            (one right-padded batch; padding after a sequence cannot change a causal LM's outputs)."""
            width = max(len(x) for x in inputs)
            ids = torch.zeros(len(inputs), width, dtype=torch.long)
            mask = torch.zeros(len(inputs), width, dtype=torch.long)
            for i, x in enumerate(inputs):
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            logits = self.model(
                input_ids=ids.to(self._device), attention_mask=mask.to(self._device), use_cache=False
            ).logits
            return [
                F.log_softmax(logits[i, len(x) - n : len(x)].float(), dim=-1).cpu()
                for i, (x, n) in enumerate(zip(inputs, scored, strict=True))
            ]

        def _batches(self, prepared: list) -> list[list]:
            """Batches of at most ``batch_size`` inputs and about ``LOGITS_BUDGET`` logits (the
            vocabulary times the tokens), longest first so that little is padding."""
            vocab = int(getattr(self.model.config, "vocab_size", 1) or 1)
            prepared = sorted(prepared, key=lambda r: -len(r[1]))
            batches, start = [], 0
            while start < len(prepared):
                width = len(prepared[start][1])
                size = max(1, min(self.batch_size, LOGITS_BUDGET // max(1, width * vocab)))
                batches.append(prepared[start : start + size])
                start += size
            return batches

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(sum log p(continuation | context), greedy?) for token pairs; the context is cut
            from the left so that context + continuation fits ``max_length + 1`` tokens."""
            results: list[tuple[float, bool] | None] = [None] * len(pairs)
            prepared = []
            for i, (context, continuation) in enumerate(pairs):
                if not continuation:
                    results[i] = (0.0, True)
                    continue
                if not context:
                    raise LMEvalError("a loglikelihood request needs at least one context token")
                if len(continuation) > self.max_length:
                    raise LMEvalError(
                        f"a continuation of {len(continuation)} tokens is longer than max_length {self.max_length}"
                    )
                whole = (context + continuation)[-(self.max_length + 1) :]
                prepared.append((i, whole[:-1], continuation))
            for chunk in self._batches(prepared):
                logprobs = self._logprobs([inp for _, inp, _ in chunk], [len(c) for _, _, c in chunk])
                for (i, _, continuation), scored in zip(chunk, logprobs, strict=True):
                    target = torch.tensor(continuation)
                    total = scored.gather(1, target[:, None]).sum().item()
                    greedy = bool((scored.argmax(dim=-1) == target).all())
                    results[i] = (float(total), greedy)
            return results  # type: ignore[return-value]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            return self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])

        def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
            """lm-eval's disjoint rolling windows: every token predicted once, with the most context."""
            from lm_eval import utils

            return [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                )
            ]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for k, req in enumerate(requests):
                (text,) = req.args
                for w in self.rolling_windows(self.tok_encode(text)):
                    windows.append(w)
                    owner.append(k)
            totals = [0.0] * len(requests)
            for k, (logprob, _) in zip(owner, self._score(windows), strict=True):
                totals[k] += logprob
            for req, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        # -- generation -----------------------------------------------------------
        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            outputs = []
            eos_text = self.tok_decode([self.eot_token_id])
            for req in requests:
                context, gen_kwargs = req.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                if eos_text not in until:
                    until.append(eos_text)
                max_new = int(
                    gen_kwargs.pop("max_gen_toks", None) or gen_kwargs.pop("max_new_tokens", None) or self.max_gen_toks
                )
                max_new = min(max_new, self.max_length - 1)
                prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
                text = self._greedy(prompt, max_new, until)
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                outputs.append(text)
                self.cache_hook.add_partial("generate_until", req.args, text)
            return outputs

        def _greedy(self, prompt: list[int], max_new: int, until: list[str]) -> str:
            """Greedy decoding (``model.generate``), stopping early once a stop string appears."""
            from transformers import StoppingCriteria, StoppingCriteriaList

            start, decode = len(prompt), self.tok_decode

            class StopStrings(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    text = decode(input_ids[0, start:].tolist())
                    return torch.tensor([any(stop and stop in text for stop in until)], device=input_ids.device)

            ids = torch.tensor([prompt], device=self._device)
            pad = self.tokenizer.pad_token_id
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=self.eot_token_id,
                pad_token_id=pad if pad is not None else self.eot_token_id,
                stopping_criteria=StoppingCriteriaList([StopStrings()]),
            )
            generated = out[0, start:].tolist()
            if generated and generated[-1] == self.eot_token_id:
                generated = generated[:-1]
            return decode(generated)

    return CompressLM


_LM_CLASS = None


def lm_class():
    """The ``CompressLM`` class (built on first use so that importing this module needs no lm-eval)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        _LM_CLASS = _build_lm_class()
    return _LM_CLASS


def make_lm(model: nn.Module, tokenizer, **kwargs):
    """An lm-eval ``LM`` over ``model`` (see ``CompressLM``)."""
    return lm_class()(model, tokenizer, **kwargs)


def _clean_metrics(raw: dict) -> dict:
    """lm-eval's ``{'acc,none': x, 'acc_stderr,none': y, 'alias': ...}`` → ``{'acc': x, 'acc_stderr': y}``."""
    out = {}
    for key, value in raw.items():
        name, _, filt = key.partition(",")
        if name in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        out[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
    return out


def split_task_names(tasks: Sequence[str]) -> list[str]:
    """Task names from a list that may also hold comma-separated names."""
    return [t.strip() for item in tasks for t in str(item).split(",") if t.strip()]


def check_offline(tasks: Sequence[str]) -> None:
    """Fail early, in one line, when a hub task is asked for and the hub is offline."""
    local = local_task_names()
    hub = [t for t in split_task_names(tasks) if t not in local]
    if hub and _hub_offline():
        raise LMEvalError(
            f"task(s) {', '.join(hub)} need their dataset from the hub, and the hub is offline here "
            f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE); offline tasks: {', '.join(local)}"
        )


def _check_known(tasks: list[str], local: list[str], manager) -> None:
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise LMEvalError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (local tasks: {', '.join(local)}; "
            "`lm-eval ls tasks` lists the harness's)"
        )


def run_tasks(
    model,
    tasks: Sequence[str],
    *,
    tokenizer=None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    data: str = "wiki",
    eval_fraction: float = 0.1,
    text_field: str = "text",
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model``; returns ``{task: {metric: value}}``.

    ``model``: an ``nn.Module`` (with ``tokenizer``), a ``compress.models.LoadedModel``, or
    anything ``compress.models.load`` accepts (a folder, checkpoint, .gguf, 'smollm2').
    Local tasks take their documents from the evaluation split of ``data`` (same split
    as our perplexity), cut by ``eval_fraction``; ``seed`` fixes their random choices.
    """
    tasks = split_task_names(tasks)
    if not tasks:
        return {}
    _require_lm_eval()
    check_offline(tasks)
    from compress import models

    if isinstance(model, (str, os.PathLike)):
        model = models.load(model, dtype, device or "cpu")
    if isinstance(model, models.LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    if tokenizer is None:
        raise LMEvalError("run_tasks: a tokenizer is needed with a model object")

    import lm_eval
    from lm_eval.tasks import TaskManager

    # The harness logs a warning per task for custom datasets and more: keep the console for results.
    if not logging.getLogger("compress").isEnabledFor(logging.INFO):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    local = local_task_names()
    metadata = {
        "compress_data": data,
        "compress_eval_fraction": eval_fraction,
        "compress_text_field": text_field,
        "compress_seed": seed,
    }
    # Indexing the harness's thousands of task files takes seconds: only when a hub task is asked for.
    only_local = all(t in local for t in tasks)
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=not only_local, metadata=metadata)
    _check_known(tasks, local, manager)

    lm = make_lm(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=100,  # closed-form stderr for accuracies; few draws for the rest
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, TimeoutError) as e:
        raise LMEvalError(f"lm-eval could not fetch a task's dataset (no network?): {_first_line(e)}") from None
    except Exception as e:
        # Dataset download errors come in many types (requests, huggingface_hub, datasets).
        if _looks_like_network(e):
            raise LMEvalError(f"lm-eval could not fetch a task's dataset (no network?): {_first_line(e)}") from None
        raise
    finally:
        model.train(was_training)
    cleaned = {task: _clean_metrics(metrics) for task, metrics in (results or {}).get("results", {}).items()}
    return {task: metrics for task, metrics in cleaned.items() if metrics}  # groups carry no metrics of their own


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _looks_like_network(e: BaseException) -> bool:
    names = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    network = {
        "ConnectionError", "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NameResolutionError",
        "OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError", "DatasetNotFoundError",
    }
    return bool(names & network) or "offline" in str(e).lower()
