"""The supervisor of `rlexport serve`: one engine child at a time, the served step, swaps and restarts."""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import RlexportError
from .engine import Engine, EngineError, child_env
from .pin import Pin
from .watch import Watch

log = logging.getLogger("rlexport.serve")
MIDDLEWARE = "rlexport.engines.follow.guard.Guard"


@dataclass
class Served:
    tag: str
    checkpoint: Path          # the folder as the trainer wrote it (what clients are told)
    args: dict                # vllm_args of the pinned copy
    shape: tuple              # serving.served()'s shape: equal shapes swap in place
    pin: Pin | None = None


@dataclass
class Options:
    base: str | None = None
    target: str = "policy"
    normalize: bool = True
    adapter: str | None = None
    tag: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    extra: tuple[str, ...] = ()
    poll: float = 2.0
    start_timeout: float = 1800.0


def control_host(host: str) -> str:
    """Where the supervisor reaches the server: loopback when it listens everywhere, else its own address."""
    if host in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def world_size(extra: tuple[str, ...]) -> int | None:
    """tensor x pipeline parallel size from the vLLM arguments: the workers a reload must reach (None with data
    parallelism, where each engine answers for its own workers)."""
    if any(a.partition("=")[0] in ("--data-parallel-size", "-dp") for a in extra):
        return None
    sizes = {"tensor": 1, "pipeline": 1}
    flags = {"--tensor-parallel-size": "tensor", "-tp": "tensor", "--pipeline-parallel-size": "pipeline",
             "-pp": "pipeline"}
    for i, a in enumerate(extra):
        key, _, value = a.partition("=")
        if key in flags:
            value = value or (extra[i + 1] if i + 1 < len(extra) else "1")
            sizes[flags[key]] = int(value) if value.isdigit() else 1
    return sizes["tensor"] * sizes["pipeline"]


def server_command(args: dict, opts: Options, name: str) -> list[str]:
    """The vLLM server command for vllm_args `args`: the guard as middleware, the model served as `name`."""
    from ..serving import serve_command
    extra = tuple(opts.extra) + ("--middleware", MIDDLEWARE)
    if not any(a.split("=")[0] == "--served-model-name" for a in extra):
        extra += ("--served-model-name", name)  # not the pinned copy's path, which changes per step
    return serve_command(args, host=opts.host, port=opts.port, extra=extra)


def read_folder(step_dir: Path, opts: Options) -> Path:
    """The folder of a step to read: a critic's role folder for --target value (verl)."""
    if opts.target == "value" and (step_dir / "critic").is_dir():
        return step_dir / "critic"
    return step_dir


def prepare(step, opts: Options, scratch: Path) -> Served:
    """Pin and plan a step (RlexportError: it cannot be served)."""
    from ..serving import served
    pin = Pin(step.path, scratch)
    try:
        args, shape = served(read_folder(pin.path, opts), base=opts.base, target=opts.target,
                             normalize=opts.normalize, adapter=opts.adapter)
    except RlexportError as e:  # name the trainer's file, not its pinned copy
        pin.close()
        mirror, real = str(pin.path), str(step.path)
        raise RlexportError(e.code, e.message.replace(mirror, real), hint=e.hint,
                            file=e.file.replace(mirror, real) if e.file else None) from None
    except BaseException:
        pin.close()
        raise
    return Served(step.tag, Path(step.path), args, shape, pin)


