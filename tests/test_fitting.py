"""Fitting decisions from headers alone: orientation, aspect padding, enlarging, downscaling, skips."""

from __future__ import annotations

import pytest

from batch_upscaler.catalogue import BUILTIN, ModelName, Rejection
from batch_upscaler.fitting import Fit, fit
from batch_upscaler.probe import ImageHeader
from batch_upscaler.settings import AlphaPolicy, AspectPolicy, Oversize, PrepareSettings, Undersize

CONSERVATIVE = BUILTIN[ModelName.CONSERVATIVE].limits
CREATIVE = BUILTIN[ModelName.CREATIVE].limits
FAST = BUILTIN[ModelName.FAST].limits
DEFAULT = PrepareSettings()


def header(w: int, h: int, fmt: str = "JPEG", mode: str = "RGB", orientation: int = 1, alpha: bool = False,
           animated: bool = False) -> ImageHeader:
    return ImageHeader(fmt, w, h, mode, orientation, alpha, animated)


def planned(result: Fit | Rejection) -> Fit:
    assert isinstance(result, Fit), result
    return result


def test_a_valid_image_goes_as_is() -> None:
    plan = planned(fit(header(800, 600), CONSERVATIVE, DEFAULT))
    assert plan.as_is and plan.sent_size == (800, 600) and plan.content_box is None


@pytest.mark.parametrize(("orientation", "upright"), [(1, (300, 200)), (3, (300, 200)), (6, (200, 300)),
                                                      (8, (200, 300)), (5, (200, 300)), (2, (300, 200))])
def test_orientation_swaps_sides_when_applied(orientation: int, upright: tuple[int, int]) -> None:
    plan = planned(fit(header(300, 200, orientation=orientation), CONSERVATIVE, DEFAULT))
    assert plan.upright_size == upright and plan.rotate == (orientation != 1)
    kept = planned(fit(header(300, 200, orientation=orientation), CONSERVATIVE,
                       PrepareSettings(apply_orientation=False)))
    assert kept.upright_size == (300, 200) and not kept.rotate


def test_panorama_is_padded_to_the_allowed_ratio_or_skipped() -> None:
    plan = planned(fit(header(1000, 200), CONSERVATIVE, DEFAULT))
    width, height = plan.sent_size
    assert width == 1000 and 2.45 < width / height <= 2.5
    left, top, right, bottom = plan.content_box or (0, 0, 0, 0)
    assert (right - left, bottom - top) == (1000, 200) and top == (height - 200) // 2
    skipped = fit(header(1000, 200), CONSERVATIVE, PrepareSettings(aspect=AspectPolicy.SKIP))
    assert isinstance(skipped, Rejection) and skipped.code == "aspect_ratio"
    assert str(skipped).startswith("aspect_ratio: 1000x200 has aspect 5.00")


def test_tall_panorama_pads_width() -> None:
    plan = planned(fit(header(100, 500), CONSERVATIVE, DEFAULT))
    assert plan.sent_size[1] == 500 and plan.sent_size[0] / 500 >= 0.4


def test_too_small_is_skipped_or_enlarged() -> None:
    skipped = fit(header(48, 48), CONSERVATIVE, DEFAULT)
    assert isinstance(skipped, Rejection) and str(skipped) == "too_small: 48x48 < 64 px"
    plan = planned(fit(header(48, 40), CONSERVATIVE, PrepareSettings(undersize=Undersize.ENLARGE)))
    assert min(plan.sent_size) >= 64 and plan.sent_size[0] / plan.sent_size[1] == pytest.approx(48 / 40, rel=0.03)


@pytest.mark.parametrize(("limits", "size"), [(CONSERVATIVE, (4000, 3000)), (CREATIVE, (1600, 1200)),
                                              (FAST, (2000, 1000)), (FAST, (1400, 1000))])
def test_too_large_is_downscaled_within_every_limit(limits: object, size: tuple[int, int]) -> None:
    from batch_upscaler.catalogue import InputLimits, check_image

    assert isinstance(limits, InputLimits)
    plan = planned(fit(header(*size), limits, DEFAULT))
    assert check_image(limits, *plan.sent_size) is None
    assert plan.sent_size[0] / plan.sent_size[1] == pytest.approx(size[0] / size[1], rel=0.01)
    assert plan.sent_size[0] * plan.sent_size[1] > 0.98 * min(limits.max_pixels, size[0] * size[1])
    skipped = fit(header(*size), limits, PrepareSettings(oversize=Oversize.SKIP))
    assert isinstance(skipped, Rejection) and skipped.code in ("too_many_pixels", "too_large")


@pytest.mark.parametrize(("fmt", "mode", "alpha", "reason"), [
    ("TIFF", "RGB", False, "format TIFF"), ("JPEG", "CMYK", False, "mode CMYK"), ("PNG", "I;16", False, "mode I;16"),
    ("PNG", "P", True, "alpha flattened"), ("PNG", "LA", True, "alpha flattened"), ("PNG", "P", False, "mode P"),
])
def test_formats_and_modes_that_need_conversion(fmt: str, mode: str, alpha: bool, reason: str) -> None:
    plan = planned(fit(header(200, 200, fmt, mode, alpha=alpha), CONSERVATIVE, DEFAULT))
    assert reason in plan.reasons


def test_alpha_kept_on_request_for_rgba_only() -> None:
    keep = PrepareSettings(alpha=AlphaPolicy.KEEP)
    assert planned(fit(header(200, 200, "PNG", "RGBA", alpha=True), CONSERVATIVE, keep)).as_is
    assert not planned(fit(header(200, 200, "PNG", "LA", alpha=True), CONSERVATIVE, keep)).as_is


def test_output_scale_accounts_for_padding_and_resizing() -> None:
    plan = planned(fit(header(1000, 200), CONSERVATIVE, DEFAULT))
    out_w = BUILTIN[ModelName.CONSERVATIVE].output_size(*plan.sent_size)[0]
    assert plan.output_scale(out_w) == pytest.approx(out_w / 1000, rel=0.01)
    fast = planned(fit(header(3000, 1000), FAST, DEFAULT))
    assert fast.output_scale(fast.sent_size[0] * 4) == pytest.approx(4 * fast.sent_size[0] / 3000)
