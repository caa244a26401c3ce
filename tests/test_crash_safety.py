"""Crash safety (issue 9): SIGKILL at random moments never leaves a half-written --out; the next run cleans up
what a killed run left (and says so); Ctrl-C and SIGTERM stop cleanly; two exports to one --out never mix.

Exports run as real processes (malformed.Cli forks them from a server that imported rlexport once, so a run
takes a fraction of a second and the kill lands inside the export, not inside `import torch`).
scripts/crash_torture.py runs the same loop 100+ times and prints where the kills landed.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from malformed import finish_export, leftovers, shared_cli, stop_export, tensor_digests, why_incomplete

KILL_RUNS = 30
SHARDS = "100KB"  # the tiny model in ~8 shards: more files, more moments to be killed in


@pytest.fixture(scope="session")
def cli():
    return shared_cli()


@pytest.fixture(scope="module")
def reference(cli, tiny_base, tmp_path_factory):
    """A complete export of the tiny base, its tensors, and how long an export takes here."""
    out = tmp_path_factory.mktemp("reference") / "out"
    args = ["export", tiny_base, "--out", out, "--max-shard-size", SHARDS, "-q"]
    times = []
    for _ in range(3):
        t = time.monotonic()
        r = cli.run(*args, *(["--force"] if out.exists() else []))
        times.append(time.monotonic() - t)
        assert r.rc == 0, r.stderr
    digests = tensor_digests(out)
    assert len(set(os.listdir(out))) > 8
    return {"args": ["export", tiny_base, "--max-shard-size", SHARDS, "-q"], "digests": digests,
            "seconds": sorted(times)[1]}


def _args(reference, out):
    a = list(reference["args"])
    return [*a[:2], "--out", out, *a[2:]]


def test_sigkill_at_random_moments(cli, reference, tmp_path):
    rng = random.Random(int(os.environ.get("RLEXPORT_KILL_SEED", "9")))
    out = tmp_path / "out"
    args = _args(reference, out)
    span = reference["seconds"] * 1.2
    seen = []
    for i in range(KILL_RUNS):
        stop = stop_export(cli, args, out, reference["digests"], rng.uniform(0, span))
        seen.append(stop)
        assert "Traceback" not in stop.stderr, stop.stderr
        assert stop.out in ("absent", "complete"), f"run {i}: killed after {stop.delay:.3f}s: {stop.problem}"
        if i % 10 == 9:  # the next run finishes: it removes what the killed runs left, and says so
            r, temps = finish_export(cli, args, out, reference["digests"])
            assert r.rc == 0, r.stderr
            for name in temps:
                assert re.search(rf"removed \S*{re.escape(name)}: the unfinished export", r.stderr), r.stderr
            assert leftovers(out) == []
            assert why_incomplete(out, reference["digests"]) is None
    landed = {s.out + ("+temp" if s.temps else "") for s in seen}
    assert any(s.temps or s.out == "absent" for s in seen), f"no kill landed before the commit: {landed}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_cleanly(cli, reference, tmp_path, sig):
    rng = random.Random(sig)
    span = reference["seconds"] * 1.2
    stopped, seen = 0, []
    for i in range(6):
        out = tmp_path / f"out{i}"
        # from 20 ms: the CLI's handlers are installed once main() runs (see docs/security.md on startup)
        stop = stop_export(cli, _args(reference, out), out, reference["digests"], 0.02 + rng.uniform(0, span),
                           sig)
        seen.append((round(stop.delay, 3), stop.rc, stop.stderr.strip()[-80:]))
        assert "Traceback" not in stop.stderr, stop.stderr
        assert stop.rc in (0, 128 + sig), stop.stderr
        assert stop.out in ("absent", "complete"), stop.problem
        assert leftovers(out) == [], "an interrupted export must remove its own temporary folder and lock"
        if stop.rc:
            stopped += 1
            last = stop.stderr.strip().splitlines()[-1]
            assert last.startswith(f"error[interrupted]: stopped by {signal.Signals(sig).name}"), stop.stderr
            assert stop.out == "absent"
    assert stopped, f"no signal arrived before the export finished: {seen}"


def test_interrupt_before_anything_is_written(cli, reference, tmp_path):
    """A Ctrl-C while the checkpoint is being read (a huge model): exit 130, one message, nothing created."""
    out = tmp_path / "deep" / "out"
    stop = stop_export(cli, _args(reference, out), out, reference["digests"], 0.02, signal.SIGINT)
    if stop.rc == 0:
        pytest.skip("the export finished within 20 ms")
    assert stop.rc == 130 and stop.out == "absent" and not (tmp_path / "deep").exists(), stop.stderr


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_two_exports_to_one_out(cli, tiny_base, tmp_path, force):
    """Started together with different dtypes: one wins, the other fails clearly, the folder is one of them."""
    refs = {}
    for dtype in ("bfloat16", "float32"):
        o = tmp_path / f"ref-{dtype}"
        assert cli.run("export", tiny_base, "--out", o, "--dtype", dtype, "-q").rc == 0
        refs[dtype] = tensor_digests(o)
    for trial in range(4):
        out = tmp_path / f"out{trial}"
        extra = ["--force"] if force else []
        runs = {dt: cli.start("export", tiny_base, "--out", out, "--dtype", dt, "-q", "--max-shard-size", SHARDS,
                              *extra) for dt in ("bfloat16", "float32")}
        results = {dt: cli.wait(r) for dt, r in runs.items()}
        ok = [dt for dt, r in results.items() if r.rc == 0]
        for dt, r in results.items():
            assert "Traceback" not in r.stderr
            if r.rc != 0:
                assert r.rc == 2 and re.match(r"error\[(out-locked|out-exists)\]: ", r.stderr.strip()), r.stderr
        assert ok, {dt: r.stderr for dt, r in results.items()}
        if not force:
            assert len(ok) == 1, "without --force exactly one may win"
        digests = tensor_digests(out)
        assert digests in (refs["bfloat16"], refs["float32"]), "the output mixes the two exports"
        assert why_incomplete(out, None) is None
        if len(ok) == 1:
            assert digests == refs[ok[0]]
        assert leftovers(out) == []


def test_leftover_temporaries_are_cleaned_with_a_message(cli, tiny_base, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.rlexport-tmp-{2**22 + 17}-deadbeef"
    old = tmp_path / ".out.rlexport-tmp-old-cafe1234"
    for d in (stale, old):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    # a leftover is never taken for the output: --out does not exist, so no --force is needed
    r = cli.run("export", tiny_base, "--out", out, "-q")
    assert r.rc == 0, r.stderr
    for d in (stale, old):
        assert not d.exists()
        assert f"removed {d}: the unfinished export of an interrupted run" in r.stderr
    assert leftovers(out) == [] and why_incomplete(out, None) is None


def test_a_live_export_is_not_cleaned_up_under_it(cli, tiny_base, tmp_path):
    """While another export holds the --out lock, a second one fails (out-locked) and touches nothing."""
    from rlexport.output.atomic import OutLock
    out = tmp_path / "out"
    live = tmp_path / f".out.rlexport-tmp-{os.getpid()}-0badcafe"
    live.mkdir()
    (live / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    with OutLock(out):
        r = cli.run("export", tiny_base, "--out", out)
        assert r.rc == 2 and r.stderr.strip().startswith("error[out-locked]: another export (pid "), r.stderr
        assert live.exists() and not out.exists()
    assert not (tmp_path / ".out.rlexport-lock").exists()


def test_library_keyboard_interrupt_leaves_nothing(tiny_base, tmp_path):
    """The same guarantee for `rlexport.export()` callers: a KeyboardInterrupt mid-write removes everything."""
    import rlexport
    out = tmp_path / "new" / "out"
    calls = []

    def on_bytes(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rlexport.export(tiny_base, out, max_shard_size=SHARDS, on_bytes=on_bytes)
    assert not (tmp_path / "new").exists()
