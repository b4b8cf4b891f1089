"""The fake model's Pillow work, without the server."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from batch_upscaler.catalogue import BUILTIN, ModelName
from batch_upscaler.emulator.upscale import ImageRejected, capped, upscale

from .helpers import make_image

CONSERVATIVE = BUILTIN[ModelName.CONSERVATIVE]
FAST = BUILTIN[ModelName.FAST]


def test_capped_keeps_aspect_and_stays_under_the_cap() -> None:
    assert capped((400, 240), None) == (400, 240)
    assert capped((400, 240), 10**6) == (400, 240)
    width, height = capped((3112, 1556), 256 * 256)
    assert width * height <= 256 * 256 and abs(width / height - 2) < 0.02
    assert capped((5000, 10), 100) == (100, 1)
    assert capped((10, 5000), 100) == (1, 100)


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format(fmt: str, pil: str) -> None:
    result = upscale(make_image(100, 60, "WEBP"), FAST, fmt, max_pixels=None)
    picture = Image.open(io.BytesIO(result.data))
    assert (picture.format, picture.size) == (pil, (400, 240))
    assert (result.input_size, result.output_size) == ((100, 60), (400, 240))


def test_alpha_survives_png_and_is_dropped_for_jpeg() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (64, 64), (1, 2, 3, 128)).save(out, "PNG")
    assert Image.open(io.BytesIO(upscale(out.getvalue(), FAST, "png").data)).mode == "RGBA"
    assert Image.open(io.BytesIO(upscale(out.getvalue(), FAST, "jpeg").data)).mode == "RGB"


def test_palette_image_is_accepted() -> None:
    out = io.BytesIO()
    Image.new("P", (64, 64), 3).save(out, "PNG")
    assert upscale(out.getvalue(), FAST, "png").output_size == (256, 256)


@pytest.mark.parametrize(("data", "fragment"), [
    (make_image(64, 64, "GIF"), "unsupported_format: gif"),
    (b"definitely not an image", "undecodable"),
    (make_image(200, 200)[:200], "undecodable"),
    (make_image(63, 200), "too_small"),
    (make_image(400, 100), "aspect_ratio"),
])
def test_rejections(data: bytes, fragment: str) -> None:
    with pytest.raises(ImageRejected, match=fragment) as caught:
        upscale(data, CONSERVATIVE, "png")
    assert caught.value.message.startswith("Invalid input image:")


def test_fast_side_limit() -> None:
    with pytest.raises(ImageRejected, match="too_large"):
        upscale(make_image(1600, 40), FAST, "png")
