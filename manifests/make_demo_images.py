"""Regenerate the small sample images that manifests/demo.yaml upscales (committed; run to recreate)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "demo-images"
SAMPLES = {  # path: (size, format)
    "family/1970s/beach.jpg": ((320, 240), "JPEG"),
    "family/1970s/birthday.jpg": ((256, 256), "JPEG"),
    "family/garden.png": ((300, 200), "PNG"),
    "family/portrait.webp": ((200, 280), "WEBP"),
    "catalogue/teapot.tif": ((240, 240), "TIFF"),
    "catalogue/mug.JPG": ((280, 210), "JPEG"),
    "catalogue/icon-too-small.png": ((48, 48), "PNG"),  # below the 64 px minimum: skipped, with its reason
}


def draw(size: tuple[int, int], seed: int) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size)
    px = im.load()
    assert px is not None
    for y in range(h):
        for x in range(w):
            px[x, y] = ((x * 255 // w + seed * 40) % 256, (y * 255 // h) % 256, (seed * 70 + (x ^ y)) % 256)
    pen = ImageDraw.Draw(im)
    pen.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline=(255, 255, 255), width=3)
    pen.rectangle((4, 4, 20, 20), fill=(255, 0, 0))  # marks the top-left corner
    return im


def main() -> None:
    for seed, (rel, (size, fmt)) in enumerate(SAMPLES.items()):
        path = HERE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(size, seed).save(path, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))


if __name__ == "__main__":
    main()
