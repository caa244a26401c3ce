"""Which checkpoint of a run folder to serve next: the newest one its trainer marked complete (the format's
`steps()` hook), whose files did not change between two polls (LLaMA-Factory's PPO checkpoints have no marker;
for the others it costs one poll), newer than the one served, and not already refused in this very state.
Each incomplete or refused step is logged once, in one line."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("rlexport.serve")


def order(tag: str) -> tuple:
    """Natural order of step tags: global_step_10 after global_step_9."""
    return tuple(int(n) for n in re.findall(r"\d+", tag)) or (0,)


def fingerprint(folder: Path) -> tuple:
    """(relative path, size, mtime) of every file under `folder`: any write, rename or deletion changes it."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out.append((os.path.relpath(p, folder), st.st_size, st.st_mtime_ns))
    return tuple(out)


class Watch:
    def __init__(self, run: Path):
        self.run = Path(run)
        self.last_print: dict[str, tuple] = {}   # tag -> fingerprint at the previous poll
        self.refused: dict[str, tuple] = {}      # tag -> fingerprint it was refused in
        self.announced: set[tuple[str, str]] = set()

    def poll(self, served: str | None) -> list:
        """The complete, settled, not refused steps newer than `served`, newest first."""
        from ...formats import steps_of
        steps = steps_of(self.run)
        ready, prints = [], {}
        for step in steps:
            if served is not None and order(step.tag) <= order(served):
                continue
            if not step.complete:
                self._once(step.tag, f"{step.tag}: not complete, not served ({step.why or 'no completion marker'})")
                continue
            fp = fingerprint(step.path)
            prints[step.tag] = fp
            if self.refused.get(step.tag) == fp:
                continue
            if self.last_print.get(step.tag) != fp:
                continue  # still changing, or seen for the first time: look again at the next poll
            ready.append(step)
        self.last_print = prints
        return sorted(ready, key=lambda s: order(s.tag), reverse=True)

    def refuse(self, step, why: str) -> None:
        self.refused[step.tag] = self.last_print.get(step.tag) or fingerprint(step.path)
        log.warning("%s: not served: %s", step.tag, why)

    def _once(self, tag: str, line: str) -> None:
        if (tag, line) not in self.announced:
            self.announced.add((tag, line))
            log.info("%s", line)
