"""``bpo proxy --workers N``: N gateway processes on one port, under uvicorn's process manager.

The parent binds the socket, then uvicorn's :class:`~uvicorn.supervisors.Multiprocess` starts the
workers (a fresh interpreter each), restarts any that die, and on SIGTERM or Ctrl-C stops them, each
draining its in-flight requests and streams first (``drain_timeout_s``). Each worker rebuilds the
settings from the same file, flags and environment (so keys never travel on a command line) and
loads the optimizer once; ``--optimizer-base-url`` lets every worker share one optimizer server.
``/metrics`` adds up every worker's samples through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from typing import Any

from bpo_plugins.server.config import GatewayConfig, load_config
from bpo_plugins.server.metrics import MULTIPROC_ENV

SETTINGS_ENV = "_BPO_PROXY_WORKER_SETTINGS"


def relay_only(config: GatewayConfig) -> GatewayConfig:
    """``--no-rewrite``: every treatment relays (DRPO alignments still apply)."""
    return replace(config, default=replace(config.default, rewrite=False),
                   models=tuple((p, replace(t, rewrite=False)) for p, t in config.models))


def settings_from(path: str | None, overrides: dict[str, Any], no_rewrite: bool) -> GatewayConfig:
    config = load_config(path, **overrides)
    return relay_only(config) if no_rewrite else config


def worker_app() -> Any:
    """uvicorn's app factory in each worker: the gateway the parent's command line describes."""
    from bpo_plugins.server.gateway import build_gateway_app

    settings = json.loads(os.environ[SETTINGS_ENV])
    return build_gateway_app(settings_from(settings["path"], settings["overrides"], settings["no_rewrite"]))


def run_workers(path: str | None, overrides: dict[str, Any], no_rewrite: bool, host: str, port: int,
                announce: Any = None) -> None:
    """Serve with ``workers`` processes until SIGTERM or Ctrl-C; ``announce(port)`` once the socket listens."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = settings_from(path, overrides, no_rewrite)
    os.environ[SETTINGS_ENV] = json.dumps({"path": path, "overrides": overrides, "no_rewrite": no_rewrite})
    own_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_dir = tempfile.mkdtemp(prefix="bpo-proxy-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    try:
        uv = uvicorn.Config("bpo_plugins.server.workers:worker_app", factory=True, host=host, port=port,
                            workers=config.workers, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(config.drain_timeout_s), timeout_keep_alive=75)
        sock = uv.bind_socket()
        sock.listen(uv.backlog)  # connections queue from now on, while the workers start
        if announce is not None:
            announce(sock.getsockname()[1])
        Multiprocess(uv, sockets=[sock]).run()
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
