"""Fitting: decide, from the header alone, how a source image becomes a request the model accepts.

Pure geometry and policy, no pixels: the scan uses it to skip (with a reason) before paying, and
the worker uses the same answer to prepare the pixels. The order is fixed: orientation (EXIF
rotation changes which side is the width), aspect ratio (pad or skip), too small (enlarge or
skip), too large (downscale or skip). Padding is remembered as a content box so the padding can be
cropped off the returned image and the output keeps the source's aspect ratio.

Given the model's output size rule, the plan also knows the output's size before anything is
paid: an upscale that would come back no larger than the source (``no_gain``: a 4000x3000
photo downscaled to fit comes back 3593x2695) or whose picture would be a sliver inside the
padding (``degenerate_aspect``: a 1x100000 strip) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from batch_upscaler.catalogue import InputLimits, Rejection, check_image
from batch_upscaler.probe import ImageHeader
from batch_upscaler.settings import AlphaPolicy, AspectPolicy, Oversize, PrepareSettings, Undersize

Box = tuple[int, int, int, int]  # left, top, right, bottom
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Modes a model-facing JPEG/PNG/WebP may carry as they are.
_PLAIN_MODES = frozenset({"RGB", "L"})


@dataclass(frozen=True)
class Fit:
    """How a source becomes the sent image; ``reasons`` says why it cannot go byte-for-byte."""

    upright_size: tuple[int, int]  # after EXIF orientation
    sent_size: tuple[int, int]
    content_box: Box | None  # the real image inside the sent one, when padded
    rotate: bool
    reasons: tuple[str, ...]

    @property
    def as_is(self) -> bool:
        return not self.reasons

    def output_content_size(self, output_size: tuple[int, int]) -> tuple[float, float]:
        """The size the source's picture has in an output of ``output_size`` (padding cropped off)."""
        left, top, right, bottom = self.content_box or (0, 0, *self.sent_size)
        return (output_size[0] * (right - left) / self.sent_size[0],
                output_size[1] * (bottom - top) / self.sent_size[1])

    def output_scale(self, sent_output_width: int) -> float:
        """Output width ÷ source width, for an output whose (uncropped) width is given."""
        content_width = self.sent_size[0] if self.content_box is None else self.content_box[2] - self.content_box[0]
        return sent_output_width * content_width / self.sent_size[0] / self.upright_size[0]


OutputSizeRule = Callable[[int, int], tuple[int, int]]


def fit(header: ImageHeader, limits: InputLimits, prepare: PrepareSettings,
        output_size: OutputSizeRule | None = None) -> Fit | Rejection:
    """The plan for this image, or why it must be skipped; with the model's ``output_size`` rule,
    also refuses images whose upscale would not be larger than the source."""
    plan = _fit(header, limits, prepare)
    if isinstance(plan, Fit) and output_size is not None:
        return _gain_problem(plan, output_size(*plan.sent_size), prepare.min_gain) or plan
    return plan


def _gain_problem(plan: Fit, output: tuple[int, int], min_gain: float) -> Rejection | None:
    width, height = plan.upright_size
    content = plan.output_content_size(output)
    if min(content) < 1 or (plan.content_box is not None and min(
            plan.content_box[2] - plan.content_box[0], plan.content_box[3] - plan.content_box[1]) < 2):
        return Rejection("degenerate_aspect", f"{width}x{height} would be {content[0]:.0f}x{content[1]:.0f} px "
                         "inside the padding the model needs (aspect ratio too extreme)")
    if content[0] <= width * min_gain or content[1] <= height * min_gain:
        relation = "≤ source" if min_gain == 1.0 else f"is not {min_gain:g}x larger than source"
        return Rejection("no_gain", f"output {content[0]:.0f}x{content[1]:.0f} {relation} {width}x{height}")
    return None


