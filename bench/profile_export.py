"""One `rlexport export` in-process, with the writer's stages timed: where does the time go?

    python bench/profile_export.py ADAPTER BASE OUT RESULT.json

Stages are timed per call on each writer thread, exclusive of nested stages (a merge's time excludes the read
it does), and summed over threads: compare them with write wall x workers.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

t_start = time.perf_counter()
import rlexport  # noqa: E402
from rlexport import stream  # noqa: E402
from rlexport.output import diskio, writer  # noqa: E402
from rlexport.lora import streamed  # noqa: E402
from rlexport.export import plan, write  # noqa: E402
from rlexport.formats import open_checkpoint  # noqa: E402

t_import = time.perf_counter() - t_start
totals: dict[str, float] = defaultdict(float)
cpu: dict[str, float] = defaultdict(float)
lock = threading.Lock()
local = threading.local()


def timed(stage: str, fn):
    def wrapper(*a, **kw):
        stack = getattr(local, "stack", None)
        if stack is None:
            stack = local.stack = []
        stack.append([0.0, 0.0])  # wall and CPU time spent in nested timed calls
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            dt, dc = time.perf_counter() - t, time.thread_time() - c
            nested = stack.pop()
            if stack:
                stack[-1][0] += dt
                stack[-1][1] += dc
            with lock:
                totals[stage] += dt - nested[0]
                cpu[stage] += dc - nested[1]
    return wrapper


def main(adapter: str, base: str, out: str, result: str) -> None:
    stream._FileRows.rows = timed("read (pread)", stream._FileRows.rows)
    streamed._Rows.rows = timed("merge (bf16->f32, W + B@A*s)", streamed._Rows.rows)
    stream._CastRows.rows = timed("check + cast", stream._CastRows.rows)
    streamed._Rows.__init__ = timed("load LoRA factors", streamed._Rows.__init__)
    diskio.pwrite_all = timed("write (pwrite)", diskio.pwrite_all)
    writer._arena = timed("wait for a free arena (writer behind)", writer._arena)
    writer._Opened.get = timed("open tensor (LoRA factors, fd)", writer._Opened.get)
    writer._rows_job = timed("block job (rest: Python glue)", writer._rows_job)
    diskio.start_writeback = timed("start writeback", diskio.start_writeback)
    diskio.copy_range = timed("copy_file_range", diskio.copy_range)
    fsyncs = []
    finish = diskio.OutFile.finish

    def timed_finish(self, *a):
        t = time.perf_counter()
        finish(self, *a)
        fsyncs.append((t, time.perf_counter()))
    diskio.OutFile.finish = timed("fsync", timed_finish)

    t = time.perf_counter()
    src = open_checkpoint(adapter, base=base)
    p = plan(src)
    t_plan = time.perf_counter() - t
    write_start = time.perf_counter()
    marks = {}
    orig = writer.write_shards

    def ws(*a, **kw):
        marks["start"] = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            marks["end"] = time.perf_counter()
    writer.write_shards = ws
    sys.modules["rlexport.export"].write_shards = ws  # (rlexport.export the attribute is the function)
    write(p, Path(out))
    total = time.perf_counter() - t_start
    ru = resource.getrusage(resource.RUSAGE_SELF)
    wall = marks["end"] - marks["start"]
    last_fsync = max((e - s for s, e in fsyncs), default=0.0)
    res = {"import": t_import, "plan": t_plan, "write_wall": wall, "total": total,
           "after_write": time.perf_counter() - marks["end"], "before_write": marks["start"] - write_start,
           "fsync_tail": last_fsync, "workers": writer.default_workers(), "cpus": len(os.sched_getaffinity(0)),
           "cpu_seconds": ru.ru_utime + ru.ru_stime, "user": ru.ru_utime, "sys": ru.ru_stime,
           "stages": dict(totals), "stages_cpu": dict(cpu), "version": rlexport.__version__}
    Path(result).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:5])
