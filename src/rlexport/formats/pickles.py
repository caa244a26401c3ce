"""Safe reading of DeepSpeed's `.pt` files: `torch.load(weights_only=True)` plus an explicit allowlist.

DeepSpeed pickles three classes of its own into `*_optim_states.pt` (checked on 0.16.9, ZeRO-1/2/3):
`ZeroStageEnum`, `LossScaler` (`DynamicLossScaler` with fp16 dynamic loss scaling) and `fragment_address`.
Minimal stand-ins are registered under those exact names, so the files load with torch's weights-only
unpickler and `deepspeed` is never imported; any other global (a `__reduce__` calling `os.system`, `open`...)
is refused before anything runs.

Tensors are loaded on the `meta` device: only the pickle is read, and each tensor keeps the byte offset of its
storage in the zip file, which readers then `pread` one parameter at a time (no mmap: mapped pages would
count as resident memory). Every offset is checked against the zip's own record table before it is trusted.
"""
from __future__ import annotations

import dataclasses
import enum
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RlexportError
from .access import unpickler_reason, quiet_torch_load, input_error, remember, torch_zip_cut_short


class ZeroStageEnum(enum.IntEnum):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (pickled as REDUCE(cls, (value,)))."""
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScaler:
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.LossScaler: a bag of attributes (cur_scale, dynamic)."""


class DynamicLossScaler(LossScaler):
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler (fp16 dynamic loss scaling)."""


@dataclasses.dataclass
class fragment_address:  # noqa: N801 - the name DeepSpeed pickles
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address (ZeRO-1/2 param_slice_mappings)."""
    numel: int
    start: int


SAFE_GLOBALS = [
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (fragment_address, "deepspeed.utils.tensor_fragment.fragment_address"),
]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes


@dataclass(frozen=True)
class PtFile:
    """A loaded `.pt` file: the unpickled object (tensors on `meta` for zip files) and where its storages are."""

    path: Path
    obj: object
    records: dict[int, int] | None  # data start -> byte length of every stored tensor record; None: in memory
    what: str = "DeepSpeed file"

    def offset(self, t: torch.Tensor, what: str) -> int:
        """Byte offset in the file of the contiguous tensor `t` (loaded on meta), checked against the zip."""
        if not t.is_contiguous():
            raise self.corrupt(f"{what} is not stored contiguously")
        storage = t.untyped_storage()
        start = getattr(storage, "_checkpoint_offset", None)
        if start is None or self.records is None:
            raise self.corrupt(f"{what}: torch did not report where its bytes are stored")
        size = self.records.get(int(start))
        end = t.storage_offset() * t.element_size() + t.numel() * t.element_size()
        if size is None or storage.nbytes() > size or end > size:
            raise self.corrupt(f"{what}: its bytes are not where the zip records say")
        return int(start) + t.storage_offset() * t.element_size()

    def corrupt(self, why: str) -> RlexportError:
        return RlexportError("corrupt-pickle", f"unreadable {self.what} ({why})", file=self.path,
                             hint="the file is truncated or damaged; copy it again from the training machine")


def records(path: Path) -> dict[int, int]:
    """Data start -> size of every uncompressed tensor record (`<archive>/data/<key>`) of a torch zip file."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" not in info.filename or info.filename.endswith("/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise RlexportError("corrupt-pickle", f"record {info.filename} is compressed; torch.save never "
                                    "compresses tensor data", file=path, hint="copy the file again")
            f.seek(info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
            if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
                raise RlexportError("corrupt-pickle", f"bad zip header for {info.filename}", file=path,
                                    hint="the file is truncated or damaged; copy it again")
            fields = _LOCAL_HEADER.unpack(head)
            name_len, extra_len = fields[-2], fields[-1]
            out[info.header_offset + _LOCAL_HEADER.size + name_len + extra_len] = info.file_size
        order = [n for n in z.namelist() if n.endswith("/byteorder") or n == "byteorder"]
        if order and z.read(order[0]).strip() not in (b"little", b""):
            raise RlexportError("unsupported-checkpoint", "a big-endian torch file", file=path,
                                hint="convert it on the machine that wrote it")
    return out


def load_pt(path: Path, *, meta: bool = True) -> PtFile:
    """Unpickle a DeepSpeed `.pt` file with the weights-only unpickler and the DeepSpeed allowlist.

    With `meta` (torch zip files), tensors come back on the meta device: no tensor bytes are read, and
    `PtFile.offset` says where each one is. Legacy (non-zip) files are read into memory.
    """
    path = Path(path)
    try:
        remember(path)
        if torch_zip_cut_short(path):
            raise RlexportError("corrupt-pickle", "unreadable DeepSpeed file (a torch zip file whose end is missing)",
                                file=path, hint="the file is truncated; copy it again from the training machine")
        zipped = zipfile.is_zipfile(path)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            with quiet_torch_load():
                obj = torch.load(path, map_location="meta" if (meta and zipped) else "cpu", weights_only=True)
        stored = records(path) if (meta and zipped) else None
    except RlexportError:
        raise
    except pickle.UnpicklingError as e:
        raise unsafe(path, e) from None
    except OSError as e:
        raise input_error(path, e) from None
    except Exception as e:  # whatever torch raises on damaged bytes (RuntimeError, EOFError, ValueError, zip...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RlexportError("corrupt-pickle", f"unreadable DeepSpeed file ({first})", file=path,
                            hint="the file is truncated or damaged; copy it again from the training machine") from None
    return PtFile(path, obj, stored)


def unsafe(path: Path, e: Exception) -> RlexportError:
    calls = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
    why = f"it would call {calls.group(1)}, which no DeepSpeed checkpoint does" if calls else \
        unpickler_reason(e, "not a DeepSpeed checkpoint file")
    return RlexportError("unsafe-pickle", f"refused to unpickle: {why}; nothing in it was run", file=path,
                         hint="only tensors and DeepSpeed's own bookkeeping classes are read; if you trust the "
                              "file, convert it where it was made")
