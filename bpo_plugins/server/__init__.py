"""bpo-plugins' servers, on one ASGI stack (Starlette, uvicorn; aiohttp's client to upstreams).

- :mod:`bpo_plugins.server.local`: ``bpo serve``, a local model behind an OpenAI-compatible API;
- :mod:`bpo_plugins.server.gateway`: ``bpo proxy``, BPO (and DRPO) in front of any OpenAI-compatible upstream.

Nothing here is imported by ``import bpo_plugins``; the servers need the ``[server]`` extra.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def uvicorn_server(app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", drain_s: float = 5) -> Any:
    import uvicorn

    # No access log: request lines are noise for a local helper, and the gateway counts requests in metrics.
    # Keep idle client connections 75 s (nginx's default), well past the 5-20 s that clients and
    # load balancers keep theirs, so a client never reuses a connection the server just closed.
    # On SIGTERM in-flight requests and streams get drain_s seconds to finish.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(drain_s), timeout_keep_alive=75)
    return uvicorn.Server(config)


def run_loop(main: Any) -> Any:
    """``asyncio.run(main)`` on uvloop where it is installed (``uvicorn[standard]`` brings it), as uvicorn
    itself runs: its event loop costs the gateway less per request than asyncio's own."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def bound_port(server: Any) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])


def serve_announced(app: Any, host: str, port: int, announce: Callable[[int], None], *, drain_s: float = 5) -> None:
    """Serve ``app`` under uvicorn (on uvloop where installed) until it stops; once it listens, call
    ``announce`` with the bound port (port 0 picks a free one), for a supervisor or a test to read."""
    import asyncio

    server = uvicorn_server(app, host, port, drain_s=drain_s)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            announce(bound_port(server))
        await task

    run_loop(run())


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, str]:
    """Run ``app`` under uvicorn on a daemon thread; return the server and its ``/v1`` base URL once it listens."""
    import time

    server = uvicorn_server(app, host, port)
    threading.Thread(target=server.run, name="bpo-serve", daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start within 60 s")
        time.sleep(0.01)
    return server, f"http://{host}:{bound_port(server)}/v1"
