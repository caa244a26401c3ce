"""Reading input files safely: JSON, OSErrors as the error the user can act on, and the change stamps that
prove an input was not rewritten while it was exported. No torch: files.py and pickles.py both build on this."""
from __future__ import annotations

import errno
import json
import os
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import RlexportError


def read_json(path: Path) -> dict:
    try:
        remember(path)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RlexportError("invalid-json", f"not valid JSON ({e})", file=path,
                            hint="restore the file from the training run") from None
    except OSError as e:
        raise input_error(path, e) from None
    if not isinstance(data, dict):
        raise RlexportError("invalid-json", "expected a JSON object", file=path,
                            hint="restore the file from the training run")
    return data


def input_error(path: Path | str, e: OSError) -> RlexportError:
    """An OSError met while reading an input file, as the error the user can act on."""
    if e.errno == errno.ELOOP:
        return RlexportError("symlink-loop", "symbolic links loop back on themselves", file=path,
                             hint="point the link at the real file")
    if e.errno in (errno.EACCES, errno.EPERM):
        return RlexportError("unreadable-file", f"cannot read: {e.strerror}", file=path,
                             hint="give your user read permission on the checkpoint (and the base model)")
    if e.errno == errno.ENOENT:
        return RlexportError("missing-file", "file not found (or a dangling symlink)", file=path,
                             hint="copy the file from the training run")
    if e.errno == errno.EISDIR:
        return RlexportError("not-a-file", "expected a file, found a folder", file=path,
                             hint="remove the folder or put the file there")
    return RlexportError("unreadable-file", f"cannot read: {e.strerror or e}", file=path,
                         hint="check the file and the disk it is on")


_READ: dict[str, tuple[int, int, int]] = {}


def _stamp(path: Path | str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def remember(path: Path | str) -> None:
    _READ[os.path.abspath(path)] = _stamp(path)


def check_unchanged(*folders: Path | str | None) -> None:
    """Raise input-changed if a file read from one of the folders was modified or replaced since."""
    roots = [os.path.join(os.path.abspath(f), "") for f in folders if f is not None]
    for path, stamp in list(_READ.items()):
        if not any(path.startswith(r) for r in roots):
            continue
        try:
            now = _stamp(path)
        except OSError:
            now = None
        if now != stamp:
            raise RlexportError("input-changed", "the file changed while it was being exported", file=path,
                                hint="wait until training has finished writing the checkpoint, then export again")


def torch_zip_cut_short(path: Path) -> bool:
    """A torch.save zip file missing its end (a copy cut short): torch reads it as a legacy pickle and fails
    with an OSError (EINVAL) that reads like a disk fault."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False  # torch.load reports the real read error
    return magic == b"PK\x03\x04" and not zipfile.is_zipfile(path)


@contextmanager
def quiet_torch_load():
    """torch.load warns on stderr about pickle protocols and storage types; on bad input the one output is
    rlexport's error line, and on good input the warning says nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def unpickler_reason(e: Exception, default: str) -> str:
    """The part of torch's weights_only refusal that says what the file holds (not its advice to unpickle anyway)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        if rest:
            return f"{default}: torch's safe unpickler stopped at '{rest[0][:120]}'"
    return default
