"""`rlexport serve`: vLLM's OpenAI server as a supervised child, and `--follow`: a training run's newest complete
checkpoint swapped into that running server in place.

The supervisor starts the server (engine.py), then, following a run folder, polls it (watch.py). A newer complete
step is pinned (pin.py: rotation cannot delete it mid-read) and planned here first: unreadable, it is logged and
never served; shaped differently from the served one (tensor names, shapes, dtypes, config overrides), it gets a
restart on it; else its weights are swapped in (vLLM's in-place reload, seconds). A swap that fails restarts the
engine on the last good step, still pinned. The control endpoints the swap uses are guarded (guard.py).
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from ...errors import RlexportError
from .engine import EngineError
from .supervisor import Options, Served, Supervisor, control_host, read_folder, server_command, world_size
from .watch import Watch

log = logging.getLogger("rlexport.serve")
__all__ = ["Options", "Served", "Supervisor", "EngineError", "control_host", "serve", "world_size"]


class _Stderr(logging.StreamHandler):
    """Always the current sys.stderr (a caller may have replaced it since the first serve)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_log() -> None:
    if not log.handlers:
        h = _Stderr()
        h.setFormatter(logging.Formatter("rlexport serve %(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def serve(ckpt: str | Path, opts: Options, *, follow: bool = False, print_only: bool = False) -> int:
    """Run the server until SIGINT / SIGTERM (then stop everything started, exit 0); 1 when it cannot run."""
    from ..serving import served, shell_line
    _setup_log()
    if not follow:  # an unreadable checkpoint fails here, in one line, before any engine starts
        args, shape = served(ckpt, base=opts.base, target=opts.target, normalize=opts.normalize,
                             adapter=opts.adapter, tag=opts.tag)
        if print_only:
            print(shell_line(server_command(args, opts, str(ckpt))))
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
            if print_only:  # the step as the trainer wrote it, not the pinned copy that ends with this process
                s.args = served(read_folder(s.checkpoint, opts), base=opts.base, target=opts.target,
                                normalize=opts.normalize, adapter=opts.adapter)[0]
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
