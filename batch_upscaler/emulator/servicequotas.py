"""The Service Quotas calls the runner makes (``ListServiceQuotas``, ``GetServiceQuota``), answered
with the emulator's own quota, so ``auto``'s quota lookup runs the real client path offline.

Wire protocol: AWS JSON 1.1, ``POST /`` with ``X-Amz-Target: ServiceQuotasV20190624.<Operation>``;
errors carry ``__type`` in the body (botocore's json parser reads it). With ``quota_rpm`` set the
emulator publishes, per model, the two request quotas Bedrock names "Cross-Region InvokeModel
requests per minute for <model>" and "On-demand InvokeModel requests per minute for <model>" at
that value (Bedrock's real names are not verified: see docs/bedrock-reference.md). Unlimited
emulators publish no Bedrock quota; ``quotas_denied`` answers AccessDeniedException, as an IAM
policy without ``servicequotas:ListServiceQuotas`` does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from batch_upscaler.emulator import protocol
from batch_upscaler.emulator.settings import EmulatorConfig

TARGET_PREFIX = "ServiceQuotasV20190624."
CONTENT_TYPE = "application/x-amz-json-1.1"
SERVICE_CODE = "bedrock"
PAGE_SIZE = 2  # small pages: the client must follow NextToken, as with the real, long list
QUOTA_KINDS = ("Cross-Region InvokeModel requests per minute for", "On-demand InvokeModel requests per minute for")
MODEL_TITLES = {"conservative": "Stable Image Conservative Upscale", "creative": "Stable Image Creative Upscale",
                "fast": "Stable Image Fast Upscale"}


def published(config: EmulatorConfig, region: str) -> list[dict[str, Any]]:
    """Every Bedrock quota this emulator publishes, in a stable order."""
    if config.quota_rpm is None:
        return []
    quotas = []
    for model in config.catalogue:
        for kind in QUOTA_KINDS:
            name = f"{kind} {MODEL_TITLES.get(str(model), str(model))}"
            code = "L-" + hashlib.sha256(name.encode()).hexdigest()[:8].upper()
            quotas.append({"ServiceCode": SERVICE_CODE, "ServiceName": "Amazon Bedrock", "QuotaCode": code,
                           "QuotaName": name, "Value": float(config.quota_rpm), "Unit": "None",
                           "Adjustable": True, "GlobalQuota": False,
                           "QuotaArn": f"arn:aws:servicequotas:{region}:000000000000:{SERVICE_CODE}/{code}"})
    return quotas


async def handle(request: web.Request, config: EmulatorConfig, region: str) -> web.Response:
    """One Service Quotas call (any other ``POST /`` is an unknown operation)."""
    operation = request.headers.get("X-Amz-Target", "").removeprefix(TARGET_PREFIX)
    if config.quotas_denied:
        return _error("AccessDeniedException", "User is not authorized to perform: servicequotas:" + operation)
    try:
        args = json.loads(await request.read() or b"{}")
    except ValueError:
        return _error("IllegalArgumentException", "the request body is not JSON")
    if args.get("ServiceCode") != SERVICE_CODE:
        return _error("NoSuchResourceException", f"no quotas for service {args.get('ServiceCode')!r}")
    quotas = published(config, region)
    if operation == "ListServiceQuotas":
        return _list(quotas, args)
    if operation == "GetServiceQuota":
        match = [q for q in quotas if q["QuotaCode"] == args.get("QuotaCode")]
        return _ok({"Quota": match[0]}) if match else _error("NoSuchResourceException", "no such quota code")
    return _error("UnknownOperationException", f"Unknown operation {operation or '(no X-Amz-Target)'}")


def _list(quotas: list[dict[str, Any]], args: Mapping[str, Any]) -> web.Response:
    token = args.get("NextToken")
    start = int(token) if isinstance(token, str) and token.isdigit() else 0
    page = quotas[start:start + PAGE_SIZE]
    body: dict[str, Any] = {"Quotas": page}
    if start + PAGE_SIZE < len(quotas):
        body["NextToken"] = str(start + PAGE_SIZE)
    return _ok(body)


def _ok(body: Mapping[str, Any]) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), content_type=CONTENT_TYPE,
                        headers={protocol.REQUEST_ID_HEADER: protocol.new_request_id()})


def _error(code: str, message: str) -> web.Response:
    return web.Response(status=400, body=json.dumps({"__type": code, "message": message}).encode(),
                        content_type=CONTENT_TYPE, headers={protocol.REQUEST_ID_HEADER: protocol.new_request_id()})
