"""What checking a returned image's structure costs (batch_upscaler.imagecheck) against a full Pillow decode.

Run from the repository root: ``python bench/structure_cost.py``. The images stand in for a 4x upscale
of a 778x778 photo (3112x3112, ~9.7 MP): a gradient plus noise upscaled from source resolution, as in
bench/metadata_cost.py, and a worst case of pure per-pixel noise (a PNG that hardly compresses).

Times are the best of several runs (the least disturbed by the rest of the machine), on bytes in memory;
``check_file`` (the lenient check of a source file at scan time) runs on the same bytes written to a
temporary file, so it reads from the page cache.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from a checkout

from batch_upscaler import imagecheck
from bench.table import Column, Row, render

SIZE = (3112, 3112)
SOURCE = (778, 778)
CHECK_RUNS, DECODE_RUNS = 30, 3

COLUMNS = (
    Column("image", "image"), Column("mb", "MB", "{:.1f}"),
    Column("check_ms", "check_encoded ms", "{:.2f}"), Column("check_ms_mb", "ms/MB", "{:.3f}"),
    Column("zlib_ms", "with zlib CRC ms", "{:.2f}"),
    Column("file_ms", "check_file ms", "{:.2f}"),
    Column("decode_ms", "Pillow decode ms", "{:.0f}"), Column("decode_ms_mb", "ms/MB", "{:.1f}"),
    Column("ratio", "check/decode", "{:.2%}"),
)


def _photo() -> Image.Image:
    gradient = Image.linear_gradient("L").resize(SIZE)
    bands = []
    for i, angle in enumerate((0, 90, 180)):
        noise = Image.effect_noise(SOURCE, 8 + i).resize(SIZE, Image.Resampling.BICUBIC)
        bands.append(ImageChops.add(gradient.rotate(angle), noise, scale=1.6, offset=-60))
    return Image.merge("RGB", bands)


def _noise() -> Image.Image:
    return Image.merge("RGB", [Image.effect_noise(SIZE, 60 + 7 * i) for i in range(3)])


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _best_ms(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def _decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        im.load()


def _with_zlib_crc(data: bytes) -> float:
    """check_encoded's time with the standard library's CRC-32 in place of ISA-L's (the fallback)."""
    module = vars(imagecheck)  # the module's globals: what check_encoded looks crc32 up in
    fast, module["crc32"] = module["crc32"], zlib.crc32
    try:
        return _best_ms(CHECK_RUNS, lambda: imagecheck.check_encoded(data))
    finally:
        module["crc32"] = fast


def _row(name: str, data: bytes, folder: Path) -> Row:
    found = imagecheck.check_encoded(data)
    assert (found.width, found.height) == SIZE, found
    path = folder / name.replace(" ", "_")
    path.write_bytes(data)
    mb = len(data) / 1e6
    check_ms = _best_ms(CHECK_RUNS, lambda: imagecheck.check_encoded(data))
    decode_ms = _best_ms(DECODE_RUNS, lambda: _decode(data))
    return {"image": name, "mb": mb, "check_ms": check_ms, "check_ms_mb": check_ms / mb,
            "zlib_ms": _with_zlib_crc(data) if found.format == "PNG" else None,
            "file_ms": _best_ms(CHECK_RUNS, lambda: imagecheck.check_file(path, len(data))),
            "decode_ms": decode_ms, "decode_ms_mb": decode_ms / mb, "ratio": check_ms / decode_ms}


def main() -> None:
    photo, noise = _photo(), _noise()
    images = {
        "PNG photo-like": _encode(photo, "PNG"),
        "PNG noise": _encode(noise, "PNG"),
        "JPEG q95 photo-like": _encode(photo, "JPEG", quality=95),
        "JPEG q95 noise": _encode(noise, "JPEG", quality=95),
        "JPEG q95 progressive noise": _encode(noise, "JPEG", quality=95, progressive=True),
        "WebP q90 photo-like": _encode(photo, "WEBP", quality=90),
    }
    print(f"{SIZE[0]}x{SIZE[0]} images; best of {CHECK_RUNS} checks / {DECODE_RUNS} decodes; "
          f"CRC-32 from {vars(imagecheck)['crc32'].__module__}\n")
    with tempfile.TemporaryDirectory(prefix="structure-cost-") as folder:
        rows = [_row(name, data, Path(folder)) for name, data in images.items()]
    print(render(COLUMNS, rows))
    per_mb = [row["check_ms_mb"] for row in rows]
    print(f"\ncheck_encoded: median {statistics.median(per_mb):.3f} ms/MB, worst {max(per_mb):.3f} ms/MB")


if __name__ == "__main__":
    main()
