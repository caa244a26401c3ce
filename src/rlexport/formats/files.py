"""Reading weight files: safetensors headers first, bytes on demand; pickles only with weights_only."""
from __future__ import annotations

import json
import pickle
import struct
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import RlexportError
from ..stream import FileSlice
from ..tensors import FROM_ST, TensorRef

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RlexportError("missing-file", "file not found", file=path, hint="check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RlexportError("invalid-json", f"not valid JSON ({e})", file=path,
                            hint="restore the file from the training run") from None
    except OSError as e:
        raise RlexportError("unreadable-file", f"cannot read: {e.strerror}", file=path,
                            hint="check permissions") from None
    if not isinstance(data, dict):
        raise RlexportError("invalid-json", "expected a JSON object", file=path,
                            hint="restore the file from the training run")
    return data


# One open handle per file, few files at once: safe_open mmaps, so a handle costs address space, not RSS.
@lru_cache(maxsize=8)
def _handle(path: str):
    return safe_open(path, framework="pt", device="cpu")


def _corrupt(path: Path, err: Exception) -> RlexportError:
    return RlexportError("corrupt-safetensors", f"unreadable safetensors file ({err})", file=path,
                         hint="the file is truncated or damaged; copy it again from the training machine")


def safetensors_refs(path: Path) -> list[TensorRef]:
    """TensorRefs for every tensor of a safetensors file, in file (offset) order."""
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
            refs.append(TensorRef(name, dtype, shape, _loader(path, offsets[name], dtype, shape), str(path)))
        return refs
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        _handle.cache_clear()
        raise _corrupt(path, e) from None


def _data_offsets(path: Path) -> dict[str, int]:
    """Absolute file offset of each tensor's bytes (safe_open has validated the header already)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def _loader(path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> FileSlice:
    # pread into our own buffers, not safe_open's mmap: mapped pages count as RSS until unmapped, so reading a
    # model through the mmap grows the process by the model's size. FileSlice also streams row blocks.
    return FileSlice(path, offset, dtype, shape, on_error=lambda e: _corrupt(path, e))


def safetensors_metadata(path: Path) -> dict:
    try:
        return _handle(str(path)).metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, e) from None


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A .bin/.pt state dict, read with weights_only=True: no code from the file ever runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise RlexportError("unsafe-pickle", f"refused to unpickle: {str(e).splitlines()[0][:160]}", file=path,
                            hint="only plain tensor state dicts are read; convert the file to safetensors "
                                 "where it was made") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise RlexportError("corrupt-pickle", f"unreadable weights file ({str(e).splitlines()[0][:160]})",
                            file=path, hint="the file is truncated or damaged; copy it again") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RlexportError("corrupt-pickle", "not a state dict of tensors", file=path,
                            hint="pass the folder that holds the model weights")
    return obj


def pickle_refs(path: Path) -> list[TensorRef]:
    sd = load_pickle_weights(path)  # mmap=True: tensors stay on disk until touched
    return [TensorRef(k, v.dtype, tuple(v.shape), (lambda v=v: v), str(path)) for k, v in sd.items()]


def weight_files(folder: Path) -> list[Path]:
    """The model's weight files: those an index names, else model*.safetensors, else pytorch_model*.bin."""
    for index_name in INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise RlexportError("invalid-index", "index has no weight_map", file=index,
                                    hint="restore the index from the training run")
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
