"""The emulator answers Service Quotas as aiobotocore's service-quotas client expects (JSON 1.1)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from batch_upscaler.emulator import EmulatorConfig, serve

from .helpers import CREDENTIALS, session


async def _quotas(config: EmulatorConfig) -> tuple[list[dict[str, object]], ClientError | None, int]:
    async with serve(config) as running, session().create_client(
            "service-quotas", region_name="us-west-2", endpoint_url=running.endpoint_url, **CREDENTIALS) as client:
        quotas: list[dict[str, object]] = []
        error = None
        try:
            async for page in client.get_paginator("list_service_quotas").paginate(ServiceCode="bedrock"):
                quotas += page["Quotas"]
            if quotas:
                one = await client.get_service_quota(ServiceCode="bedrock", QuotaCode=quotas[-1]["QuotaCode"])
                assert one["Quota"] == quotas[-1]
                with pytest.raises(client.exceptions.NoSuchResourceException):
                    await client.get_service_quota(ServiceCode="bedrock", QuotaCode="L-00000000")
        except ClientError as exc:
            error = exc
        return quotas, error, len(running.log.records())


@pytest.mark.asyncio
async def test_the_enforced_quota_is_published_page_by_page() -> None:
    quotas, error, invokes = await _quotas(EmulatorConfig(quota_rpm=600))
    assert error is None and invokes == 0  # Service Quotas calls are not invocations: never on the bill
    names = [q["QuotaName"] for q in quotas]
    assert "Cross-Region InvokeModel requests per minute for Stable Image Conservative Upscale" in names
    assert "On-demand InvokeModel requests per minute for Stable Image Fast Upscale" in names
    assert len(quotas) == 6 and {q["Value"] for q in quotas} == {600.0}  # 3 models × 2 kinds, over 3 pages
    assert all(str(q["QuotaArn"]).startswith("arn:aws:servicequotas:us-west-2:") for q in quotas)


@pytest.mark.asyncio
async def test_no_quota_unlimited_and_denied_when_told() -> None:
    assert (await _quotas(EmulatorConfig()))[:2] == ([], None)
    quotas, error, _ = await _quotas(EmulatorConfig(quota_rpm=60, quotas_denied=True))
    assert quotas == [] and error is not None
    assert error.response["Error"]["Code"] == "AccessDeniedException"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
