"""Malformed inputs for the bad-input tests, generated on the fly (no binaries are kept in the repo).

Two parts:

* `CASES`: the corpus. Each case builds one broken checkpoint (from the good tiny model and adapter of
  tests/factories.py) in a folder of its own and names the `error[code]` rlexport must answer with.
* `Cli`: runs `rlexport` as a real process, fast. Importing torch costs seconds, so a server process imports
  the CLI once and forks a fresh child per command; the child sets argv/env/cwd/limits and calls the same
  `rlexport.cli.main()` that `python -m rlexport` calls. Exit status, stdout and stderr are the child's own,
  and the child can be SIGKILLed/SIGINTed like any process (tests/test_crash_safety.py does).

Also `tree_state()`: every file's bytes and mtime under a folder, to prove the input was not touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ERROR_LINE = r"^error\[(?P<code>[a-z0-9-]+)\]: (?P<msg>.+?) \((?P<file>.+)\): (?P<fix>\S.*)$"


# ---------------------------------------------------------------------------------------------------------
# Running the CLI
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    rc: int            # exit code; -N when killed by signal N
    stdout: str
    stderr: str
    pid: int = 0
    maxrss_mb: float = 0.0  # the child's peak resident memory (pages shared with the server included)


@dataclass
class Running:
    pid: int
    out_file: Path
    err_file: Path


class Cli:
    """`rlexport ARGS...` in a forked child of a server that imported rlexport once (see module doc)."""

    def __init__(self, env: dict | None = None):
        self.logs = Path(tempfile.mkdtemp(prefix="rlexport-cli-"))
        server_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
                      **(env or {})}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=server_env,
                                     start_new_session=True)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"CLI server did not start: {ready!r}")
        self.n = 0

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("CLI server died")
        return json.loads(line)

    def start(self, *args, cwd=None, env: dict | None = None, fsize: int | None = None,
              user: int | None = None) -> Running:
        """Start `rlexport ARGS`; env adds to the server's environment; fsize sets RLIMIT_FSIZE (bytes);
        user runs it as that uid (root only: permissions do not stop root)."""
        self.n += 1
        out, err = self.logs / f"{self.n}.out", self.logs / f"{self.n}.err"
        rep = self._ask({"op": "start", "argv": [str(a) for a in args], "cwd": str(cwd) if cwd else None,
                         "env": env or {}, "fsize": fsize, "user": user, "out": str(out), "err": str(err)})
        return Running(rep["pid"], out, err)

    def wait(self, r: Running, timeout: float = 120) -> Result:
        rep = self._ask({"op": "wait", "pid": r.pid, "timeout": timeout})
        if rep.get("timeout"):
            os.kill(r.pid, signal.SIGKILL)
            self._ask({"op": "wait", "pid": r.pid, "timeout": 30})
            raise TimeoutError(f"rlexport {r.pid} ran over {timeout}s; stderr: {_read(r.err_file)[-2000:]}")
        return Result(rep["rc"], _read(r.out_file), _read(r.err_file), r.pid, rep.get("maxrss_mb", 0.0))

    def poll(self, r: Running) -> int | None:
        return self._ask({"op": "poll", "pid": r.pid}).get("rc")

    def run(self, *args, timeout: float = 120, **kw) -> Result:
        return self.wait(self.start(*args, **kw), timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
        shutil.rmtree(self.logs, ignore_errors=True)


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="backslashreplace")
    except FileNotFoundError:
        return ""


def _serve() -> None:
    """The server loop: one JSON request per stdin line, one JSON reply per stdout line."""
    # Import everything an export touches now, so a child starts exporting at once. No torch op runs here:
    # a forked child must not inherit a started OpenMP pool.
    import rlexport.cli  # noqa: F401
    import rlexport.export  # noqa: F401
    import rlexport.formats.hf  # noqa: F401
    import rlexport.formats.peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    try:
        import rlexport.heads  # noqa: F401
    except ImportError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to pytest must not kill the server mid-request
    proto_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # nothing else may write into the protocol channel
    proto_out.write("ready\n")
    proto_out.flush()
    done: dict[int, int] = {}
    peak: dict[int, float] = {}

    def reap(pid: int, block: bool) -> int | None:
        if pid in done:
            return done[pid]
        got, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
        if got == 0:
            return None
        done[pid] = os.waitstatus_to_exitcode(status)
        peak[pid] = usage.ru_maxrss / 1024  # KiB on Linux
        return done[pid]

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _child(req, devnull, w)  # never returns
            os.close(w)
            os.read(r, 1)  # the child is about to call main() (or died): delays are measured from there
            os.close(r)
            rep = {"pid": pid}
        elif req["op"] == "poll":
            rep = {"rc": reap(req["pid"], False)}
        else:  # wait
            deadline = time.monotonic() + req["timeout"]
            rc = reap(req["pid"], False)
            while rc is None and time.monotonic() < deadline:
                time.sleep(0.003)
                rc = reap(req["pid"], False)
            rep = {"rc": rc, "maxrss_mb": peak.get(req["pid"], 0.0)} if rc is not None else {"timeout": True}
        proto_out.write(json.dumps(rep) + "\n")
        proto_out.flush()


def _child(req: dict, devnull: int, ready: int) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setpgid(0, 0)
        os.dup2(devnull, 0)
        for fd, name in ((1, req["out"]), (2, req["err"])):
            f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.update(req["env"])
        if req["cwd"]:
            os.chdir(req["cwd"])
        if req["fsize"] is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        if req["user"] is not None:
            os.setgroups([])
            os.setgid(req["user"])
            os.setuid(req["user"])
        sys.argv = ["rlexport", *req["argv"]]
        from rlexport.cli import main
        os.write(ready, b"1")
        os.close(ready)
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            import logging
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


_SHARED: list[Cli] = []


def shared_cli() -> Cli:
    """One server for the whole test session (both test modules), closed at exit."""
    if not _SHARED or _SHARED[0].proc.poll() is not None:
        import atexit
        _SHARED[:] = [Cli()]
        atexit.register(_SHARED[0].close)
    return _SHARED[0]


# ---------------------------------------------------------------------------------------------------------
# Output checks (no dependency on `rlexport verify`)
# ---------------------------------------------------------------------------------------------------------

def tensor_digests(out: Path) -> dict[str, tuple[str, tuple, str]]:
    """{name: (dtype, shape, sha256 of the bytes)} of an export, read through its index with safetensors."""
    import torch
    from safetensors import safe_open
    index = json.loads((out / "model.safetensors.index.json").read_text())
    digests = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                digests[name] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())
    return digests


def why_incomplete(out: Path, reference: dict | None) -> str | None:
    """None if `out` is a complete export (index, every shard it names loadable, config.json, and the tensors of
    `reference`, bytes included); otherwise what is wrong."""
    try:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        for shard in shards:
            if not (out / shard).is_file():
                return f"missing shard {shard}"
        json.loads((out / "config.json").read_text())
        digests = tensor_digests(out)
    except Exception as e:  # any failure to read is the finding
        return f"{type(e).__name__}: {e}"
    if set(digests) != set(index["weight_map"]):
        return "the index and the shards disagree"
    if reference is not None and digests != reference:
        return "tensors differ from the reference export"
    return None


def leftovers(out: Path) -> list[str]:
    """rlexport's hidden temporaries (and lock) beside `out`."""
    parent = Path(out).parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{Path(out).name}.rlexport-"))


