"""The gateway's HTTP client to its upstreams: aiohttp's, behind one small interface.

One pool of keep-alive connections; answers streamed chunk by chunk; bytes sent as given (no added
content type, no decompression); redirects never followed. aiohttp rather than httpx2: in one
interleaved run it relayed 3-4x the requests per second at concurrency 64 (httpcore's pool checks
every pooled connection's socket on each request, aiohttp's connector takes the last idle one for
the host; benchmarks/RESULTS.md, gateway).
Failures come out as :class:`UpstreamTimeout` (no byte within the timeout), :class:`UpstreamUnreachable`
(no answer: refused, reset before the headers) or :class:`UpstreamBroken` (the answer broke off).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from bpo_plugins.server.config import GatewayConfig


class UpstreamError(Exception):
    """The upstream failed; the message names the kind of failure, never a URL or header."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamUnreachable(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    pass


class UpstreamResponse:
    """An upstream answer whose headers arrived: status, headers (lower-case names), then its body."""

    def __init__(self, status_code: int, headers: dict[str, str], chunks: AsyncIterator[bytes], close: Any) -> None:
        self.status_code, self.headers, self._chunks, self._close = status_code, headers, chunks, close

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self._chunks])

    async def aclose(self) -> None:
        result = self._close()
        if asyncio.iscoroutine(result):
            await result


class AiohttpClient:
    def __init__(self, cfg: GatewayConfig) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        connector = aiohttp.TCPConnector(limit=cfg.max_connections, keepalive_timeout=2.0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.upstream_timeout_s),
            skip_auto_headers=("User-Agent", "Content-Type", "Accept", "Accept-Encoding"),
        )

    async def send(self, method: str, url: str, headers: dict[str, str], content: bytes) -> UpstreamResponse:
        from yarl import URL

        aiohttp = self._aiohttp
        try:
            response = await self.session.request(method, URL(url, encoded=True), headers=headers, data=content or None,
                                                  allow_redirects=False)
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        headers_out: dict[str, str] = {}
        for name, value in response.raw_headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers_out[key] = f"{headers_out[key]}, {text}" if key in headers_out else text

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.content.iter_any():
                    yield chunk
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                raise UpstreamTimeout("the upstream stalled") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise UpstreamBroken(type(exc).__name__) from None

        def close() -> None:  # a finished answer's connection goes back to the pool; an unfinished one is closed
            response.release() if response.content.at_eof() else response.close()

        return UpstreamResponse(response.status, headers_out, chunks(), close)

    async def aclose(self) -> None:
        await self.session.close()


def make_client(cfg: GatewayConfig) -> AiohttpClient:
    return AiohttpClient(cfg)
