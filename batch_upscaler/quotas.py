"""Service Quotas: the applied requests-per-minute quota of the model this job invokes.

Its one job is one question to Service Quotas, where ``auto`` can start when no rate is
remembered. Bedrock names its quotas "Cross-Region InvokeModel requests per minute for <model>"
(an ``us.`` inference profile) and "On-demand InvokeModel requests per minute for <model>" (a
bare model id); the exact model titles are not verified (docs/bedrock-reference.md), so a name
matches when it starts with the kind and names the model's word ("conservative", "creative",
"fast") and "upscale". ``limits.quota_code`` names the quota exactly when matching is not enough.

A denied call (no ``servicequotas:ListServiceQuotas``/``GetServiceQuota``), an unreachable
endpoint or no match is fine: the answer is None, logged at debug, and ``auto`` starts cold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from batch_upscaler.settings import JobSettings

log = logging.getLogger(__name__)

SERVICE_CODE = "bedrock"
CROSS_REGION = "cross-region invokemodel requests per minute for"
ON_DEMAND = "on-demand invokemodel requests per minute for"
_CONFIG = AioConfig(connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 2, "mode": "standard"})


@dataclass(frozen=True)
class QuotaTarget:
    """Which quota to look for: the model's word, cross-region (an inference profile) or on-demand,
    and the exact code when configured."""

    model_word: str  # "conservative", "creative" or "fast"
    cross_region: bool
    code: str | None = None

    @classmethod
    def of(cls, settings: JobSettings) -> QuotaTarget:
        return cls(settings.model.name.value, settings.model_id != settings.model.base_id, settings.limits.quota_code)

    @property
    def kind(self) -> str:
        return CROSS_REGION if self.cross_region else ON_DEMAND


@dataclass(frozen=True)
class AppliedQuota:
    """One quota as Service Quotas applies it to this account and region."""

    rpm: float
    name: str
    code: str


def matches(name: str, target: QuotaTarget) -> bool:
    """Whether a quota name is the model's requests-per-minute quota of the kind that applies."""
    text = " ".join(name.lower().split())
    if not text.startswith(target.kind):
        return False
    model = text[len(target.kind):].split()
    return target.model_word in model and "upscale" in model


def pick(quotas: Iterable[Mapping[str, Any]], target: QuotaTarget) -> AppliedQuota | None:
    """The first listed quota that is the model's (by code when configured, else by name)."""
    for quota in quotas:
        name, code, value = str(quota.get("QuotaName", "")), str(quota.get("QuotaCode", "")), quota.get("Value")
        wanted = code == target.code if target.code else matches(name, target)
        if wanted and isinstance(value, int | float) and value > 0:
            return AppliedQuota(float(value), name, code)
    return None


async def applied_quota(settings: JobSettings, session: AioSession, endpoint_url: str | None,
                        credentials: tuple[str, str] | None = None) -> AppliedQuota | None:
    """The model's applied RPM quota, or None when it cannot be read (why is logged at debug)."""
    keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]} if credentials else {}
    target = QuotaTarget.of(settings)
    try:
        async with session.create_client("service-quotas", region_name=settings.region, endpoint_url=endpoint_url,
                                         config=_CONFIG, **keys) as client:
            if target.code:
                answer = await client.get_service_quota(ServiceCode=SERVICE_CODE, QuotaCode=target.code)
                found = pick([answer.get("Quota", {})], target)
            else:
                found = await _listed(client, target)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        log.debug("Service Quotas: %s (%s); auto starts without the applied quota",
                  error.get("Code", "error"), error.get("Message", ""))
        return None
    except (BotoCoreError, OSError, TimeoutError) as exc:
        log.debug("Service Quotas could not be asked (%s); auto starts without the applied quota", exc)
        return None
    if found is None:
        log.debug("Service Quotas lists no %r quota for %s in %s", target.kind, target.model_word, settings.region)
    return found


async def _listed(client: Any, target: QuotaTarget) -> AppliedQuota | None:
    paginator = client.get_paginator("list_service_quotas")
    async for page in paginator.paginate(ServiceCode=SERVICE_CODE):
        found = pick(page.get("Quotas", []), target)
        if found is not None:
            return found
    return None
