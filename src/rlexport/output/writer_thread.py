"""The writer's one pwrite thread: computed blocks go to their offsets in the output files, in the order queued;
writeback starts as they land, and for exports much larger than memory the written pages leave the page cache."""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Callable

from . import diskio
from ..errors import RlexportError

# An export much larger than memory is written "behind": once DROP_BEHIND_LAG bytes newer than a range are written,
# the range is waited for and dropped from the page cache. Otherwise the output evicts everything else cached (the
# inputs being read included) and the kernel reclaims pages in the writers' time: 40% of a cold 7B export's CPU.
DROP_BEHIND_LAG = 256 << 20


class WriterThread:
    """The one thread that pwrites computed blocks (and starts their writeback). ext4 serializes writers to a file
    on its inode lock and the waiting ones spin (40% of the write CPU with four writers), and sync_file_range
    blocks on a full device queue: the compute threads should do neither. Items run in the order queued."""

    def __init__(self, drop_behind: bool = False) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.aborted = False
        self.drop_behind = drop_behind
        self.behind: deque = deque()  # (out, offset, n) written and not yet dropped from the cache
        self.behind_bytes = 0
        self.thread = threading.Thread(target=self._run, name="rlexport-pwrite", daemon=True)
        self.thread.start()

    def write(self, out, data: memoryview, offset: int, done: Callable[[], None]) -> None:
        if self.error is not None:
            done()
            raise RlexportError("write-failed", f"could not write the export ({self.error})",
                                hint="check free space and the disk") from self.error
        self.q.put((out, data, offset, done))

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the writer thread once everything queued before it is written."""
        self.q.put((None, fn, 0, None))

    def flush(self) -> None:
        ev = threading.Event()
        self.call(ev.set)
        ev.wait()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.aborted = True

    def _drop_oldest(self) -> None:
        out, offset, n = self.behind.popleft()
        self.behind_bytes -= n
        if out.fd is not None and not self.aborted:
            diskio.drop_cached(out.fd, offset, n)

    def forget(self, out) -> None:
        """Before `out` is fsynced and closed (writer thread): drop what is still pending for it."""
        keep = deque()
        while self.behind:
            item = self.behind.popleft()
            if item[0] is out:
                self.behind_bytes -= item[2]
            else:
                keep.append(item)
        self.behind = keep

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            out, data, offset, done = item
            try:
                if out is None:
                    data()
                elif self.error is None and not self.aborted:
                    diskio.pwrite_all(out.fd, data, offset)
                    diskio.start_writeback(out.fd, offset, len(data))
                    if self.drop_behind:
                        self.behind.append((out, offset, len(data)))
                        self.behind_bytes += len(data)
                        while self.behind_bytes > DROP_BEHIND_LAG:
                            self._drop_oldest()
            except BaseException as e:  # reported to the workers and to write_shards
                self.error = self.error or e
            finally:
                if done is not None:
                    done()
