"""ASGI middleware `rlexport serve` adds to vLLM's server (`--middleware rlexport.engines.follow.guard.Guard`).

- The control endpoints (every route vLLM's dev mode adds: /pause, /resume, /collective_rpc, /reset_prefix_cache,
  /sleep, ...) answer 403 unless the request comes from this host and carries the supervisor's token. "This
  host": the peer address is a loopback address or the very address the connection arrived on (a local client
  connecting to the host's own IP has that IP as source; a remote one cannot complete a TCP handshake with it).
  The token, handed to the engine in the environment and never printed, keeps other local users and programs out
  too: collective_rpc runs any worker method. The routes are listed from vLLM itself, so a version adding one
  is covered.
- `GET /rlexport/checkpoint` says which checkpoint answers (the state file the supervisor rewrites after each
  swap), and every response carries it in an `x-rlexport-checkpoint` header.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os

TOKEN_ENV, STATE_ENV = "RLEXPORT_CONTROL_TOKEN", "RLEXPORT_STATE_FILE"
TOKEN_HEADER = b"x-rlexport-control"
STATE_PATH = "/rlexport/checkpoint"


def control_paths() -> frozenset[str]:
    """The paths vLLM registers only with VLLM_SERVER_DEV_MODE=1, found by registering them on a blank app."""
    from fastapi import FastAPI
    app = FastAPI()
    from vllm.entrypoints.serve import register_vllm_dev_api_routers
    register_vllm_dev_api_routers(app)
    try:
        from vllm.entrypoints.rl.factories import register_rl_api_routers
        register_rl_api_routers(app)
    except ImportError:  # older vLLM: /pause and /resume lived elsewhere; listed below
        pass
    paths = {getattr(r, "path", "") for r in app.routes} - {"", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                                                              "/redoc"}
    return frozenset(p.rstrip("/") for p in paths | {"/pause", "/resume", "/is_paused", "/collective_rpc",
                                                     "/reset_prefix_cache", "/sleep", "/wake_up"})


def is_local(client: str | None, server: str | None) -> bool:
    if not client:
        return False
    try:
        ip = ipaddress.ip_address(client.split("%")[0])
    except ValueError:
        return False  # a unix socket peer has no address: nothing to fall back on
    if ip.is_loopback or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback):
        return True
    return server is not None and client == server


class Guard:
    def __init__(self, app):
        self.app = app
        self.token = os.environ.get(TOKEN_ENV, "")
        self.state_file = os.environ.get(STATE_ENV)
        self.paths = control_paths()
        self._state = (None, b"{}", b"")

    def _read_state(self) -> tuple[bytes, bytes]:
        """(JSON body, header value), re-read when the file changed."""
        if not self.state_file:
            return b"{}", b""
        try:
            mtime = os.stat(self.state_file).st_mtime_ns
            if mtime != self._state[0]:
                body = open(self.state_file, "rb").read()
                tag = str(json.loads(body).get("tag", "")).encode("latin-1", "replace")
                self._state = (mtime, body, tag)
        except (OSError, ValueError):
            pass
        return self._state[1], self._state[2]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/") or "/"
        if path in self.paths:
            client = (scope.get("client") or (None,))[0]
            server = (scope.get("server") or (None,))[0]
            given = dict(scope.get("headers") or []).get(TOKEN_HEADER, b"")
            if not (is_local(client, server) and self.token and hmac.compare_digest(given, self.token.encode())):
                return await _respond(send, 403, b'{"error": "rlexport serve: control endpoints are for the '
                                                 b'supervisor on this host only"}')
        body, tag = self._read_state()
        if path == STATE_PATH and scope["method"] in ("GET", "HEAD"):
            return await _respond(send, 200, body)

        async def send_tagged(message):
            if message["type"] == "http.response.start" and tag:
                message = {**message, "headers": [*message.get("headers", []), (b"x-rlexport-checkpoint", tag)]}
            await send(message)
        return await self.app(scope, receive, send_tagged)


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