# ---------------------------------------------------------------------------------------------------------
# Killing exports (tests/test_crash_safety.py and scripts/crash_torture.py)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Stop:
    delay: float         # seconds after the start when the signal was sent
    rc: int              # exit code (-9: killed)
    out: str             # "absent" | "complete" | "INCOMPLETE"
    temps: list          # temporary folders left beside --out
    problem: str | None  # why_incomplete() of a present --out
    stderr: str


def stop_export(cli: Cli, args: list, out: Path, reference: dict, delay: float, sig: int = signal.SIGKILL) -> Stop:
    """Start `rlexport ARGS` (with --force when --out exists), send `sig` after `delay` s, and look at --out."""
    force = ["--force"] if os.path.lexists(out) else []
    running = cli.start(*args, *force)
    time.sleep(delay)
    os.kill(running.pid, sig)  # not reaped yet (the server waits for it below), so the pid is still ours
    res = cli.wait(running)
    temps = [n for n in leftovers(out) if ".rlexport-tmp-" in n]
    if os.path.lexists(out):
        problem = why_incomplete(out, reference)
        state = "complete" if problem is None else "INCOMPLETE"
    else:
        problem, state = None, "absent"
    return Stop(delay, res.rc, state, temps, problem, res.stderr)


def finish_export(cli: Cli, args: list, out: Path, reference: dict) -> tuple[Result, list]:
    """Run to the end (the 'next run' after kills): returns the result and the temporaries it found before."""
    before = [n for n in leftovers(out) if ".rlexport-tmp-" in n]
    force = ["--force"] if os.path.lexists(out) else []
    return cli.run(*args, *force), before


# ---------------------------------------------------------------------------------------------------------
# Input fingerprints
# ---------------------------------------------------------------------------------------------------------

