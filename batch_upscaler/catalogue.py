"""The model catalogue: what each Stability upscale model on Bedrock accepts and returns, as data.

Figures come from docs/bedrock-reference.md (limits, prices, reference conflicts). Where the
reference flags a CONFLICT the catalogue follows the *validation rule* and the value can be
overridden from config/ (see README "Reference conflicts"):

* conservative ``max_pixels``: 9,437,184 (validation rule) vs "1 megapixel" (narrative text);
* ``creativity`` lower bound: 0.1 (AWS) vs 0.2 (Stability's spec);
* prompt minimum length: 0 (AWS) vs 1 (Stability) -- we require a non-empty prompt.

Both the runner (manifest validation, checks before paying) and the emulator (request
validation) read this module, so they can never disagree about a limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class ModelName(StrEnum):
    CONSERVATIVE = "conservative"
    CREATIVE = "creative"
    FAST = "fast"


class ParamKind(StrEnum):
    STRING = "string"
    NUMBER = "number"
    INTEGER = "integer"
    CHOICE = "choice"


IMAGE_FORMATS = ("jpeg", "png", "webp")
MAX_BODY_BYTES = 25_000_000  # botocore InvokeModel Body blob max
STYLE_PRESETS = (
    "3d-model", "analog-film", "anime", "cinematic", "comic-book", "digital-art", "enhance",
    "fantasy-art", "isometric", "line-art", "low-poly", "modeling-compound", "neon-punk",
    "origami", "photographic", "pixel-art", "tile-texture",
)


@dataclass(frozen=True)
class ParamSpec:
    """One request parameter (besides ``image``) and its documented constraints."""

    name: str
    kind: ParamKind
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    default: Any = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable for this parameter, or None when it is."""
        if self.kind in (ParamKind.STRING, ParamKind.CHOICE):
            if not isinstance(value, str):
                return f"must be a string, got {type(value).__name__}"
            if self.kind is ParamKind.CHOICE and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}, got {value!r}"
            return self._length_problem(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {type(value).__name__}"
        if self.kind is ParamKind.INTEGER and not float(value).is_integer():
            return f"must be a whole number, got {value}"
        if self.minimum is not None and value < self.minimum:
            return f"must be ≥ {_num(self.minimum)}, got {_num(value)}"
        if self.maximum is not None and value > self.maximum:
            return f"must be ≤ {_num(self.maximum)}, got {_num(value)}"
        return None

    def _length_problem(self, value: str) -> str | None:
        if self.minimum is not None and len(value) < self.minimum:
            return "must not be empty" if self.minimum == 1 else f"must have ≥ {_num(self.minimum)} characters"
        if self.maximum is not None and len(value) > self.maximum:
            return f"must have ≤ {_num(self.maximum)} characters, got {len(value)}"
        return None


@dataclass(frozen=True)
class InputLimits:
    """What an input image must satisfy before it may be sent."""

    min_side: int
    max_side: int | None
    min_pixels: int
    max_pixels: int
    min_aspect: float | None = None  # width / height
    max_aspect: float | None = None
    formats: tuple[str, ...] = IMAGE_FORMATS
    max_body_bytes: int = MAX_BODY_BYTES


@dataclass(frozen=True)
class Rejection:
    """A reason an image cannot be sent: ``code`` is stable, ``detail`` is for people."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass(frozen=True)
class ModelSpec:
    """One upscale model: ids, parameters, input limits, output size rule and price estimate."""

    name: ModelName
    base_id: str
    params: tuple[ParamSpec, ...]
    limits: InputLimits
    # Output size: either ~target_pixels keeping aspect (conservative/creative, observed
    # 200x200 -> 3112x3112) or side_factor times each side (fast: 4x).
    output_target_pixels: int | None = None
    output_side_factor: int | None = None
    price_usd: float = 0.0  # estimate, UNVERIFIED in the reference; overridable in config/
    param_index: Mapping[str, ParamSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})

    def profile_id(self, prefix: str | None) -> str:
        """Model id to invoke: the inference profile ``<prefix>.<base>``, or the bare id."""
        return f"{prefix}.{self.base_id}" if prefix else self.base_id

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The documented output size for an input of ``width`` x ``height``."""
        if self.output_side_factor:
            return width * self.output_side_factor, height * self.output_side_factor
        assert self.output_target_pixels is not None
        scale = math.sqrt(self.output_target_pixels / (width * height))
        return max(1, round(width * scale)), max(1, round(height * scale))


def check_params(spec: ModelSpec, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """All (parameter, problem) pairs for a request's non-image parameters."""
    problems = [(name, "is not accepted by this model") for name in params if name not in spec.param_index]
    for p in spec.params:
        if p.name not in params:
            if p.required:
                problems.append((p.name, "is required"))
            continue
        why = p.problem(params[p.name])
        if why:
            problems.append((p.name, why))
    return problems


def check_image(limits: InputLimits, width: int, height: int, fmt: str | None = None) -> Rejection | None:
    """Why an image of this size (and format, if given) cannot be sent, or None if it can."""
    size = f"{width}x{height}"
    if fmt is not None and fmt not in limits.formats:
        return Rejection("unsupported_format", f"{fmt} is not one of {', '.join(limits.formats)}")
    if min(width, height) < limits.min_side:
        return Rejection("too_small", f"{size} < {limits.min_side} px")
    if limits.max_side is not None and max(width, height) > limits.max_side:
        return Rejection("too_large", f"{size} > {limits.max_side} px per side")
    pixels = width * height
    if pixels < limits.min_pixels:
        return Rejection("too_few_pixels", f"{size} = {pixels} px < {limits.min_pixels} px")
    if pixels > limits.max_pixels:
        return Rejection("too_many_pixels", f"{size} = {pixels} px > {limits.max_pixels} px")
    aspect = width / height
    low, high = limits.min_aspect, limits.max_aspect
    if (low is not None and aspect < low) or (high is not None and aspect > high):
        return Rejection("aspect_ratio", f"{size} has aspect {aspect:.2f}, allowed {low}–{high}")
    return None


def max_image_bytes(limits: InputLimits, json_overhead: int = 64 * 1024) -> int:
    """Largest encoded image whose base64 JSON request still fits the body cap."""
    return (limits.max_body_bytes - json_overhead) * 3 // 4


def _num(value: float) -> str:
    return f"{value:,}" if float(value).is_integer() and abs(value) >= 10_000 else f"{value:g}"


_PROMPT = ParamSpec("prompt", ParamKind.STRING, required=True, minimum=1, maximum=10_000)
_NEGATIVE = ParamSpec("negative_prompt", ParamKind.STRING, maximum=10_000)
_SEED = ParamSpec("seed", ParamKind.INTEGER, minimum=0, maximum=4_294_967_294, default=0)
_FORMAT = ParamSpec("output_format", ParamKind.CHOICE, choices=IMAGE_FORMATS, default="png")
_TARGET_9_7_MP = 3112 * 3112  # observed Bedrock output for a 200x200 conservative input

BUILTIN: Mapping[ModelName, ModelSpec] = {
    ModelName.CONSERVATIVE: ModelSpec(
        name=ModelName.CONSERVATIVE,
        base_id="stability.stable-conservative-upscale-v1:0",
        params=(_PROMPT, _NEGATIVE, _SEED, _FORMAT,
                ParamSpec("creativity", ParamKind.NUMBER, minimum=0.1, maximum=0.5, default=0.35)),
        limits=InputLimits(min_side=64, max_side=None, min_pixels=4_096, max_pixels=9_437_184,
                           min_aspect=1 / 2.5, max_aspect=2.5),
        output_target_pixels=_TARGET_9_7_MP,
        price_usd=0.40,
    ),
    ModelName.CREATIVE: ModelSpec(
        name=ModelName.CREATIVE,
        base_id="stability.stable-creative-upscale-v1:0",
        params=(_PROMPT, _NEGATIVE, _SEED, _FORMAT,
                ParamSpec("creativity", ParamKind.NUMBER, minimum=0.1, maximum=0.5, default=0.3),
                ParamSpec("style_preset", ParamKind.CHOICE, choices=STYLE_PRESETS)),
        limits=InputLimits(min_side=64, max_side=None, min_pixels=4_096, max_pixels=1_048_576),
        output_target_pixels=_TARGET_9_7_MP,
        price_usd=0.60,
    ),
    ModelName.FAST: ModelSpec(
        name=ModelName.FAST,
        base_id="stability.stable-fast-upscale-v1:0",
        params=(_FORMAT,),
        limits=InputLimits(min_side=32, max_side=1_536, min_pixels=1_024, max_pixels=1_048_576),
        output_side_factor=4,
        price_usd=0.03,
    ),
}


@dataclass(frozen=True)
class ModelOverride:
    """Deployment overrides for the reference's conflicting values (from config/)."""

    max_pixels: int | None = None
    creativity_min: float | None = None
    price_usd: float | None = None


def apply_override(spec: ModelSpec, override: ModelOverride) -> ModelSpec:
    """A copy of ``spec`` with the overridden values."""
    limits = spec.limits
    if override.max_pixels is not None:
        limits = replace(limits, max_pixels=override.max_pixels)
    params = spec.params
    if override.creativity_min is not None:
        params = tuple(replace(p, minimum=override.creativity_min) if p.name == "creativity" else p
                       for p in params)
    price = spec.price_usd if override.price_usd is None else override.price_usd
    return replace(spec, limits=limits, params=params, price_usd=price)


def find_by_model_id(model_id: str, catalogue: Mapping[ModelName, ModelSpec] = BUILTIN,
                     ) -> tuple[ModelSpec, str | None] | None:
    """The spec and the profile prefix (or None for a bare id) that ``model_id`` names."""
    for spec in catalogue.values():
        if model_id == spec.base_id:
            return spec, None
        prefix, dot, rest = model_id.partition(".")
        if dot and rest == spec.base_id:
            return spec, prefix
    return None
