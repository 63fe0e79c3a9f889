"""Recipes: the YAML a user writes, validated into typed objects.

A recipe names a model, a text source, stages applied in order, evaluation and export.
Unknown keys and wrong types are rejected with the path of the bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class CalibrationData(Strict):
    samples: int = Field(128, ge=1, description="number of calibration windows")
    seq_len: int = Field(512, ge=8, description="tokens per calibration window")


class EvaluationData(Strict):
    seq_len: int = Field(512, ge=8)
    max_windows: int | None = Field(
        None, ge=1, description="evaluate on the first N windows only (None: the whole split)"
    )


def _plain_path(v: str) -> str:
    """Paths and names with NUL or line breaks are never meant (and NUL crashes os calls)."""
    if not v.strip():
        raise ValueError("must not be empty")
    if any(c in v for c in "\x00\r\n"):
        raise ValueError("must not contain NUL or line breaks")
    return v


class DataConfig(Strict):
    source: str = Field("wiki", description="'wiki' (embedded corpus), a local file, or hub:NAME[:CONFIG]")
    text_field: str = "text"
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of documents held out for evaluation")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _plain_path(v)

    calibration: CalibrationData = CalibrationData()
    evaluation: EvaluationData = EvaluationData()


class QuantStage(Strict):
    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="-1 for one group per output row")
    symmetric: bool = True
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="fnmatch patterns of linear names left in float",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and (v < 8 or v % 8):
            raise ValueError("must be -1 or a positive multiple of 8")
        return v


class RTNStage(QuantStage):
    type: Literal["rtn"]


class GPTQStage(QuantStage):
    type: Literal["gptq"]
    damp_percent: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    act_order: Literal["none", "static", "g_idx"] = "static"
    mse: bool = Field(False, description="search a clipped range per group minimizing quantization error")
    true_sequential: bool = True
    float_target: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fit each linear's outputs this far (0-1) from the quantized model's own towards the "
        "float model's, from the inputs the quantized model gives it (GPTAQ); costs a float forward per layer",
    )
    float_target_windows: int | None = Field(
        None,
        ge=1,
        description="estimate the float target's drift term on only the first this many calibration windows "
        "(rounded up to whole batches; default all): the float forward costs that share of the windows",
    )
    compute_dtype: Literal["bfloat16", "float16"] | None = Field(
        None,
        description="dtype of the calibration forward's matrix products (autocast; default the model's "
        "own): bfloat16 runs a float32 model's products 2-3x faster on hardware with native bfloat16 "
        "(and the float target's drift products); Hessians and the GPTQ sweep stay float32",
    )

    @model_validator(mode="after")
    def _float_target_needs_true_sequential(self) -> GPTQStage:
        if self.float_target and not self.true_sequential:
            raise ValueError("float_target needs true_sequential: true")
        if self.float_target_windows is not None and not self.float_target:
            raise ValueError("float_target_windows needs float_target")
        return self


class AWQStage(Strict):
    type: Literal["awq"]
    # Quantizer the search simulates; unset fields come from the next quantizing stage.
    bits: int | None = Field(None, ge=2, le=8)
    group_size: int | None = None
    symmetric: bool | None = None
    grid: int = Field(20, ge=1)
    coarse_step: int = Field(
        1, ge=1, description="evaluate every n-th α of the grid first, then refine around the best (1: all)"
    )
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = Field(20, ge=1)
    max_shrink: float = Field(0.5, gt=0, lt=1)
    gqa_aware_vo: bool = Field(True, description="also scale v→o when KV heads are grouped")
    search_tokens: int = Field(
        4096, ge=0, description="calibration tokens the α search's loss runs on (0: all; statistics use all)"
    )
    clip_tokens: int = Field(2048, ge=0, description="calibration tokens the clip search runs on (0: all)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class GQAStage(Strict):
    type: Literal["gqa"]
    num_key_value_heads: int = Field(ge=1)
    pooling: Literal["mean", "fit", "fit_q"] = Field(
        "mean", description="mean (GQA paper), fit (calibrated refit), fit_q (fit + per-plane query rescale)"
    )
    grouping: Literal["contiguous", "similarity"] = "contiguous"
    refit_output: bool = Field(True, description="fit kinds: refit o_proj by least squares on layer activations")
    balance_values: bool = Field(
        True, description="fit kinds: exact v/o basis change so that int4 rounding of v_proj/o_proj is not amplified"
    )
    value_ridge: float = Field(
        0.0, ge=0, description="fit kinds: Tikhonov penalty of the value fit, relative to the mean input energy"
    )


class DropLayersStage(Strict):
    """Keep ``keep`` decoder layers (chosen on calibration data): used to build drafts."""

    type: Literal["drop_layers"]
    keep: int = Field(ge=1)


Stage = Annotated[
    RTNStage | GPTQStage | AWQStage | GQAStage | DropLayersStage, Field(discriminator="type")
]
QUANTIZING = (RTNStage, GPTQStage)


class LMEvalConfig(Strict):
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)


class EvalConfig(Strict):
    perplexity: bool = True
    before: bool = Field(True, description="also evaluate the model before compression")
    lm_eval: LMEvalConfig = LMEvalConfig()


class ExportConfig(Strict):
    format: Literal["gptq", "compressed-tensors", "float", "none"] = "gptq"
    output: str | None = Field(None, description="output folder (default outputs/<recipe name>)")
    max_shard_size: str = "2GB"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the unquantized tensors written (auto: the model's; bfloat16 halves them)"
    )

    @field_validator("output")
    @classmethod
    def _output(cls, v: str | None) -> str | None:
        return None if v is None else _plain_path(v)

    @field_validator("max_shard_size")
    @classmethod
    def _shard(cls, v: str) -> str:
        parse_size(v)
        return v


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = "smollm2"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$", description="auto, cpu or cuda[:N]")
    trust_remote_code: bool = False
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    offload_activations: bool = Field(
        False,
        description="on a GPU, keep the calibration activations in CPU memory and bring each batch over as "
        "it is worked on (GPTQ's walk): one batch's activations on the GPU instead of every window's, for "
        "models whose activations do not fit; about 1.2x slower (host-device copies)",
    )
    data: DataConfig = DataConfig()
    stages: list[Stage] = Field(default_factory=list)
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("model")
    @classmethod
    def _no_control_characters(cls, v: str) -> str:
        return _plain_path(v)

    @model_validator(mode="after")
    def _resolve(self) -> Recipe:
        for i, stage in enumerate(self.stages):
            if isinstance(stage, AWQStage):
                following = next((s for s in self.stages[i + 1 :] if isinstance(s, QUANTIZING)), None)
                for name in ("bits", "group_size", "symmetric"):
                    if getattr(stage, name) is None:
                        if following is None:
                            raise ValueError(
                                f"stages.{i}.{name}: awq needs it, or a quantizing stage (rtn, gptq) after it"
                            )
                        setattr(stage, name, getattr(following, name))
        quantizing = [s for s in self.stages if isinstance(s, QUANTIZING)]
        if len(quantizing) > 1:
            raise ValueError("stages: at most one quantizing stage (rtn or gptq)")
        if self.export.format in ("gptq", "compressed-tensors") and not quantizing:
            raise ValueError(f"export.format: '{self.export.format}' needs a quantizing stage (rtn or gptq)")
        if self.export.format in ("gptq", "compressed-tensors") and quantizing and quantizing[0].bits not in (2, 4, 8):
            # Found here, not after hours of calibration when export packs the codes.
            raise ValueError(
                f"export.format: '{self.export.format}' packs 2, 4 or 8 bits, the recipe quantizes to "
                f"{quantizing[0].bits} (use format 'float' or 'none' to evaluate other widths)"
            )
        return self

    @property
    def quant_stage(self) -> RTNStage | GPTQStage | None:
        return next((s for s in self.stages if isinstance(s, QUANTIZING)), None)

    def output_dir(self) -> Path:
        return Path(self.export.output or f"outputs/{self.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            try:
                value = float(number)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * factor)
    raise ValueError(f"not a size: '{text}' (examples: 500MB, 2GB)")


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _STAGE_TAGS))
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return one_line(f"{loc}: {msg}{more}" if loc else f"{msg}{more}")


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace (keys and values in messages come from the user) and cap the length."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_STAGE_TAGS = {"rtn", "gptq", "awq", "gqa", "drop_layers"}


def parse(data: object, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe must be a mapping of keys to values")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(one_line(f"{origin}: {_format_error(e)}")) from None
    except RecursionError:  # a YAML alias that contains itself
        raise RecipeError(f"{origin}: a value refers to itself (recursive YAML alias)") from None


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; anything this big is not one


def load(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: too large for a recipe ({path.stat().st_size} bytes)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, origin: str = "recipe") -> Recipe:
    """A recipe from YAML text; every failure is a one-line RecipeError."""
    try:
        data = yaml.safe_load(text)
    # Besides YAMLError, safe_load raises ValueError (an impossible date such as 2020-13-45),
    # IndexError ('!!float' with no value), RecursionError (thousands of nested brackets)...:
    # whatever the parser of untrusted text raises means the same thing.
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(one_line(f"{origin}: not valid YAML ({first})")) from None
    return parse(data, origin)