def _digest(path: str, size: int) -> str:
    """sha256 of the file; above 64 MB (the sparse 2 GB case) of its first, middle and last MB and its size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 64 << 20:
            h.update(f.read())
        else:
            for at in (0, size // 2, max(0, size - (1 << 20))):
                f.seek(at)
                h.update(f.read(1 << 20))
            h.update(str(size).encode())
    return h.hexdigest()


def tree_state(*roots: Path) -> dict[str, tuple]:
    """{relative path: (kind, sha256 or link target, mtime_ns, mode)} for everything under the roots.

    Symlinks are recorded, never followed (the corpus has loops). Unreadable files are hashed as root can."""
    state: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not os.path.lexists(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in sorted(dirnames + filenames):
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                key = os.fsencode(os.path.relpath(p, root.parent)).decode("utf-8", "backslashreplace")
                if os.path.islink(p):
                    state[key] = ("link", os.readlink(p), st.st_mtime_ns, st.st_mode)
                elif os.path.isfile(p):
                    try:
                        digest = _digest(p, st.st_size)
                    except PermissionError:
                        digest = "unreadable"
                    state[key] = ("file", digest, st.st_mtime_ns, st.st_mode)
                else:
                    state[key] = ("dir", "", st.st_mtime_ns, st.st_mode)
        if root.is_file():
            st = root.stat()
            state[root.name] = ("file", _digest(str(root), st.st_size), st.st_mtime_ns, st.st_mode)
    return state


# ---------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Goods:
    """Good inputs the cases break copies of (built once per session by the tests)."""

    base: Path       # tiny qwen2, bf16, safetensors, tokenizer
    lora: Path       # PEFT LoRA r=4 on base
    wide: Path       # same family, hidden 256: a base the adapter was not trained on
    gpt2: Path       # another architecture


@dataclass
class Run:
    """One invocation: the args after `rlexport`, the input folders/files to fingerprint, the --out."""

    args: list
    inputs: list
    out: Path
    user: int | None = None     # run as this uid (set for permission cases when the tests run as root)
    fsize: int | None = None    # RLIMIT_FSIZE for the child
    note: str = ""


@dataclass
class Case:
    id: str
    code: str                       # the error[code] expected
    build: Callable[[Path, Goods], Run]
    needs: str = ""                 # a capability: "non-root-or-setuid", "non-utf8-fs"
    doc: str = field(default="")


CASES: list[Case] = []


def case(id: str, code: str, needs: str = ""):
    def deco(fn):
        CASES.append(Case(id, code, fn, needs, (fn.__doc__ or "").strip()))
        return fn
    return deco


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _export(ckpt, out, *extra) -> list:
    return ["export", ckpt, "--out", out, *extra]


def _model_case(d: Path, g: Goods, *extra) -> tuple[Path, Path, Run]:
    ckpt = _copy(g.base, d / "ckpt")
    out = d / "outs" / "out"
    return ckpt, out, Run(_export(ckpt, out, *extra), [ckpt], out)


def _lora_case(d: Path, g: Goods, base: Path | None = None, *extra) -> tuple[Path, Path, Path, Run]:
    ckpt = _copy(g.lora, d / "adapter")
    base = _copy(base or g.base, d / "base")
    _edit_json(ckpt / "adapter_config.json", base_model_name_or_path=str(base))
    out = d / "outs" / "out"
    return ckpt, base, out, Run(_export(ckpt, out, *extra), [ckpt, base], out)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data, indent=2))


_DELETE = object()


# --- safetensors bytes ---------------------------------------------------------------------------------

def st_parse(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_build(header: dict, data: bytes, *, length: int | None = None, pad: bool = True) -> bytes:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _rewrite_header(path: Path, fn: Callable[[dict], None]) -> None:
    header, data = st_parse(path)
    fn(header)
    path.write_bytes(st_build(header, data))


@case("st-truncated-data", "corrupt-safetensors")
def _(d, g):
    """model.safetensors cut in half: the header promises more data than the file has."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return run


@case("st-truncated-header", "corrupt-safetensors")
def _(d, g):
    """Cut inside the JSON header."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return run


@case("st-shorter-than-length", "corrupt-safetensors")
def _(d, g):
    """A 5-byte file: not even the 8-byte header length."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00")
    return run


@case("st-empty-file", "corrupt-safetensors")
def _(d, g):
    """A zero-byte model.safetensors (a copy that never started)."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").write_bytes(b"")
    return run


@case("st-header-longer-than-file", "corrupt-safetensors")
def _(d, g):
    """The u64 header length is larger than the whole file."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) + 4096) + raw[8:])
    return run


@case("st-header-claims-2gb", "corrupt-safetensors")
def _(d, g):
    """The header length claims 2 GB in a small file: must be refused without allocating it."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2 * 1024 ** 3) + raw[8:])
    return run


@case("st-header-claims-2gb-present", "corrupt-safetensors")
def _(d, g):
    """A 2 GB header claim in a sparse file that really is that long (reading it would allocate 2 GB)."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", 2 * 1024 ** 3) + b'{"__metadata__":')
        fh.truncate(8 + 2 * 1024 ** 3 + 16)  # sparse: no disk used
    return run


