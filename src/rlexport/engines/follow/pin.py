"""Pin a checkpoint folder so checkpoint rotation cannot delete it while the engine reads it (or may re-read it).

Trainers rotate checkpoints (verl `max_actor_ckpt_to_keep`, HF `save_total_limit`, Megatron/DeepSpeed scripts)
and the oldest is deleted when the next save *starts*: the step being served, or being swapped in, can vanish
mid-read, and a restart on the last good step needs its files again. A `Pin` opens every file of the folder
first (an open file's data stays on disk after an unlink) and builds a private mirror of the folder whose files
are links to `/proc/<pid>/fd/<n>`: opening such a link opens the held file itself, deleted or replaced or not,
from any process of the user (the engine reads the mirror). Closing the pin releases the files.

Where there is no /proc (not Linux) the mirror links to the files themselves: no protection, logged once.
"""
from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("rlexport.serve")
_PROC = Path("/proc/self/fd").is_dir()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass


class Pin:
    """`Pin(folder, scratch)`: `.path` is the mirror of `folder` (same name) to read instead; `.close()`."""

    def __init__(self, folder: Path, scratch: Path):
        folder = Path(folder)
        self.source = folder
        self.fds: list[int] = []
        self.root = Path(tempfile.mkdtemp(prefix="pin-", dir=scratch))
        self.path = self.root / folder.name
        _raise_fd_limit()
        if not _PROC:
            log.warning("no /proc here: checkpoint files are not pinned (rotation may delete them mid-read)")
        try:
            self._mirror(folder, self.path)
        except BaseException:
            self.close()
            raise

    def _mirror(self, src: Path, dst: Path) -> None:
        dst.mkdir()
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            target = dst / entry.name
            if entry.is_dir(follow_symlinks=True):
                self._mirror(Path(entry.path), target)
            elif entry.is_file(follow_symlinks=True):
                if _PROC:
                    fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    self.fds.append(fd)
                    os.symlink(f"/proc/{os.getpid()}/fd/{fd}", target)
                else:
                    os.symlink(os.path.abspath(entry.path), target)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        shutil.rmtree(self.root, ignore_errors=True)
