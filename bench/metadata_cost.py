"""What carrying metadata over costs per image: byte splicing (batch_upscaler.metadata) vs Pillow decode+re-encode.

Run from the repository root: ``python bench/metadata_cost.py``. The output stands in for a 4x upscale of a
778x778 photo (3112x3112, ~10 MB as PNG): a gradient plus noise upscaled from source resolution, so it compresses
like real upscaler output instead of to nothing.

A second table compares writing the spliced file from its parts (what the runner did before
answers were streamed, and still does for padded images) with joining them into one buffer first,
in CPU time (user + system, getrusage) per file, each file new. A third times the splice done while
the image arrives (``splicestream.StreamSplicer`` over 256 KiB pieces, what the runner does now)
against ``inject_with_report`` on the whole image; both give the same bytes.
"""

from __future__ import annotations

import io
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageChops, ImageCms
from PIL.ExifTags import IFD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from a checkout

from batch_upscaler.metadata import Injected, SourceMetadata, inject_with_report, prepare_exif, read_metadata
from batch_upscaler.splicestream import StreamSplicer
from batch_upscaler.storage.local import LocalOutputStore

SOURCE_SIZE, OUTPUT_SIZE = (778, 778), (3112, 3112)
FORMATS: dict[str, dict[str, object]] = {"PNG": {}, "JPEG": {"quality": 92}, "WEBP": {"quality": 90}}
SPLICE_RUNS, REENCODE_RUNS = 20, 3
WRITE_FILES, WRITE_ROUNDS = 24, 3  # files per measurement; rounds alternate the two ways, the median counts
PIECE = 256 * 1024  # what the runner's streamed reads hand the splicer (streaming.READ_SIZE)


def _photo(size: tuple[int, int], noise_size: tuple[int, int]) -> Image.Image:
    gradient = Image.linear_gradient("L").resize(size)
    bands = []
    for i, angle in enumerate((0, 90, 180)):
        noise = Image.effect_noise(noise_size, 8 + i).resize(size, Image.Resampling.BICUBIC)
        bands.append(ImageChops.add(gradient.rotate(angle), noise, scale=1.6, offset=-60))
    return Image.merge("RGB", bands)


def _source_jpeg(profile: bytes) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Canon", "EOS R5", 6
    exif.get_ifd(IFD.Exif)[0x9003] = "2021:06:05 14:03:59"
    exif.get_ifd(IFD.GPSInfo)[2] = (52.0, 31.0, 12.5)
    out = io.BytesIO()
    _photo(SOURCE_SIZE, SOURCE_SIZE).save(out, "JPEG", quality=92, exif=exif.tobytes(), icc_profile=profile)
    return out.getvalue()


