"""A real S3-compatible server on 127.0.0.1 for the tests: moto in server mode, and a fault-injecting
proxy in front of it (uploads that fail with a 503 N times, or are refused with AccessDenied; HEADs
held a while and counted, to see how many a client makes at once).

No aiobotocore or botocore internals are mocked: the runner talks HTTP to these servers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
from aiohttp import ClientSession, web
from moto.server import ThreadedMotoServer

CREDENTIALS = {"aws_access_key_id": "AKIDTESTTEST", "aws_secret_access_key": "test-secret"}


class MotoS3:
    """moto's S3 on an ephemeral port, and a boto3 client to arrange and inspect buckets."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        # moto keeps its state per process, not per server: start every test from an empty S3.
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST"))
        self.client: Any = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                                        **CREDENTIALS)

    def bucket(self, name: str) -> None:
        self.client.create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, body: bytes) -> str:
        return str(self.client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]).strip('"')

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def head(self, bucket: str, key: str) -> dict[str, Any]:
        return dict(self.client.head_object(Bucket=bucket, Key=key))

    def stop(self) -> None:
        self._server.stop()


@dataclass
class Faults:
    """What the proxy does to uploads (PUTs of objects) whose key contains ``match``."""

    match: str = ""
    fail_puts: int = 0  # this many such PUTs get a 503 SlowDown first
    deny_puts: bool = False  # every such PUT gets 403 AccessDenied
    puts_seen: list[str] = field(default_factory=list)
    hold_heads_s: float = 0.0  # every HEAD of an object is held this long before it is passed on
    heads_at_once: int = 0  # the most HEADs of objects the proxy held or passed on at the same time
    _heads_now: int = 0


class FaultyProxy:
    """A reverse proxy to moto that injects S3 faults into uploads (on its own thread and loop)."""

    def __init__(self, upstream: str, faults: Faults) -> None:
        self.upstream, self.faults = upstream, faults
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.endpoint_url = f"http://127.0.0.1:{self._port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = ClientSession(auto_decompress=False)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        is_upload = request.method == "PUT" and self.faults.match and self.faults.match in request.path
        if is_upload:
            self.faults.puts_seen.append(request.path)
            if self.faults.deny_puts:
                return _s3_error(403, "AccessDenied", "Access Denied")
            if self.faults.fail_puts > 0:
                self.faults.fail_puts -= 1
                return _s3_error(503, "SlowDown", "Please reduce your request rate.")
        if request.method == "HEAD" and request.path.strip("/").count("/"):
            return await self._head(request, body)
        return await self._forward(request, body)

    async def _head(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """A HEAD of an object, held a while so that HEADs made at the same time are seen together."""
        faults = self.faults
        faults._heads_now += 1
        faults.heads_at_once = max(faults.heads_at_once, faults._heads_now)
        try:
            await asyncio.sleep(faults.hold_heads_s)
            return await self._forward(request, body)
        finally:
            faults._heads_now -= 1

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + str(request.rel_url), data=body,
                                         headers=headers) as upstream:
            payload = await upstream.read()
            passed = {k: v for k, v in upstream.headers.items()
                      if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
            return web.Response(status=upstream.status, body=payload, headers=passed)

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._session.close()
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            "<RequestId>test</RequestId></Error>")
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    try:
        yield server
    finally:
        server.stop()
