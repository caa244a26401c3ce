"""The output folder appears whole or not at all: a temporary sibling folder renamed into place, a lock per --out,
stale temporaries of killed runs removed, and the signal handling around the steps that must not be cut.

No torch here: the CLI installs its signal handlers before the heavy imports.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import RlexportError

try:
    import fcntl
except ImportError:  # not POSIX: exports to one --out are not serialized
    fcntl = None

TMP_MARK = ".rlexport-tmp-"
LOCK_MARK = ".rlexport-lock"
log = logging.getLogger("rlexport")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- signals: the few steps that must not be cut in half ----
# The CLI turns SIGINT/SIGTERM into KeyboardInterrupt, except inside these sections, where it only records the
# signal: taking the --out lock (replayed right after, so the lock is released on the way out), the renames of
# a commit (stopping between them would hide the old export and not show the new one; it completes) and the
# removal of a temporary folder after a failure (an exception is already on its way out).
_critical = 0
deferred_signals: list[int] = []


@contextmanager
def uninterruptible(*, replay: bool = False):
    global _critical
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
    if replay and _critical == 0 and deferred_signals:
        sig = deferred_signals[-1]
        deferred_signals.clear()
        os.kill(os.getpid(), sig)  # now outside the section: the CLI's handler raises KeyboardInterrupt


def in_uninterruptible() -> bool:
    return _critical > 0


class OutLock:
    """One export at a time per --out: an flock on `.<out>.rlexport-lock` beside it, taken without waiting.

    The lock file is removed on release; a lock taken on a file that was removed meanwhile is retried, so two
    processes never both hold it. The kernel drops the lock of a killed process."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}{LOCK_MARK}"
        self.fd: int | None = None

    def __enter__(self) -> "OutLock":
        try:
            with uninterruptible(replay=True):
                self._acquire()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise output_error(self.out, e) from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f" (pid {holder})" if holder.isdigit() else ""
                    raise RlexportError("out-locked", f"another export{who} is writing this output folder now",
                                        file=self.out, hint="wait for it to finish, or choose another --out") from None
                log.warning("cannot lock %s (%s): concurrent exports to it are not detected", self.path, e.strerror)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                break
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder before us removed the file after we opened it: lock the new one
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still holding it (see the class doc)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def remove_stale(out: Path) -> list[Path]:
    """Remove what killed exports to `out` left (call it holding OutLock(out): then nothing else is writing)."""
    removed = []
    for p in stale_temporaries(out):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        log.warning("removed %s: the unfinished export of an interrupted run (the output was never touched)", p)
    return removed


def output_error(out: Path, e: OSError) -> RlexportError:
    """An OSError met while writing the export, as the error the user can act on."""
    where = e.filename if isinstance(e.filename, str) else out
    if where is not out and not os.path.abspath(where).startswith(os.path.join(os.path.abspath(out.parent), "")):
        return RlexportError("unreadable-file", f"cannot read: {e.strerror or e}", file=where,
                             hint="check the file and its permissions")  # an input copied into the export
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RlexportError("disk-full", f"the output disk is full or the file size limit was hit ({e.strerror})",
                             file=where, hint="free space (the export needs about the size of the model) or "
                                              "choose an --out on another disk; nothing was written")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RlexportError("out-unwritable", f"cannot write: {e.strerror}", file=where,
                             hint="choose an --out in a folder you can write to")
    return RlexportError("write-failed", f"could not write the export: {e.strerror or e}", file=where,
                         hint="check the output disk; nothing was written")


class AtomicFolder:
    """Write into a hidden temporary folder beside `out`, then rename it into place in one step.

    Holds OutLock(out) throughout, and removes the temporaries of killed exports to `out` first. On any exception
    (Ctrl-C included) the temporary folder, the lock and any parent folders it created are removed and `out` is
    untouched; OSErrors (disk full...) become RlexportErrors.
    """

    def __init__(self, out: Path, *, force: bool):
        self.out = out
        self.force = force
        self.tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lock = OutLock(out)
        self.made: list[Path] = []  # parents of out this export created, deepest first

    def __enter__(self) -> Path:
        try:
            for p in [self.out.parent, *self.out.parent.parents]:
                if p.exists():
                    break
                self.made.append(p)
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise output_error(self.out, e) from None
            self.lock.__enter__()
            remove_stale(self.out)
            try:
                self.tmp.mkdir()
            except OSError as e:
                raise output_error(self.out, e) from None
        except BaseException:
            self._undo()
            raise
        return self.tmp

    def _undo(self) -> None:
        with uninterruptible():
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.lock.__exit__()
            for p in self.made:
                try:
                    p.rmdir()
                except OSError:
                    break

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._undo()
            if isinstance(exc, OSError):
                raise output_error(self.out, exc) from None
            return
        try:
            with uninterruptible():
                self._commit()
        except OSError as e:
            self._undo()
            raise output_error(self.out, e) from None
        except BaseException:
            self._undo()
            raise
        self.lock.__exit__()

    def _commit(self) -> None:
        for p in self.tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(self.tmp)
        old = None
        if self.out.exists():
            if not self.force and any(self.out.iterdir()):
                raise RlexportError("out-exists", "output folder appeared during export", file=self.out,
                                    hint="another export wrote it; pass --force to replace it")
            old = self.out.parent / f".{self.out.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except OSError as e:
            if old is not None:
                os.rename(old, self.out)
            raise RlexportError("out-exists", f"could not move the export into place ({e.strerror})",
                                file=self.out, hint="another process is writing there; try again") from None
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def stale_temporaries(out: Path) -> Iterator[Path]:
    """Temporary folders left by killed exports to the same --out."""
    if out.parent.is_dir():
        yield from (p for p in out.parent.glob(f".{out.name}{TMP_MARK}*") if p.is_dir())