def _median_ms(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _splice(source: bytes, output: bytes) -> Injected:
    meta = read_metadata(source)
    if meta.exif is not None:
        meta = replace(meta, exif=prepare_exif(meta.exif, strip_gps=True))
    result = inject_with_report(output, meta)
    assert not result.skipped, result.skipped
    return result


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write_cpu_ms(spliced: Injected, joined: bool) -> float:
    """CPU ms per file to write ``spliced`` as new files (atomically, fsynced, as the runner does)."""
    root = Path(tempfile.mkdtemp(prefix="metadata-cost-"))
    try:
        store = LocalOutputStore(root)
        start = _cpu_s()
        for i in range(WRITE_FILES):
            store.write_atomic(f"{i}.out", (spliced.data,) if joined else spliced.parts)
        return (_cpu_s() - start) / WRITE_FILES * 1000
    finally:
        shutil.rmtree(root)


def _write_table(spliced_by_format: dict[str, Injected]) -> None:
    print(f"\nwriting the spliced file, CPU ms per new file (median of {WRITE_ROUNDS} rounds of {WRITE_FILES})")
    print(f"{'format':<6} {'joined copy':>12} {'parts':>8} {'joined/parts':>13}")
    for fmt, spliced in spliced_by_format.items():
        joined, parts = [], []
        for _ in range(WRITE_ROUNDS):
            joined.append(_write_cpu_ms(spliced, joined=True))
            parts.append(_write_cpu_ms(spliced, joined=False))
        joined_ms, parts_ms = statistics.median(joined), statistics.median(parts)
        print(f"{fmt:<6} {joined_ms:>12.2f} {parts_ms:>8.2f} {joined_ms / parts_ms:>12.2f}x")


def _stream_splice(output: bytes, meta: SourceMetadata) -> list[bytes | memoryview]:
    splicer = StreamSplicer(meta)
    parts: list[bytes | memoryview] = []
    view = memoryview(output)  # pieces as views: the runner's come from the decoder, not from a copy
    for start in range(0, len(output), PIECE):
        parts += splicer.feed(view[start:start + PIECE])
    return parts + splicer.finish()


def _stream_table(outputs: dict[str, bytes], meta: SourceMetadata) -> None:
    print(f"\nsplicing while the image arrives ({PIECE // 1024} KiB pieces) vs on the whole image, "
          f"median of {SPLICE_RUNS}")
    print(f"{'format':<6} {'whole ms':>9} {'streamed ms':>12}")
    for fmt, output in outputs.items():
        assert b"".join(_stream_splice(output, meta)) == inject_with_report(output, meta).data
        whole_ms = _median_ms(SPLICE_RUNS, lambda: inject_with_report(output, meta))  # noqa: B023
        streamed_ms = _median_ms(SPLICE_RUNS, lambda: _stream_splice(output, meta))  # noqa: B023
        print(f"{fmt:<6} {whole_ms:>9.2f} {streamed_ms:>12.2f}")


def _reencode(fmt: str, output: bytes, meta: SourceMetadata) -> bytes:
    """The path we avoid: decode the whole output, then encode it again with the metadata attached."""
    with Image.open(io.BytesIO(output)) as im:
        im.load()
        out = io.BytesIO()
        exif = b"Exif\x00\x00" + meta.exif if meta.exif else b""  # Pillow's JPEG writer wants the APP1 prefix
        im.save(out, fmt, exif=exif, icc_profile=meta.icc_profile, **FORMATS[fmt])
        return out.getvalue()


def main() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = _source_jpeg(profile)
    picture = _photo(OUTPUT_SIZE, SOURCE_SIZE)
    meta = read_metadata(source)
    assert meta.exif is not None
    meta = replace(meta, exif=prepare_exif(meta.exif, strip_gps=True))
    print(f"output {OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]}, source {len(source) / 1e3:.0f} kB JPEG with EXIF + ICC; "
          f"median of {SPLICE_RUNS} splices / {REENCODE_RUNS} re-encodes\n")
    print(f"{'format':<6} {'output MB':>9} {'splice ms':>10} {'re-encode ms':>13} {'re-encode/splice':>17}")
    spliced_by_format, outputs = {}, {}
    for fmt, params in FORMATS.items():
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **params)
        output = outputs[fmt] = buffer.getvalue()
        spliced = spliced_by_format[fmt] = _splice(source, output)
        with Image.open(io.BytesIO(spliced.data)) as im:  # sanity: the spliced file carries the metadata
            assert im.info["icc_profile"] == profile and im.getexif()[0x010F] == "Canon"
        splice_ms = _median_ms(SPLICE_RUNS, lambda: _splice(source, output))  # noqa: B023 - used immediately
        reencode_ms = _median_ms(REENCODE_RUNS, lambda: _reencode(fmt, output, meta))  # noqa: B023
        print(f"{fmt:<6} {len(output) / 1e6:>9.1f} {splice_ms:>10.2f} {reencode_ms:>13.0f} "
              f"{reencode_ms / splice_ms:>16.0f}x")
    _write_table(spliced_by_format)
    _stream_table(outputs, meta)


if __name__ == "__main__":
    main()