@case("st-header-not-json", "corrupt-safetensors")
def _(d, g):
    """The header bytes are not JSON."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:16] = b"\x00garbag"[:8].ljust(8, b"!")
    f.write_bytes(bytes(raw))
    return run


@case("st-header-not-object", "corrupt-safetensors")
def _(d, g):
    """The header is JSON but a list, not an object."""
    ckpt, out, run = _model_case(d, g)
    _, data = st_parse(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").write_bytes(st_build([1, 2, 3], data))  # type: ignore[arg-type]
    return run


@case("st-offsets-past-end", "corrupt-safetensors")
def _(d, g):
    """The last tensor's end offset lies past the data."""
    ckpt, out, run = _model_case(d, g)

    def lie(h):
        last = _tensors(h)[-1]
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 64, e + 64]
    _rewrite_header(ckpt / "model.safetensors", lie)
    return run


@case("st-offsets-reversed", "corrupt-safetensors")
def _(d, g):
    """A tensor whose end offset is before its start."""
    ckpt, out, run = _model_case(d, g)

    def lie(h):
        first = _tensors(h)[0]
        b, e = h[first]["data_offsets"]
        h[first]["data_offsets"] = [e, b]
    _rewrite_header(ckpt / "model.safetensors", lie)
    return run


@case("st-offsets-overlap", "corrupt-safetensors")
def _(d, g):
    """Two tensors claim the same bytes (the second starts inside the first)."""
    ckpt, out, run = _model_case(d, g)

    def lie(h):
        names = [n for n in _tensors(h) if h[n]["shape"] == [128]]  # two same-size norm vectors
        a, b = names[0], names[1]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    _rewrite_header(ckpt / "model.safetensors", lie)
    return run


@case("st-offsets-gap", "corrupt-safetensors")
def _(d, g):
    """A hole between two tensors (bytes no tensor owns)."""
    ckpt, out, run = _model_case(d, g)

    def lie(h):
        names = _tensors(h)
        for n in names[1:]:
            b, e = h[n]["data_offsets"]
            h[n]["data_offsets"] = [b + 2, e + 2]
    header, data = st_parse(ckpt / "model.safetensors")
    lie(header)
    first_end = header[_tensors(header)[0]]["data_offsets"][1] - 2
    (ckpt / "model.safetensors").write_bytes(st_build(header, data[:first_end] + b"\0\0" + data[first_end:]))
    return run


@case("st-offsets-not-ints", "corrupt-safetensors")
def _(d, g):
    """data_offsets holds strings."""
    ckpt, out, run = _model_case(d, g)
    _rewrite_header(ckpt / "model.safetensors",
                    lambda h: h[_tensors(h)[0]].update(data_offsets=["0", "x"]))
    return run


@case("st-dtype-lies", "corrupt-safetensors")
def _(d, g):
    """A BF16 tensor's header says F32: its byte range is half what the dtype and shape need."""
    ckpt, out, run = _model_case(d, g)
    _rewrite_header(ckpt / "model.safetensors", lambda h: h[_tensors(h)[0]].update(dtype="F32"))
    return run


@case("st-dtype-unknown", "corrupt-safetensors")
def _(d, g):
    """A dtype name no safetensors version knows."""
    ckpt, out, run = _model_case(d, g)
    _rewrite_header(ckpt / "model.safetensors", lambda h: h[_tensors(h)[0]].update(dtype="F99"))
    return run


@case("st-dtype-unsupported", "unsupported-dtype")
def _(d, g):
    """A real safetensors dtype rlexport does not read (float8), with a consistent size."""
    ckpt, out, run = _model_case(d, g)

    def lie(h):
        n = _tensors(h)[0]
        h[n]["dtype"] = "F8_E4M3"
        h[n]["shape"] = [h[n]["shape"][0] * 2] + h[n]["shape"][1:]  # same bytes, twice the elements
    _rewrite_header(ckpt / "model.safetensors", lie)
    return run


@case("st-shape-lies", "corrupt-safetensors")
def _(d, g):
    """A tensor's shape says more elements than its byte range holds."""
    ckpt, out, run = _model_case(d, g)

    def lie(h):
        n = _tensors(h)[0]
        h[n]["shape"] = [h[n]["shape"][0] * 2] + h[n]["shape"][1:]
    _rewrite_header(ckpt / "model.safetensors", lie)
    return run


@case("st-shape-negative", "corrupt-safetensors")
def _(d, g):
    """A negative dimension."""
    ckpt, out, run = _model_case(d, g)
    _rewrite_header(ckpt / "model.safetensors", lambda h: h[_tensors(h)[0]].update(shape=[-1, 128]))
    return run


