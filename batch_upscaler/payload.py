"""Turn a source file into everything one request needs: the JSON body, its plan and the metadata to carry.

The source's bytes are read once (by the storage edge): they give the content hash (for change
detection and de-duplication), the header (re-probed, since the file may have changed since the
scan), the prepared image and the metadata. The body is assembled around the base64 text instead
of passing a multi-megabyte string through ``json.dumps``, which would scan it for characters to
escape (base64 has none).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pybase64

from batch_upscaler.catalogue import MAX_BODY_BYTES
from batch_upscaler.finishing import carried_metadata
from batch_upscaler.fitting import Fit, fit
from batch_upscaler.metadata import SourceMetadata, read_metadata
from batch_upscaler.prepare import Prepared, PrepareError, prepare_image
from batch_upscaler.probe import ProbeError, read_header, truncation
from batch_upscaler.scrub import Scrub
from batch_upscaler.settings import JobSettings

_COLOUR_CONVERTING_MODES = frozenset({"CMYK", "YCbCr", "LAB"})


class PayloadError(Exception):
    """The file cannot be turned into a request; ``code`` is the recorded reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_sha256: str  # of the source file's bytes, as read for sending
    plan: Fit
    sent: Prepared
    metadata: SourceMetadata  # what the output will carry
    output_format: str = "png"  # the format asked of the model for this image (png | jpeg | webp)


def build_body(image: bytes, params: Mapping[str, Any]) -> bytes:
    """``{"image": "<base64>", **params}`` as compact JSON bytes."""
    rest = json.dumps(dict(params), separators=(",", ":"))
    tail = b"}" if rest == "{}" else b"," + rest[1:].encode()
    return b'{"image":"' + pybase64.b64encode(image) + b'"' + tail


def build_payload(data: bytes, settings: JobSettings) -> Payload:
    """Build the request for a source's bytes (read by the storage edge); raises PayloadError with a reason code."""
    try:
        header = read_header(io.BytesIO(data))
    except ProbeError as exc:
        raise PayloadError(exc.refusal.rejection.code, exc.refusal.rejection.detail) from None
    cut = truncation(data, header.pil_format)
    if cut is not None:
        raise PayloadError("truncated", cut)
    plan = fit(header, settings.model.limits, settings.prepare, settings.model.output_size)
    if not isinstance(plan, Fit):
        raise PayloadError(plan.code, plan.detail)
    try:
        sent = prepare_image(data, header, plan, settings.model.limits, settings.prepare,
                             Scrub.for_settings(settings.metadata))
    except (PrepareError, OSError, ValueError, SyntaxError) as exc:
        code = "truncated" if "truncated" in str(exc) else "cannot_prepare"
        raise PayloadError(code, str(exc)) from None
    output_format = settings.output_format.for_source(header.pil_format).value
    params = {**settings.params, "output_format": output_format}
    body = build_body(sent.image, params)
    if len(body) > MAX_BODY_BYTES:  # prepare_image keeps under the cap; this guards the JSON overhead
        raise PayloadError("body_too_large", f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    metadata = carried_metadata(read_metadata(data), settings.metadata,
                                colour_converted=header.mode in _COLOUR_CONVERTING_MODES,
                                keep_orientation=not settings.prepare.apply_orientation)
    return Payload(body, hashlib.sha256(data).hexdigest(), plan, sent, metadata, output_format)
