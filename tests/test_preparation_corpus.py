"""A messy archive, generated here, run end to end: what the emulator received and what came out.

Each case asserts the request (format, size, parameters) from the emulator's request log and the
output (upright via a marker pixel, dimensions, EXIF date taken and ICC bytes), or the exact skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageCms, features

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread, RequestRecord
from tests.conftest import manifest_doc

EmulatorFactory = Callable[..., EmulatorThread]
MARKER = (255, 0, 0)
DATE_TAKEN = "2004:07:14 10:31:07"
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
# exif_transpose's operation per orientation; the stored image is its inverse applied to the upright one.
INVERSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def upright(width: int = 120, height: int = 80) -> Image.Image:
    """Blue with a red block in the top-left corner: the marker that proves orientation."""
    im = Image.new("RGB", (width, height), (20, 40, 200))
    im.paste(MARKER, (0, 0, width // 5, height // 5))
    return im


def exif_bytes(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0x9003] = DATE_TAKEN
    return exif.tobytes()


def save(im: Image.Image, path: Path, fmt: str, **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **options)
    return path


def marker_is_top_left(path: Path) -> bool:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        corner = rgb.getpixel((w // 20, h // 20))
        opposite = rgb.getpixel((w - 1 - w // 20, h - 1 - h // 20))
    assert isinstance(corner, tuple) and isinstance(opposite, tuple)
    return corner[0] > 200 and corner[2] < 80 and opposite[2] > 150


def requests_by_image(emulator: EmulatorThread) -> dict[str, list[RequestRecord]]:
    found: dict[str, list[RequestRecord]] = {}
    for record in emulator.records():
        found.setdefault(record.image_sha256 or "", []).append(record)
    return found


def manifest_with_model(tmp_path: Path, emulator: EmulatorThread, model: dict[str, Any], name: str,
                        output_dir: str = "out") -> Path:
    doc = manifest_doc(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url}, name=name,
                       output={"dir": output_dir})
    doc["model"] = model
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_job(tmp_path: Path, write_manifest: Callable[..., Path], emulator: EmulatorThread, *,
            expect: int = 0, **overrides: Any) -> dict[str, dict[str, Any]]:
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url}, **overrides)
    assert main(["run", str(manifest)]) == expect
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    return {item["source"]: item | {"_report": report} for item in report["items"]}


def test_all_eight_orientations_come_out_upright_with_metadata(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    base = upright()
    for orientation, transpose in INVERSE.items():
        stored = base.transpose(transpose) if transpose is not None else base
        save(stored, tmp_path / f"photos/o{orientation}.jpg", "JPEG", quality=95,
             exif=exif_bytes(orientation), icc_profile=ICC)
    emulator = emulator_factory(output_max_pixels=480 * 320)
    items = run_job(tmp_path, write_manifest, emulator)
    for orientation in INVERSE:
        item = items[f"photos/o{orientation}.jpg"]
        out = Path(item["output"])
        assert item["status"] == "succeeded" and item["input_size"] == [120, 80]
        assert marker_is_top_left(out), f"orientation {orientation} is not upright"
        with Image.open(out) as im:
            assert im.width / im.height == pytest.approx(1.5, rel=0.02)
            assert im.info.get("icc_profile") == ICC
            exif = im.getexif()
            assert exif.get(0x0112, 1) == 1
            assert exif.get_ifd(0x8769).get(0x9003) == DATE_TAKEN
            assert exif.get(0x010F) == "TestCam"
        assert os.stat(out).st_mtime_ns == os.stat(tmp_path / f"photos/o{orientation}.jpg").st_mtime_ns
    sent = requests_by_image(emulator)
    as_is = hashlib.sha256((tmp_path / "photos/o1.jpg").read_bytes()).hexdigest()
    assert sent[as_is][0].image_format == "jpeg"  # a valid upright JPEG goes byte-for-byte
    for records in sent.values():
        assert records[0].input_size == (120, 80)
        assert records[0].params == {"prompt": "a sharp photo", "output_format": "png"}


def colour_and_format_corpus(root: Path) -> dict[str, str]:
    """Files in awkward colour modes and containers -> the format the emulator must receive."""
    base = upright(100, 100)
    save(base.convert("CMYK"), root / "cmyk.jpg", "JPEG", quality=95)
    save(Image.linear_gradient("L").resize((100, 100)).convert("I").point(lambda v: v * 257).convert("I;16"),
         root / "gray16.png", "PNG")
    save(Image.linear_gradient("L").resize((100, 100)).convert("I").point(lambda v: v * 257).convert("I;16"),
         root / "gray16t.tif", "TIFF")
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    save(palette, root / "palette.png", "PNG", transparency=0)
    save(base.convert("LA"), root / "la.png", "PNG")
    save(base.convert("L"), root / "gray.jpg", "JPEG", quality=95)
    frames = [base, base.transpose(Image.Transpose.ROTATE_180)]
    save(frames[0], root / "anim.gif", "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save(base, root / "plain.bmp", "BMP")
    save(base, root / "plain.webp", "WEBP", quality=95)
    expected = {"cmyk.jpg": "jpeg", "gray16.png": "png", "gray16t.tif": "png", "palette.png": "png",
                "la.png": "png", "gray.jpg": "jpeg", "anim.gif": "png", "plain.bmp": "png", "plain.webp": "webp"}
    if features.check("avif"):  # built into Pillow >= 11.2; HEIC needs the optional pillow-heif
        save(base, root / "phone.avif", "AVIF", quality=90)
        expected["phone.avif"] = "png"
    return expected


def test_colour_modes_and_containers_become_valid_requests(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    expected = colour_and_format_corpus(tmp_path / "photos")
    emulator = emulator_factory(output_max_pixels=400 * 400)
    items = run_job(tmp_path, write_manifest, emulator, output={"format": "same"})
    sent = requests_by_image(emulator)
    # Different sources may convert to identical images (the GIF's first frame and the BMP do).
    assert len(emulator.records()) == len(expected)
    assert {r.image_format for r in emulator.records()} == {"jpeg", "png", "webp"}
    assert all(r.status == 200 and r.input_size == (100, 100) for r in emulator.records())
    for name, fmt in expected.items():
        item = items[f"photos/{name}"]
        assert item["status"] == "succeeded", item
        assert item["sent_size"] == [100, 100]
        out = Path(item["output"])
        with Image.open(out) as im:
            im.load()
            assert im.size == (400, 400)
            assert im.mode in ("RGB", "RGBA", "L")
        if name in ("plain.webp", "gray.jpg"):
            digest = hashlib.sha256((tmp_path / "photos" / name).read_bytes()).hexdigest()
            assert sent[digest][0].image_format == fmt  # already valid: sent unchanged
    # output.format: same -> the closest accepted format to each source's
    assert Path(items["photos/plain.webp"]["output"]).suffix == ".webp"
    assert Path(items["photos/cmyk.jpg"]["output"]).suffix == ".jpg"
    assert Path(items["photos/plain.bmp"]["output"]).suffix == ".png"
    for name in ("palette.png", "la.png"):  # transparency flattened on the background colour
        with Image.open(items[f"photos/{name}"]["output"]) as im:
            assert im.mode == "RGB"


def test_oversize_undersize_and_panorama(tmp_path: Path, write_manifest: Callable[..., Path],
                                         emulator_factory: EmulatorFactory) -> None:
    save(upright(3300, 3000), tmp_path / "photos/huge.png", "PNG", compress_level=1)  # 9.9 MP > 9,437,184
    save(upright(50, 50), tmp_path / "photos/tiny.png", "PNG")
    save(upright(1000, 200), tmp_path / "photos/pano.png", "PNG")  # 5:1
    emulator = emulator_factory(output_max_pixels=600 * 600)
    items = run_job(tmp_path, write_manifest, emulator)
    huge = items["photos/huge.png"]
    # Downscaled to fit Conservative's 9.4 MP, it would come back ~9.7 MP: smaller than the source on
    # both sides. Refused before paying (creative and fast downscales gain: see the next tests).
    assert (huge["status"], huge["error_code"], huge["input_size"]) == ("skipped", "no_gain", [3300, 3000])
    assert huge["error_message"].startswith("no_gain: output 32") and "≤ source 3300x3000" in huge["error_message"]
    assert items["photos/tiny.png"]["status"] == "skipped"
    assert items["photos/tiny.png"]["error_message"] == "too_small: 50x50 < 64 px"
    pano = items["photos/pano.png"]
    assert pano["sent_size"][0] / pano["sent_size"][1] == pytest.approx(2.5, rel=0.02)
    with Image.open(pano["output"]) as im:
        assert im.width / im.height == pytest.approx(5.0, rel=0.03)  # the padding was cropped off
    assert marker_is_top_left(Path(pano["output"]))
    received = {r.input_size for r in emulator.records()}
    assert tuple(pano["sent_size"]) in received and len(received) == 1


def test_skip_and_enlarge_policies(tmp_path: Path, write_manifest: Callable[..., Path],
                                   emulator_factory: EmulatorFactory) -> None:
    save(upright(3300, 3000), tmp_path / "photos/huge.png", "PNG", compress_level=1)
    save(upright(50, 40), tmp_path / "photos/tiny.png", "PNG")
    save(upright(1000, 200), tmp_path / "photos/pano.png", "PNG")
    emulator = emulator_factory(output_max_pixels=300 * 300)
    items = run_job(tmp_path, write_manifest, emulator,
                    prepare={"oversize": "skip", "undersize": "enlarge", "aspect": "skip"})
    assert items["photos/huge.png"]["error_message"] == "too_many_pixels: 3300x3000 = 9900000 px > 9437184 px"
    assert items["photos/pano.png"]["error_code"] == "aspect_ratio"
    tiny = items["photos/tiny.png"]
    assert tiny["status"] == "succeeded" and min(tiny["sent_size"]) >= 64


@pytest.mark.parametrize(("model", "big", "limit_px"), [("creative", (1200, 1000), 1_048_576),
                                                        ("fast", (1600, 400), 1_048_576)])
def test_oversize_for_creative_and_fast(tmp_path: Path, write_manifest: Callable[..., Path],
                                        emulator_factory: EmulatorFactory, model: str, big: tuple[int, int],
                                        limit_px: int) -> None:
    save(upright(*big), tmp_path / "photos/big.png", "PNG")
    emulator = emulator_factory(output_max_pixels=200 * 200)
    model_doc = {"name": model} | ({"prompt": "x"} if model != "fast" else {})
    manifest = manifest_with_model(tmp_path, emulator, model_doc, "job")
    assert main(["run", str(manifest)]) == 0
    (record,) = emulator.records()
    assert record.status == 200 and record.input_size is not None
    w, h = record.input_size
    assert w * h <= limit_px and (model != "fast" or max(w, h) <= 1536)


def test_duplicates_are_invoked_once_and_every_path_gets_its_output(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    data = io.BytesIO()
    upright(150, 100).save(data, format="PNG")
    for rel in ("photos/a/one.png", "photos/b/two.png", "photos/c/three.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data.getvalue())
    emulator = emulator_factory(output_max_pixels=300 * 200)
    items = run_job(tmp_path, write_manifest, emulator, limits={"concurrency": 3})
    assert len(emulator.records()) == 1
    outputs = [Path(items[f"photos/{rel}"]["output"]) for rel in ("a/one.png", "b/two.png", "c/three.png")]
    assert len({p.read_bytes() for p in outputs}) == 1 and all(p.exists() for p in outputs)
    report = next(iter(items.values()))["_report"]
    assert report["requests_saved_by_dedup"] == 2 and report["requests"] == 1


def test_body_over_the_cap_is_reencoded_to_fit(tmp_path: Path, write_manifest: Callable[..., Path],
                                               emulator_factory: EmulatorFactory) -> None:
    noise = Image.frombytes("RGB", (3000, 3000), os.urandom(3000 * 3000 * 3))
    path = save(noise, tmp_path / "photos/noise.png", "PNG", compress_level=0)
    assert path.stat().st_size * 4 / 3 > 25_000_000
    emulator = emulator_factory(output_max_pixels=100 * 100)
    items = run_job(tmp_path, write_manifest, emulator)
    assert items["photos/noise.png"]["status"] == "succeeded"
    (record,) = emulator.records()
    assert record.status == 200 and record.image_format == "jpeg"


def test_each_model_with_its_own_parameters(tmp_path: Path, write_manifest: Callable[..., Path],
                                            emulator_factory: EmulatorFactory) -> None:
    save(upright(200, 160), tmp_path / "photos/p.png", "PNG")
    emulator = emulator_factory(output_max_pixels=None)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "conservative", "prompt": "p", "creativity": 0.2, "seed": 7, "negative_prompt": "blur"},
         "us.stability.stable-conservative-upscale-v1:0"),
        ({"name": "creative", "prompt": "p", "creativity": 0.4, "style_preset": "photographic"},
         "us.stability.stable-creative-upscale-v1:0"),
        ({"name": "fast"}, "us.stability.stable-fast-upscale-v1:0"),
    ]
    for n, (model, model_id) in enumerate(cases):
        path = manifest_with_model(tmp_path, emulator, model, f"job{n}", output_dir=f"out{n}")
        assert main(["run", str(path)]) == 0
        record = emulator.records()[-1]
        assert record.model_id == model_id and record.status == 200
        expected_params = {k: v for k, v in model.items() if k != "name"} | {"output_format": "png"}
        assert record.params == expected_params
    fast_out = tmp_path / "out2/p.png"
    with Image.open(fast_out) as im:
        assert im.size == (800, 640)
    with Image.open(tmp_path / "out0/p.png") as im:
        assert im.width * im.height == pytest.approx(3112 * 3112, rel=0.01)