def _fit(header: ImageHeader, limits: InputLimits, prepare: PrepareSettings) -> Fit | Rejection:
    reasons: list[str] = []
    rotate = prepare.apply_orientation and header.orientation != 1
    if rotate:
        reasons.append(f"orientation {header.orientation}")
    width, height = header.width, header.height
    if rotate and header.orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    upright = (width, height)
    reasons += _format_reasons(header, prepare)

    size, box = upright, None
    padded = _pad_to_aspect(size, limits)
    if padded != size:
        if prepare.aspect is AspectPolicy.SKIP:
            return check_image(limits, *size) or Rejection("aspect_ratio", f"{size[0]}x{size[1]}")
        box = _centred(size, padded)
        size = padded
        reasons.append("padded to the allowed aspect ratio")
    scale = _scale_needed(size, limits)
    if scale != 1.0:
        policy_skips = (prepare.undersize is Undersize.SKIP) if scale > 1 else (prepare.oversize is Oversize.SKIP)
        if policy_skips:
            return check_image(limits, *upright) or check_image(limits, *size) or Rejection("cannot_fit", str(size))
        size, box = _scaled(size, box, scale)
        reasons.append("enlarged to the minimum size" if scale > 1 else "downscaled to the maximum size")
    size, box = _repad(size, box, limits)  # rounding may nudge a ratio just past a bound
    problem = check_image(limits, *size)
    if problem is not None:
        return Rejection("cannot_fit", f"{upright[0]}x{upright[1]} cannot be fitted: {problem}")
    return Fit(upright, size, box, rotate, tuple(reasons))


def _format_reasons(header: ImageHeader, prepare: PrepareSettings) -> list[str]:
    reasons = []
    if not header.sendable_as_is:
        reasons.append(f"format {header.pil_format}")
    if header.has_alpha:
        if prepare.alpha is AlphaPolicy.FLATTEN:
            reasons.append("alpha flattened")
        elif header.mode != "RGBA":
            reasons.append(f"mode {header.mode}")
    elif header.mode not in _PLAIN_MODES:
        reasons.append(f"mode {header.mode}")
    if header.is_animated:
        reasons.append("first frame of an animation")
    return reasons


def _pad_to_aspect(size: tuple[int, int], limits: InputLimits) -> tuple[int, int]:
    width, height = size
    if limits.max_aspect is not None and width / height > limits.max_aspect:
        return width, math.ceil(width / limits.max_aspect)
    if limits.min_aspect is not None and width / height < limits.min_aspect:
        return math.ceil(height * limits.min_aspect), height
    return size


def _repad(size: tuple[int, int], box: Box | None, limits: InputLimits) -> tuple[tuple[int, int], Box | None]:
    padded = _pad_to_aspect(size, limits)
    if padded == size:
        return size, box
    inner = _centred((box[2] - box[0], box[3] - box[1]) if box else size, padded)
    return padded, inner


def _centred(inner: tuple[int, int], outer: tuple[int, int]) -> Box:
    left, top = (outer[0] - inner[0]) // 2, (outer[1] - inner[1]) // 2
    return left, top, left + inner[0], top + inner[1]


def _scale_needed(size: tuple[int, int], limits: InputLimits) -> float:
    width, height = size
    pixels = width * height
    up = max(limits.min_side / min(width, height), math.sqrt(limits.min_pixels / pixels), 1.0)
    if up > 1.0:
        return up
    down = math.sqrt(limits.max_pixels / pixels)
    if limits.max_side is not None:
        down = min(down, limits.max_side / max(width, height))
    # A hair under the limit, so that rounding and re-padding cannot land just above it.
    return min(down * 0.998, 1.0) if down < 1.0 else 1.0


def _scaled(size: tuple[int, int], box: Box | None, scale: float) -> tuple[tuple[int, int], Box | None]:
    # Round towards the limit being met: up when enlarging, down when shrinking.
    rnd = math.ceil if scale > 1 else math.floor
    new = (max(1, rnd(size[0] * scale)), max(1, rnd(size[1] * scale)))
    if box is None:
        return new, None
    sx, sy = new[0] / size[0], new[1] / size[1]
    return new, (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
