"""A local stand-in for Amazon Bedrock Runtime's ``InvokeModel`` for the Stability upscale models.

It speaks the real wire protocol, so an unmodified aiobotocore/boto3 ``bedrock-runtime`` client
pointed at ``endpoint_url`` (dummy credentials, any region) signs, sends, parses answers and
errors, and retries exactly as against AWS. Validation comes from :mod:`batch_upscaler.catalogue`;
throttling, faults and latency are configurable and deterministic (see :class:`EmulatorConfig`).

    async with serve(EmulatorConfig(output_max_pixels=256 * 256)) as emulator:
        ...  # create_client("bedrock-runtime", endpoint_url=emulator.endpoint_url, ...)
"""

from batch_upscaler.emulator.faults import FaultKind, FaultPicker, image_key
from batch_upscaler.emulator.host import EmulatorThread, RunningEmulator, run_forever, serve
from batch_upscaler.emulator.requestlog import RequestLog, RequestRecord
from batch_upscaler.emulator.server import create_app
from batch_upscaler.emulator.settings import EmulatorConfig

__all__ = [
    "EmulatorConfig",
    "EmulatorThread",
    "FaultKind",
    "FaultPicker",
    "RequestLog",
    "RequestRecord",
    "RunningEmulator",
    "create_app",
    "image_key",
    "run_forever",
    "serve",
]
