"""The vLLM server as a child process: start, wait until it answers, swap weights in place, stop.

The child gets its own process group (and, on Linux, SIGTERM when the supervisor dies), so stopping it stops
the API server, the engine core and every worker it started: nothing is orphaned.

A swap is vLLM's own in-place reload, driven through its dev endpoints: pause (waiting for running requests),
point the `rlexport` loader at the new checkpoint (`update_config` on every worker), `reload_weights` (every
worker: collective_rpc answers once per worker, which is checked), reset the prefix cache (KV blocks computed
with the old weights would otherwise be reused), resume.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from .guard import STATE_ENV, TOKEN_ENV, TOKEN_HEADER

log = logging.getLogger("rlexport.serve")


class EngineError(Exception):
    pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Engine:
    def __init__(self, cmd: list[str], *, env: dict, control_host: str, port: int, token: str,
                 world_size: int | None = None):
        self.cmd, self.env, self.token, self.world_size = cmd, env, token, world_size
        self.base = f"http://{control_host}:{port}"
        self.proc: subprocess.Popen | None = None

    # -- process --
    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        """Until GET /health answers 200; EngineError when the child exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineError(f"the vLLM server exited with code {self.proc.returncode} while starting")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1.0)
        raise EngineError(f"the vLLM server did not answer /health within {timeout:.0f} s")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `grace` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(pgid):
                break
            deadline = time.monotonic() + wait  # the server is gone; give its engine processes the same time
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.proc = None

    # -- control --
    def _post(self, path: str, body: dict | None = None, timeout: float = 60.0):
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"content-type": "application/json",
                                              TOKEN_HEADER.decode(): self.token})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise EngineError(f"POST {path}: HTTP {e.code}: {_first(detail)}") from None
        except OSError as e:
            raise EngineError(f"POST {path}: {e}") from None
        return json.loads(text) if text.strip() else None

    def swap(self, loader_options: dict, *, reload_timeout: float = 3600.0) -> int:
        """Load the checkpoint `loader_options` names into the running engine; the number of workers that
        reloaded. EngineError: the engine may hold a half-loaded model and must be restarted."""
        self._post("/pause?mode=wait", timeout=reload_timeout)
        self._post("/collective_rpc", {"method": "update_config",
                                       "args": [{"load_config": {"model_loader_extra_config": loader_options}}]})
        out = self._post("/collective_rpc", {"method": "reload_weights", "timeout": reload_timeout},
                         timeout=reload_timeout + 60)
        results = (out or {}).get("results") if isinstance(out, dict) else None
        if self.world_size and results is not None and len(results) != self.world_size:
            raise EngineError(f"reload_weights answered from {len(results)} workers, expected {self.world_size}")
        for _ in range(50):  # fails (success: false) while a request still holds KV blocks
            if (self._post("/reset_prefix_cache") or {}).get("success", True):
                break
            time.sleep(0.1)
        else:
            raise EngineError("the prefix cache could not be reset")
        return len(results) if results is not None else 0

    def resume(self) -> None:
        self._post("/resume")


def _first(text: str) -> str:
    try:
        obj = json.loads(text)
        text = str(obj.get("error") or obj.get("detail") or obj.get("message") or obj) if isinstance(obj, dict) \
            else text
    except ValueError:
        pass
    return (text.strip().splitlines() or [""])[-1][:300]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def child_env(*, follow: bool, token: str, state_file: str) -> dict:
    env = {**os.environ, TOKEN_ENV: token, STATE_ENV: state_file}
    if follow:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # the pause / collective_rpc / reset_prefix_cache routes (guarded)
    return env