@case("st-tensor-entry-not-object", "corrupt-safetensors")
def _(d, g):
    """A tensor entry that is a string instead of {dtype, shape, data_offsets}."""
    ckpt, out, run = _model_case(d, g)
    _rewrite_header(ckpt / "model.safetensors", lambda h: h.update({_tensors(h)[0]: "lm_head"}))
    return run


@case("st-shard-is-folder", "index-missing-shard")
def _(d, g):
    """The index names a shard that is a folder, not a file."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    header, _ = st_parse(f)
    (ckpt / "model-00002-of-00002.safetensors").mkdir()
    wm = {n: "model.safetensors" for n in _tensors(header)}
    wm["extra.weight"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    run.note = "index names a folder"
    return run


# --- JSON files and the index ---------------------------------------------------------------------------

@case("config-invalid-json", "invalid-json")
def _(d, g):
    """config.json cut mid-object."""
    ckpt, out, run = _model_case(d, g)
    cfg = ckpt / "config.json"
    cfg.write_text(cfg.read_text()[:40])
    return run


@case("config-not-object", "invalid-json")
def _(d, g):
    """config.json is a JSON list."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "config.json").write_text("[1, 2]")
    return run


@case("config-not-utf8", "invalid-json")
def _(d, g):
    """config.json in Latin-1 with a non-ASCII byte."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "config.json").write_bytes(b'{"model_type": "qwen2", "note": "\xe9t\xe9"}')
    return run


@case("adapter-config-invalid-json", "invalid-json")
def _(d, g):
    """adapter_config.json is not JSON."""
    ckpt, base, out, run = _lora_case(d, g)
    (ckpt / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    return run


@case("adapter-config-not-object", "invalid-json")
def _(d, g):
    """adapter_config.json is a JSON string."""
    ckpt, base, out, run = _lora_case(d, g)
    (ckpt / "adapter_config.json").write_text('"LORA"')
    return run


@case("index-invalid-json", "invalid-json")
def _(d, g):
    """model.safetensors.index.json is not JSON."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": ')
    return run