class Supervisor:
    def __init__(self, opts: Options, *, name: str, follow: Path | None):
        self.opts, self.follow, self.name = opts, follow, name
        self.scratch = Path(tempfile.mkdtemp(prefix="rlexport-serve-"))
        self.token = secrets.token_hex(24)
        self.state_file = self.scratch / "state.json"
        self.engine: Engine | None = None
        self.current: Served | None = None
        self.swaps = self.restarts = 0

    def command(self, s: Served) -> list[str]:
        return server_command(s.args, self.opts, self.name)

    def start(self, s: Served) -> None:
        from ..serving import shell_line
        cmd = self.command(s)
        log.info("starting vLLM on %s: %s", s.tag, shell_line(cmd))
        t0 = time.monotonic()
        self.engine = Engine(cmd, env=child_env(follow=self.follow is not None, token=self.token,
                                                state_file=str(self.state_file)),
                             control_host=control_host(self.opts.host), port=self.opts.port, token=self.token,
                             world_size=world_size(tuple(self.opts.extra)))
        self.engine.start()
        self.write_state(s)  # before it answers: the guard reads it from the first request on
        self.engine.wait_ready(self.opts.start_timeout)
        self.current = s
        log.info("serving %s at http://%s:%d (pid %d, ready in %.1f s)", s.tag, self.opts.host, self.opts.port,
                 self.engine.pid, time.monotonic() - t0)

    def restart(self, s: Served, why: str) -> None:
        log.warning("restarting the engine on %s: %s", s.tag, why)
        self.restarts += 1
        if self.engine is not None:
            self.engine.stop()
        self.start(s)

    def write_state(self, s: Served, *, seconds: float | None = None) -> None:
        state = {"tag": s.tag, "checkpoint": str(s.checkpoint), "follow": str(self.follow) if self.follow else None,
                 "server_pid": self.engine.pid if self.engine else None, "swaps": self.swaps,
                 "restarts": self.restarts, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "last_swap_seconds": seconds}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)

    def swap_to(self, new: Served) -> str | None:
        """Serve `new`; why not (it is then left for good: the engine serves the last good step again)."""
        old = self.current
        if new.shape != old.shape:
            try:
                self.restart(new, f"{new.tag} differs from {old.tag} in tensor names, shapes, dtypes or config")
            except EngineError as e:
                log.warning("%s: the engine did not start on it (%s)", new.tag, e)
                new.pin and new.pin.close()
                self.restart(old, "the last good checkpoint")
                return f"the engine did not start on it ({e})"
            self._retire(old)
            return None
        log.info("swap %s -> %s: started", old.tag, new.tag)
        t0 = time.monotonic()
        try:
            workers = self.engine.swap(new.args["model_loader_extra_config"])
            self.swaps += 1
            self.current = new
            self.write_state(new, seconds=time.monotonic() - t0)  # before resume: no gap
            self.engine.resume()
        except EngineError as e:
            log.warning("swap %s -> %s: failed (%s)", old.tag, new.tag, e)
            new.pin and new.pin.close()
            self.current = old
            self.restart(old, "the last good checkpoint, after the failed swap")
            return f"the in-place swap failed ({e}); {old.tag} is served again"
        log.info("swap %s -> %s: done in %.2f s (%d worker%s reloaded)", old.tag, new.tag, time.monotonic() - t0,
                 workers, "" if workers == 1 else "s")
        self._retire(old)
        return None

    def _retire(self, old: Served) -> None:
        if old.pin is not None and old is not self.current:
            old.pin.close()

    def first(self, watch: Watch) -> Served:
        """The newest complete step that reads (older ones when it does not); waits for one to exist."""
        waiting, errors = False, []
        while True:
            for step in watch.poll(None):
                try:
                    return prepare(step, self.opts, self.scratch)
                except RlexportError as e:
                    watch.refuse(step, e.line())
                    errors.append(e)
            if errors and not _any_pending(watch):
                raise errors[0]
            if not waiting and not watch.last_print:  # (a complete one seen once is settling, not awaited)
                log.info("waiting for a complete checkpoint in %s", self.follow)
                waiting = True
            time.sleep(self.opts.poll)

    def loop(self, watch: Watch) -> None:
        while True:
            time.sleep(self.opts.poll)
            if not self.engine.alive():
                self.restart(self.current, f"the vLLM server exited (code {self.engine.proc.returncode})")
                continue
            if watch is None:
                continue
            for step in watch.poll(self.current.tag):
                try:
                    new = prepare(step, self.opts, self.scratch)
                except RlexportError as e:
                    watch.refuse(step, e.line())
                    continue
                why = self.swap_to(new)
                if why:
                    watch.refuse(step, why)  # logged once; tried again only if its files change
                break

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        if self.current is not None and self.current.pin is not None:
            self.current.pin.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _any_pending(watch: Watch) -> bool:
    return bool(watch.last_print) and any(t not in watch.refused for t in watch.last_print)
