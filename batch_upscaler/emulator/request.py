"""Turning an InvokeModel call (model id + body bytes) into a checked request, or a ValidationException.

The texts copy Bedrock's generic forms (reference sections 1.2 and 7): the on-demand throughput
message for bare ids, and JSON-schema style ``Malformed input request: #...`` messages.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pybase64

from batch_upscaler.catalogue import ModelName, ModelSpec, check_params, find_by_model_id
from batch_upscaler.emulator.faults import image_key
from batch_upscaler.emulator.protocol import (
    MSG_INVALID_MODEL,
    MSG_MALFORMED,
    Rejected,
    malformed_request,
    on_demand_not_supported,
    validation_error,
)

# ARN resource types that name a model id we can look up; others (provisioned, custom) are invalid here.
_ARN_RESOURCES = ("inference-profile", "foundation-model")


@dataclass(frozen=True)
class InvokeRequest:
    """A request body that passed the schema checks, with its image decoded from base64."""

    image: bytes
    image_sha256: str
    params: Mapping[str, Any]

    @property
    def output_format(self) -> str:
        return str(self.params.get("output_format", "png"))

    @property
    def seed(self) -> int:
        """The requested seed; 0 (or absent) asks for a random one."""
        return int(self.params.get("seed", 0))


def resolve_model(model_id: str, catalogue: Mapping[ModelName, ModelSpec]) -> ModelSpec:
    """The spec an inference-profile id (or ARN) names; bare base ids and unknown ids are rejected."""
    found = find_by_model_id(_strip_arn(model_id), catalogue)
    if found is None:
        raise validation_error(MSG_INVALID_MODEL)
    spec, prefix = found
    if prefix is None:
        raise on_demand_not_supported(spec.base_id)
    return spec


def check_body_size(size: int, spec: ModelSpec) -> None:
    if size > spec.limits.max_body_bytes:
        raise body_too_large(spec)


def body_too_large(spec: ModelSpec) -> Rejected:
    # The service model's blob length constraint, in the Coral validation wording.
    return validation_error(
        "1 validation error detected: Value at 'body' failed to satisfy constraint: "
        f"Member must have length less than or equal to {spec.limits.max_body_bytes}"
    )


def parse_body(body: bytes, spec: ModelSpec) -> InvokeRequest:
    """The checked request; raises Rejected (ValidationException) on the first kind of problem found."""
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise validation_error(MSG_MALFORMED) from exc
    if not isinstance(data, dict):
        raise validation_error(MSG_MALFORMED)
    params = {key: value for key, value in data.items() if key != "image"}
    problems = schema_problems(data.get("image"), "image" in data, params, spec)
    if problems:
        raise malformed_request(problems)
    try:
        image = pybase64.b64decode(data["image"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise validation_error(f"Invalid input image: not_base64: {exc}") from exc
    return InvokeRequest(image, image_key(image), params)


def schema_problems(image: object, has_image: bool, params: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    """Schema problems in Bedrock's order: missing keys, extraneous keys, then bad values."""
    missing = [] if has_image else ["image"]
    extraneous: list[str] = []
    invalid: list[tuple[str, str]] = []
    if has_image and not isinstance(image, str):
        invalid.append(("image", f"must be a string, got {type(image).__name__}"))
    for name, why in check_params(spec, params):
        if name not in spec.param_index:
            extraneous.append(name)
        elif name not in params:
            missing.append(name)
        else:
            invalid.append((name, why))
    return ([f"#: required key [{name}] not found" for name in missing]
            + [f"#: extraneous key [{name}] is not permitted" for name in extraneous]
            + [f"#/{name}: {why}" for name, why in invalid])


def _strip_arn(model_id: str) -> str:
    """``arn:aws:bedrock:<region>:<account>:inference-profile/<id>`` -> ``<id>``; other ids unchanged."""
    if not model_id.startswith("arn:"):
        return model_id
    parts = model_id.split(":", 5)
    if len(parts) < 6:
        return model_id
    kind, _, name = parts[5].partition("/")
    return name if kind in _ARN_RESOURCES and name else model_id