@case("index-without-weight-map", "invalid-index")
def _(d, g):
    """An index with metadata only."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 1}}')
    return run


@case("index-shard-outside-folder", "invalid-index")
def _(d, g):
    """The index names a shard outside the checkpoint folder (../ and an absolute path)."""
    ckpt, out, run = _model_case(d, g)
    header, _ = st_parse(ckpt / "model.safetensors")
    outside = d / "elsewhere.safetensors"
    shutil.copy(ckpt / "model.safetensors", outside)
    wm = {n: "../elsewhere.safetensors" for n in _tensors(header)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    run.inputs.append(outside)
    return run


@case("index-names-missing-shard", "index-missing-shard")
def _(d, g):
    """A two-shard index whose second shard was never copied."""
    ckpt, out, run = _model_case(d, g)
    header, _ = st_parse(ckpt / "model.safetensors")
    names = _tensors(header)
    wm = {n: "model.safetensors" for n in names[:-3]}
    wm.update({n: "model-00002-of-00002.safetensors" for n in names[-3:]})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return run


@case("index-disagrees-with-shards", "index-mismatch")
def _(d, g):
    """The index lists a tensor that no shard holds."""
    ckpt, out, run = _model_case(d, g)
    header, _ = st_parse(ckpt / "model.safetensors")
    wm = {n: "model.safetensors" for n in _tensors(header)}
    wm["model.layers.7.mlp.up_proj.weight"] = "model.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return run


def _split(ckpt: Path, dup: bool) -> None:
    """Split model.safetensors into two shards with an index; with dup, one tensor is in both."""
    import torch  # noqa: F401  (safetensors.torch needs it)
    from safetensors.torch import load_file, save_file
    sd = load_file(ckpt / "model.safetensors")
    names = sorted(sd)
    a, b = names[: len(names) // 2], names[len(names) // 2:]
    if dup:
        b = b + [a[0]]
    save_file({n: sd[n] for n in a}, ckpt / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({n: sd[n] for n in b}, ckpt / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    wm = {n: "model-00001-of-00002.safetensors" for n in a}
    wm.update({n: "model-00002-of-00002.safetensors" for n in b})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (ckpt / "model.safetensors").unlink()


@case("duplicate-tensor-across-shards", "duplicate-tensor")
def _(d, g):
    """Two shards both hold model.embed_tokens.weight (a re-saved shard copied over an old set)."""
    ckpt, out, run = _model_case(d, g)
    _split(ckpt, dup=True)
    return run


@case("duplicate-tensor-stray-file", "duplicate-tensor")
def _(d, g):
    """No index, and a stray model-copy.safetensors repeats the weights."""
    ckpt, out, run = _model_case(d, g)
    shutil.copy(ckpt / "model.safetensors", ckpt / "model-copy.safetensors")
    return run


# --- adapters and bases ---------------------------------------------------------------------------------

@case("adapter-rank-disagrees", "adapter-rank-mismatch")
def _(d, g):
    """adapter_config.json says r=8; the tensors have rank 4."""
    ckpt, base, out, run = _lora_case(d, g)
    _edit_json(ckpt / "adapter_config.json", r=8)
    return run


@case("adapter-rank-not-a-number", "adapter-config-invalid")
def _(d, g):
    """adapter_config.json says r="four"."""
    ckpt, base, out, run = _lora_case(d, g)
    _edit_json(ckpt / "adapter_config.json", r="four")
    return run


@case("adapter-lora-b-missing", "adapter-incomplete")
def _(d, g):
    """One module has lora_A but its lora_B was dropped."""
    ckpt, base, out, run = _lora_case(d, g)

    def drop(h):
        victim = next(n for n in _tensors(h) if "lora_B" in n)
        del h[victim]
    f = ckpt / "adapter_model.safetensors"
    header, data = st_parse(f)
    victim = next(n for n in _tensors(header) if "lora_B" in n)
    b, e = header[victim]["data_offsets"]
    del header[victim]
    for n in _tensors(header):  # close the hole so the file stays valid safetensors
        nb, ne = header[n]["data_offsets"]
        if nb >= e:
            header[n]["data_offsets"] = [nb - (e - b), ne - (e - b)]
    f.write_bytes(st_build(header, data[:b] + data[e:]))
    return run


@case("adapter-base-other-hidden-size", "base-shape-mismatch")
def _(d, g):
    """The adapter (hidden 128) pointed at a base with hidden size 256."""
    ckpt, base, out, run = _lora_case(d, g, g.wide)
    return run


@case("adapter-base-other-architecture", "adapter-base-mismatch")
def _(d, g):
    """The qwen2 adapter pointed at a GPT-2 base: its target modules do not exist there."""
    ckpt, base, out, run = _lora_case(d, g, g.gpt2)
    return run


@case("adapter-base-missing", "base-unresolved")
def _(d, g):
    """adapter_config.json names a base folder that is not there, and no --base."""
    ckpt, base, out, run = _lora_case(d, g)
    _edit_json(ckpt / "adapter_config.json", base_model_name_or_path=str(d / "no-such-base"))
    return run


@case("adapter-unsupported-type", "adapter-inconsistent")
def _(d, g):
    """adapter_config.json says peft_type IA3 over LoRA tensors."""
    ckpt, base, out, run = _lora_case(d, g)
    _edit_json(ckpt / "adapter_config.json", peft_type="IA3")
    return run


@case("adapter-weights-missing", "missing-adapter-weights")
def _(d, g):
    """adapter_config.json without adapter_model.safetensors."""
    ckpt, base, out, run = _lora_case(d, g)
    (ckpt / "adapter_model.safetensors").unlink()
    return run


# --- values -------------------------------------------------------------------------------------------

def _poke(path: Path, name_part: str, value: float, index: int = 3) -> None:
    """Set one element of the first tensor whose name contains name_part (bf16/f32 files)."""
    import torch
    from safetensors.torch import load_file, save_file
    sd = load_file(path)
    name = next(n for n in sorted(sd) if name_part in n)
    sd[name].view(-1)[index] = value
    save_file(sd, path, metadata={"format": "pt"})


@case("weights-nan", "nonfinite-weights")
def _(d, g):
    """One NaN in a layer weight (a diverged run)."""
    ckpt, out, run = _model_case(d, g)
    _poke(ckpt / "model.safetensors", "layers.1.mlp.down_proj", float("nan"))
    return run


@case("weights-inf", "nonfinite-weights")
def _(d, g):
    """One +Inf in a weight."""
    ckpt, out, run = _model_case(d, g)
    _poke(ckpt / "model.safetensors", "layers.0.self_attn.q_proj", float("inf"))
    return run


@case("weights-fp16-overflow", "fp16-overflow")
def _(d, g):
    """A bf16 weight of 1e6 exported with --dtype float16 (fp16 tops out at 65504)."""
    ckpt, out, run = _model_case(d, g, "--dtype", "float16")
    _poke(ckpt / "model.safetensors", "layers.0.mlp.up_proj", 1e6)
    return run


# --- paths --------------------------------------------------------------------------------------------

@case("empty-folder", "unknown-format")
def _(d, g):
    """An empty folder."""
    (d / "ckpt").mkdir()
    return Run(_export(d / "ckpt", d / "outs" / "out"), [d / "ckpt"], d / "outs" / "out")


@case("file-not-folder", "not-a-folder")
def _(d, g):
    """The checkpoint argument is the safetensors file, not its folder."""
    ckpt = _copy(g.base, d / "ckpt")
    return Run(_export(ckpt / "model.safetensors", d / "outs" / "out"), [ckpt], d / "outs" / "out")


@case("missing-path", "missing-input")
def _(d, g):
    """The checkpoint path does not exist."""
    return Run(_export(d / "nothing-here", d / "outs" / "out"), [], d / "outs" / "out")


@case("symlink-loop-weights", "symlink-loop")
def _(d, g):
    """model.safetensors is a symlink to itself."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").unlink()
    os.symlink("model.safetensors", ckpt / "model.safetensors")
    return run


