"""The server process: the port checked before the model loads, then uvicorn with one
app, or with ``--workers N`` processes that each build theirs (``app_from_env``)."""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict

from ..exceptions import FaceattrsError
from .app import PARENT_ENV, create_app
from .limits import ServeConfig

log = logging.getLogger(__name__)


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise FaceattrsError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Load the model, print the URL and serve until interrupted."""
    import uvicorn  # only to run the server: the app and its tests need only FastAPI

    if workers < 1:
        raise FaceattrsError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port < 65536:
        raise FaceattrsError(f"--port must be in 0..65535, got {port}")
    cfg.check()
    check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):  # said once the address is known good
        log.warning("listening on %s: reachable from other machines", host)
    shown = f"[{host}]" if ":" in host else host
    if workers == 1:
        app = create_app(cfg)
        print(f"faceattrs serve: http://{shown}:{port}/  (API docs: /docs)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    os.environ["FACEATTRS_SERVE"] = json.dumps(asdict(cfg))
    os.environ[PARENT_ENV] = str(os.getpid())  # the workers end with this process
    create_app(cfg)  # fail here, with one line, on a bad model rather than in every worker
    print(f"faceattrs serve: http://{shown}:{port}/  ({workers} workers)", flush=True)
    uvicorn.run(
        "faceattrs.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
    )
