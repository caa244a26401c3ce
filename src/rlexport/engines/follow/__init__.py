"""`rlexport serve`: vLLM's OpenAI server as a supervised child, and `--follow`: a training run's newest complete
checkpoint swapped into that running server in place.

The supervisor starts the server (engine.py), then, following a run folder, polls it (watch.py). A newer complete
step is pinned (pin.py: rotation cannot delete it mid-read) and planned here first: unreadable, it is logged and
never served; shaped differently from the served one (tensor names, shapes, dtypes, config overrides), it gets a
restart on it; else its weights are swapped in (vLLM's in-place reload, seconds). A swap that fails restarts the
engine on the last good step, still pinned. The control endpoints the swap uses are guarded (guard.py).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import sys
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


def _setup_log() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("rlexport serve %(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def control_host(host: str) -> str:
    """Where the supervisor reaches the server: loopback when it listens everywhere, else its own address."""
    if host in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def world_size(extra: tuple[str, ...]) -> int:
    """tensor x pipeline parallel size from the vLLM arguments: the workers a reload must reach."""
    sizes = {"tensor": 1, "pipeline": 1}
    flags = {"--tensor-parallel-size": "tensor", "-tp": "tensor", "--pipeline-parallel-size": "pipeline",
             "-pp": "pipeline"}
    for i, a in enumerate(extra):
        key, _, value = a.partition("=")
        if key in flags:
            value = value or (extra[i + 1] if i + 1 < len(extra) else "1")
            sizes[flags[key]] = int(value) if value.isdigit() else 1
    return sizes["tensor"] * sizes["pipeline"]


def _read_folder(pin: Pin, opts: Options) -> Path:
    """The folder of the pinned step to read: a critic's role folder for --target value (verl)."""
    if opts.target == "value" and (pin.path / "critic").is_dir():
        return pin.path / "critic"
    return pin.path


def prepare(step, opts: Options, scratch: Path) -> Served:
    """Pin and plan a step (RlexportError: it cannot be served)."""
    from ..serving import served
    pin = Pin(step.path, scratch)
    try:
        args, shape = served(_read_folder(pin, opts), base=opts.base, target=opts.target,
                             normalize=opts.normalize, adapter=opts.adapter)
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
        from ..serving import serve_command
        extra = tuple(self.opts.extra) + ("--middleware", MIDDLEWARE)
        if not any(a.split("=")[0] == "--served-model-name" for a in extra):
            extra += ("--served-model-name", self.name)  # not the pinned copy's path, which changes per step
        return serve_command(s.args, host=self.opts.host, port=self.opts.port, extra=extra)

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

    def swap_to(self, new: Served) -> None:
        old = self.current
        if new.shape != old.shape:
            try:
                self.restart(new, f"{new.tag} differs from {old.tag} in tensor names, shapes, dtypes or config")
            except EngineError as e:
                log.warning("%s: the engine did not start on it (%s)", new.tag, e)
                new.pin and new.pin.close()
                self.restart(old, "the last good checkpoint")
                return
            self._retire(old)
            return
        log.info("swap %s -> %s: started", old.tag, new.tag)
        t0 = time.monotonic()
        try:
            self.engine.swap(new.args["model_loader_extra_config"])
            self.swaps += 1
            self.current = new
            self.write_state(new, seconds=time.monotonic() - t0)  # before resume: no gap
            self.engine.resume()
        except EngineError as e:
            log.warning("swap %s -> %s: failed (%s)", old.tag, new.tag, e)
            new.pin and new.pin.close()
            self.current = old
            self.restart(old, "the last good checkpoint, after the failed swap")
            return
        log.info("swap %s -> %s: done in %.2f s", old.tag, new.tag, time.monotonic() - t0)
        self._retire(old)

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
                self.swap_to(new)
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


def serve(ckpt: str | Path, opts: Options, *, follow: bool = False, print_only: bool = False) -> int:
    """Run the server until SIGINT / SIGTERM (then stop everything started, exit 0); 1 when it cannot run."""
    from ..serving import served, serve_command, shell_line
    _setup_log()
    if not follow:  # an unreadable checkpoint fails here, in one line, before any engine starts
        args, shape = served(ckpt, base=opts.base, target=opts.target, normalize=opts.normalize,
                             adapter=opts.adapter, tag=opts.tag)
        if print_only:
            print(shell_line(serve_command(args, host=opts.host, port=opts.port, extra=tuple(opts.extra))))
            return 0
    sup = Supervisor(opts, name=str(ckpt), follow=Path(ckpt) if follow else None)
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if follow:
            watch = Watch(Path(ckpt))
            _check_run(Path(ckpt))
            s = sup.first(watch)
            if print_only:
                print(shell_line(sup.command(s)))
                return 0
        else:
            watch = None
            s = Served(opts.tag or Path(ckpt).name, Path(ckpt), args, shape)
        sup.start(s)
        sup.loop(watch)
    except KeyboardInterrupt:
        name = signal.Signals(received[-1]).name if received else "SIGINT"
        log.info("stopping (%s): the vLLM server and its engine processes", name)
        return 0
    except EngineError as e:
        log.error("%s", e)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.close()
        for s_, h in previous.items():
            signal.signal(s_, h)
    return 0


def _check_run(run: Path) -> None:
    """A single checkpoint passed to --follow is a mistake worth one line, not an endless wait."""
    from ...formats import detect, steps_of
    if steps_of(run):
        return
    try:
        fmt = detect(run)
    except RlexportError as e:
        if e.code == "missing-input":
            raise
        return  # not (yet) a recognisable run folder: wait for its first checkpoint
    raise RlexportError("not-a-run-folder", f"this is one {fmt.kind} checkpoint, not a training run folder with "
                        "checkpoints to follow", file=run, hint="serve it without --follow, or pass the run's "
                        "output folder")