@case("symlink-loop-config", "symlink-loop")
def _(d, g):
    """config.json -> a.json -> config.json."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "config.json").unlink()
    os.symlink("a.json", ckpt / "config.json")
    os.symlink("config.json", ckpt / "a.json")
    return run


@case("symlink-loop-checkpoint", "symlink-loop")
def _(d, g):
    """The checkpoint argument itself is a symlink loop."""
    os.symlink("b", d / "a")
    os.symlink("a", d / "b")
    return Run(_export(d / "a", d / "outs" / "out"), [d / "a", d / "b"], d / "outs" / "out")


@case("unreadable-weights", "unreadable-file", needs="permissions")
def _(d, g):
    """model.safetensors with mode 000."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").chmod(0)
    return _as_other_user(d, run)


@case("unreadable-config", "unreadable-file", needs="permissions")
def _(d, g):
    """config.json with mode 000."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "config.json").chmod(0)
    return _as_other_user(d, run)


@case("unreadable-adapter", "unreadable-file", needs="permissions")
def _(d, g):
    """adapter_model.safetensors with mode 000."""
    ckpt, base, out, run = _lora_case(d, g)
    (ckpt / "adapter_model.safetensors").chmod(0)
    return _as_other_user(d, run)


def _as_other_user(d: Path, run: Run) -> Run:
    """Permissions do not stop root: as root, run the child as nobody with the tree opened up to it."""
    if os.geteuid() != 0:
        return run
    for p in [d, *d.parents]:
        if p == Path(p.anchor):
            break
        if p.stat().st_mode & 0o005 != 0o005:
            p.chmod(p.stat().st_mode | 0o005)
    for dirpath, dirnames, filenames in os.walk(d):
        os.chmod(dirpath, 0o777)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p) and os.stat(p).st_mode & 0o777:
                os.chmod(p, 0o644)
    run.user = 65534
    return run


@case("non-utf8-shard-name", "non-utf8-path", needs="non-utf8-fs")
def _(d, g):
    """A shard whose name is not UTF-8 (the safetensors library cannot open it; the line must still print)."""
    ckpt, out, run = _model_case(d, g)
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.unlink()
    with open(os.path.join(os.fsencode(ckpt), b"model-\xff\xfe.safetensors"), "wb") as fh:
        fh.write(raw[:1000])
    return run


@case("non-utf8-folder-name", "invalid-json", needs="non-utf8-fs")
def _(d, g):
    """A checkpoint folder named in Latin-1 with a broken config.json: the line names it, escaped."""
    src = _copy(g.base, d / "tmpcopy")
    ckpt = Path(os.fsdecode(os.path.join(os.fsencode(d), b"ckpt-\xe9t\xe9")))
    os.rename(src, ckpt)
    (ckpt / "config.json").write_text("{")
    return Run(_export(ckpt, d / "outs" / "out"), [ckpt], d / "outs" / "out")


@case("non-utf8-out", "non-utf8-path", needs="non-utf8-fs")
def _(d, g):
    """--out named in Latin-1: safetensors (and vLLM) could not open the export, so it is refused up front."""
    ckpt = _copy(g.base, d / "ckpt")
    out = Path(os.fsdecode(os.path.join(os.fsencode(d), b"out-\xe9t\xe9")))
    return Run(_export(ckpt, out), [ckpt], out)


# --- --out -------------------------------------------------------------------------------------------

@case("out-is-input", "out-overlaps-input")
def _(d, g):
    """--out is the checkpoint folder itself."""
    ckpt = _copy(g.base, d / "ckpt")
    return Run(_export(ckpt, ckpt, "--force"), [ckpt], ckpt)


@case("out-inside-input", "out-overlaps-input")
def _(d, g):
    """--out is a new folder inside the checkpoint."""
    ckpt = _copy(g.base, d / "ckpt")
    return Run(_export(ckpt, ckpt / "export"), [ckpt], ckpt / "export")


@case("out-parent-of-input", "out-overlaps-input")
def _(d, g):
    """--out contains the checkpoint (with --force it would be replaced)."""
    ckpt = _copy(g.base, d / "runs" / "ckpt")
    return Run(_export(ckpt, d / "runs", "--force"), [d / "runs"], d / "runs")


@case("out-is-base", "out-overlaps-input")
def _(d, g):
    """--out is the adapter's base model folder."""
    ckpt, base, out, run = _lora_case(d, g)
    run.args = _export(ckpt, base, "--force")
    run.out = base
    return run


