"""Reading weight files: safetensors headers first, bytes on demand; pickles only with weights_only."""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import RlexportError
from ..stream import FileSlice
from ..tensors import FROM_ST, TensorRef
from .access import unpickler_reason, _READ, quiet_torch_load, _stamp, check_unchanged, input_error, read_json, remember, torch_zip_cut_short  # noqa: F401 (re-exported)
from .pickles import PtFile, records

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")




# One open handle per file, few files at once: safe_open mmaps, so a handle costs address space, not RSS.
@lru_cache(maxsize=8)
def _handle(path: str):
    return safe_open(path, framework="pt", device="cpu")


def _corrupt(path: Path, err: Exception) -> RlexportError:
    if isinstance(err, OSError) and err.errno is not None:
        return input_error(path, err)
    return RlexportError("corrupt-safetensors", f"unreadable safetensors file ({err})", file=path,
                         hint="the file is truncated or damaged; copy it again from the training machine")


# ---- validating a safetensors header before anything trusts it ----
# The library checks headers too, but reads them first, with its own limits and terse messages; the offsets we
# pread from come from the header, so it is checked here: every length against the real file size before any
# allocation, then JSON, dtypes, shapes and byte ranges (in bounds, sized by dtype x shape, no overlap, no gap).
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _bad_header(path: Path, why: str) -> RlexportError:
    return RlexportError("corrupt-safetensors", f"invalid safetensors file: {why}", file=path,
                         hint="the file is truncated or damaged; copy it again from the training machine")


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header against its size; returns the header. Reads only the header."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise RlexportError("non-utf8-path", "the path is not valid UTF-8, which the safetensors library (and "
                            "vLLM) cannot open", file=path, hint="rename the folder or file to a UTF-8 name") from None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad_header(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _bad_header(path, f"the header length says {n} bytes but the file has {size}")
            if n > MAX_HEADER_BYTES:
                raise _bad_header(path, f"a {n}-byte header (the format allows {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except OSError as e:
        raise input_error(path, e) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise _bad_header(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad_header(path, "the header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _bad_header(path, f"tensor '{name}' has no dtype/shape/data_offsets")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
            raise _bad_header(path, f"tensor '{name}' has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_index(o) for o in offs)) \
                or offs[0] > offs[1]:
            raise _bad_header(path, f"tensor '{name}' has invalid data_offsets {offs!r}")
        if offs[1] > data_len:
            raise _bad_header(path, f"tensor '{name}' ends at byte {offs[1]} of a {data_len}-byte data section "
                                    "(truncated file or lying header)")
        if not isinstance(dtype, str):
            raise _bad_header(path, f"tensor '{name}' has an invalid dtype {dtype!r}")
        itemsize = ST_ITEMSIZE.get(dtype)
        numel = 1
        for s in shape:
            numel *= s
        if itemsize is not None and numel * itemsize != offs[1] - offs[0]:
            raise _bad_header(path, f"tensor '{name}' is {dtype} {shape} ({numel * itemsize} bytes) but its "
                                    f"data_offsets span {offs[1] - offs[0]} bytes")
        spans.append((offs[0], offs[1], name))
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise _bad_header(path, f"tensors '{prev}' and '{name}' overlap")
        if begin > pos:
            raise _bad_header(path, f"{begin - pos} bytes before tensor '{name}' belong to no tensor")
        pos, prev = end, name
    if pos != data_len:
        raise _bad_header(path, f"{data_len - pos} bytes after the last tensor belong to no tensor")
    return header


# ---- inputs must not change while they are read ----
# (size, mtime_ns, inode) of every input file when it was opened; export compares them before it commits.
def safetensors_refs(path: Path) -> list[TensorRef]:
    """TensorRefs for every tensor of a safetensors file, in file (offset) order."""
    before = _READ.get(os.path.abspath(path))
    if before is not None and before != _stamp_or_none(path):
        _handle.cache_clear()  # never serve a handle opened on an older version of the file
    check_safetensors(path)
    remember(path)
    try:
        h = _handle(str(path))
        names = list(h.offset_keys()) if hasattr(h, "offset_keys") else list(h.keys())
        offsets = _data_offsets(path)
        refs = []
        for name in names:
            sl = h.get_slice(name)
            dtype = FROM_ST.get(sl.get_dtype())
            if dtype is None:
                raise RlexportError("unsupported-dtype", f"tensor '{name}' has dtype {sl.get_dtype()}", file=path,
                                    hint="rlexport reads float and integer tensors only")
            shape = tuple(sl.get_shape())
            refs.append(TensorRef(name, dtype, shape, _loader(path, offsets[name], dtype, shape, name), str(path)))
        return refs
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        _handle.cache_clear()
        raise _corrupt(path, e) from None


def _stamp_or_none(path: Path) -> tuple[int, int, int] | None:
    try:
        return _stamp(path)
    except OSError:
        return None


def _data_offsets(path: Path) -> dict[str, int]:
    """Absolute file offset of each tensor's bytes (safe_open has validated the header already)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def _loader(path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> FileSlice:
    # pread into our own buffers, not safe_open's mmap: mapped pages count as RSS until unmapped, so reading a
    # model through the mmap grows the process by the model's size. FileSlice also streams row blocks.
    return FileSlice(path, offset, dtype, shape, on_error=lambda e: _corrupt(path, e), name=name)


def safetensors_metadata(path: Path) -> dict:
    try:
        return _handle(str(path)).metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, e) from None


def load_pickle_weights(path: Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """A .bin/.pt state dict, read with weights_only=True: no code from the file ever runs. `meta` (zip files):
    tensors on the meta device, no byte of them read."""
    try:
        remember(path)
        if torch_zip_cut_short(path):
            raise RlexportError("corrupt-pickle", "unreadable weights file (a torch zip file whose end is "
                                "missing)", file=path, hint="the file is truncated; copy it again")
        zipped = zipfile.is_zipfile(path)
        # mmap needs torch's zip format; older torch.save files are plain pickles (read the same safe way)
        with quiet_torch_load():
            obj = torch.load(path, map_location="meta" if meta and zipped else "cpu", weights_only=True,
                             mmap=zipped and not meta)
    except RlexportError:
        raise
    except pickle.UnpicklingError as e:
        calls = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        why = f"it would call {calls.group(1)}, which a plain tensor file never does" if calls else \
            unpickler_reason(e, "not a plain tensor file")
        raise RlexportError("unsafe-pickle", f"refused to unpickle: {why}; nothing in it was run",
                            file=path, hint="only plain tensor state dicts are read; convert the file to "
                                            "safetensors where it was made, if you trust it") from None
    except OSError as e:
        raise input_error(path, e) from None
    except Exception as e:  # whatever torch raises on damaged bytes (RuntimeError, EOFError, ValueError...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RlexportError("corrupt-pickle", f"unreadable weights file ({first})",
                            file=path, hint="the file is truncated or damaged; copy it again") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RlexportError("corrupt-pickle", "not a state dict of tensors", file=path,
                            hint="pass the folder that holds the model weights")
    return obj


def pickle_refs(path: Path) -> list[TensorRef]:
    if zipfile.is_zipfile(path):
        refs = _zip_pickle_refs(path)
        if refs is not None:
            return refs
    sd = load_pickle_weights(path)  # legacy pickles: in memory; zip: mmap=True, on disk until touched
    return [TensorRef(k, v.dtype, tuple(v.shape), (lambda v=v: v), str(path)) for k, v in sd.items()]


def _zip_pickle_refs(path: Path) -> list[TensorRef] | None:
    """The tensors of a torch zip file as byte ranges of it, like safetensors tensors: unpickled on the meta
    device and read with pread in row blocks by the writer (reading through torch's mmap would count every
    page read as resident memory: the process would grow by the model's size). None if a tensor is not stored
    contiguously (a strided view): then the file is loaded through the mmap instead."""
    sd = load_pickle_weights(path, meta=True)
    if not all(v.is_contiguous() for v in sd.values()):
        return None
    pt = PtFile(path, sd, records(path), what="weights file")
    return [TensorRef(k, v.dtype, tuple(v.shape),
                      FileSlice(path, pt.offset(v, k), v.dtype, tuple(v.shape), on_error=lambda e: _corrupt(path, e),
                                name=k), str(path)) for k, v in sd.items()]


def weight_files(folder: Path) -> list[Path]:
    """The model's weight files: those an index names, else model*.safetensors, else pytorch_model*.bin."""
    for index_name in INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise RlexportError("invalid-index", "index has no weight_map", file=index,
                                    hint="restore the index from the training run")
            bad = [f for f in wm.values() if not isinstance(f, str) or f in ("", ".", "..") or "/" in f
                   or os.sep in f or f != Path(f).name]
            if bad:
                raise RlexportError("invalid-index", f"index names a shard outside the checkpoint folder: "
                                    f"{bad[0]!r}", file=index, hint="shards are plain file names beside the index")
            files = sorted(set(wm.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise RlexportError("index-missing-shard", f"index names missing shard {missing[0]}", file=index,
                                    hint="copy every shard the index lists")
            return [folder / f for f in files]
    st = sorted(p for p in folder.glob("model*.safetensors"))
    if st:
        return st
    return sorted(folder.glob("pytorch_model*.bin"))


def check_index(folder: Path, refs: list[TensorRef]) -> None:
    """Every tensor the index lists must be in the shards (a stale index over re-saved shards is not)."""
    for index_name in INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            have = {r.name for r in refs}
            lost = [name for name in read_json(index).get("weight_map", {}) if name not in have]
            if lost:
                raise RlexportError("index-mismatch", f"the index lists {len(lost)} tensor(s) no shard holds, "
                                    f"e.g. '{lost[0]}'", file=index,
                                    hint="the index and the shards come from different saves; copy them again")
            return


def refs_of(files: list[Path]) -> list[TensorRef]:
    refs: list[TensorRef] = []
    seen: dict[str, Path] = {}
    for f in files:
        for r in safetensors_refs(f) if f.suffix == ".safetensors" else pickle_refs(f):
            if r.name in seen:
                raise RlexportError("duplicate-tensor", f"tensor '{r.name}' is in two files ({seen[r.name].name})",
                                    file=f, hint="remove the stray file; keep the shards the index names")
            seen[r.name] = f
            refs.append(r)
    return refs