@case("out-symlink-to-input", "out-overlaps-input")
def _(d, g):
    """--out is a symlink to the checkpoint."""
    ckpt = _copy(g.base, d / "ckpt")
    os.symlink(ckpt, d / "link")
    return Run(_export(ckpt, d / "link", "--force"), [ckpt, d / "link"], d / "link")


@case("out-symlink-loop", "symlink-loop")
def _(d, g):
    """--out is a symlink loop."""
    ckpt = _copy(g.base, d / "ckpt")
    os.symlink("out", d / "out")
    return Run(_export(ckpt, d / "out"), [ckpt, d / "out"], d / "out")


@case("out-exists", "out-exists")
def _(d, g):
    """--out holds someone's files and --force was not given."""
    ckpt = _copy(g.base, d / "ckpt")
    out = d / "outs" / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    return Run(_export(ckpt, out), [ckpt, out], out)


@case("out-is-file", "out-not-folder")
def _(d, g):
    """--out is an existing file."""
    ckpt = _copy(g.base, d / "ckpt")
    out = d / "outs" / "out"
    out.parent.mkdir()
    out.write_text("a file")
    return Run(_export(ckpt, out, "--force"), [ckpt, out], out)


# --- pickles ----------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs `open(marker, 'w')`: the test checks that the marker never appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def marker_of(d: Path) -> Path:
    return d / "PWNED"


def write_evil_pickle(path: Path, marker: Path, *, zip_format: bool) -> None:
    """A state dict whose unpickling would create `marker` (torch.save zip format, or a bare pickle)."""
    import torch
    obj = {"v_head.summary.weight": torch.zeros(1, 128), "v_head.summary.bias": _Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)


@case("pickle-reduce-model-bin", "unsafe-pickle")
def _(d, g):
    """pytorch_model.bin (torch.save zip) whose unpickling would run open(marker, 'w')."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").unlink()
    write_evil_pickle(ckpt / "pytorch_model.bin", marker_of(d), zip_format=True)
    return run


@case("pickle-reduce-model-bin-legacy", "unsafe-pickle")
def _(d, g):
    """The same payload in torch's legacy (pre-zip, not mmap-able) format."""
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").unlink()
    write_evil_pickle(ckpt / "pytorch_model.bin", marker_of(d), zip_format=False)
    return run


@case("pickle-reduce-value-head", "unsafe-pickle")
def _(d, g):
    """value_head.bin beside a good safetensors model carries the payload."""
    ckpt, out, run = _model_case(d, g)
    write_evil_pickle(ckpt / "value_head.bin", marker_of(d), zip_format=True)
    return run


@case("pickle-reduce-adapter-bin", "unsafe-pickle")
def _(d, g):
    """adapter_model.bin (instead of .safetensors) carries the payload."""
    ckpt, base, out, run = _lora_case(d, g)
    (ckpt / "adapter_model.safetensors").unlink()
    write_evil_pickle(ckpt / "adapter_model.bin", marker_of(d), zip_format=True)
    return run


@case("pickle-reduce-trl-head", "unsafe-pickle")
def _(d, g):
    """TRL's pytorch_model.bin value head beside an adapter carries the payload."""
    ckpt, base, out, run = _lora_case(d, g)
    write_evil_pickle(ckpt / "pytorch_model.bin", marker_of(d), zip_format=False)
    return run


@case("pickle-truncated", "corrupt-pickle")
def _(d, g):
    """A torch.save zip cut short."""
    import torch
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").unlink()
    torch.save({"lm_head.weight": torch.zeros(4, 4)}, ckpt / "pytorch_model.bin")
    f = ckpt / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:200])
    return run


@case("pickle-truncated-half", "corrupt-pickle")
def _(d, g):
    """A torch.save zip cut in the middle of its data (torch itself says OSError EINVAL, like a disk fault)."""
    import torch
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").unlink()
    torch.save({"lm_head.weight": torch.zeros(64, 64)}, ckpt / "pytorch_model.bin")
    f = ckpt / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    return run


@case("pickle-not-a-state-dict", "corrupt-pickle")
def _(d, g):
    """pytorch_model.bin holding a plain list (allowed by weights_only, but not weights)."""
    import torch
    ckpt, out, run = _model_case(d, g)
    (ckpt / "model.safetensors").unlink()
    torch.save([1, 2, 3], ckpt / "pytorch_model.bin")
    return run


# --- the environment ----------------------------------------------------------------------------------

@case("disk-full", "disk-full")
def _(d, g):
    """RLIMIT_FSIZE of 100 kB: the shard write fails part-way (EFBIG, as ENOSPC would)."""
    ckpt, out, run = _model_case(d, g)
    run.fsize = 100_000
    return run


def build(c: Case, d: Path, goods: Goods) -> Run:
    d.mkdir(parents=True, exist_ok=True)
    return c.build(d, goods)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
