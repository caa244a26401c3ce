"""Where each tensor goes: shards planned from the TensorRefs' dtypes and shapes (known before any byte is read),
their safetensors headers, and the index. The layout is the library's format: u64 header length, JSON header
padded with spaces to 8 bytes, then the data.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..stream import StreamLoader
from ..errors import RlexportError
from ..tensors import ST_NAMES, TensorRef


@dataclass(frozen=True)
class Shard:
    filename: str
    refs: tuple[TensorRef, ...]
    source: Path | None = None  # an input file holding exactly these tensors, unchanged: linked or copied whole

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.refs)


LINK_MODES = ("auto", "hard", "copy")


def plan_shards(refs: list[TensorRef], max_shard_bytes: int, *, link: str = "copy") -> list[Shard]:
    """Split in order; a new shard starts when the next tensor would cross the limit (never empty).

    Unless link="copy", a run of tensors that is exactly an input file's tensors, unchanged (same names, dtypes,
    shapes, bytes), becomes a shard of its own that the writer reflinks, hard-links (link="hard") or copies whole
    instead of streaming it tensor by tensor.
    """
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {LINK_MODES}")
    names = set()
    for ref in refs:
        if ref.name in names:
            raise RlexportError("duplicate-tensor", f"two tensors would be written as '{ref.name}'",
                                file=ref.origin, hint="the checkpoint holds the same weight twice; remove one")
        names.add(ref.name)
    groups: list[tuple[list[TensorRef], Path | None]] = []
    size = 0
    i = 0
    while i < len(refs):
        n, source = _whole_file_run(refs, i, max_shard_bytes) if link != "copy" else (0, None)
        if n:
            groups.append((list(refs[i:i + n]), source))
            i += n
            continue
        ref = refs[i]
        if not groups or groups[-1][1] is not None or (groups[-1][0] and size + ref.nbytes > max_shard_bytes):
            groups.append(([], None))
            size = 0
        groups[-1][0].append(ref)
        size += ref.nbytes
        i += 1
    if not groups:
        groups = [([], None)]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g), src) for i, (g, src) in enumerate(groups)]


def stored_unchanged(ref: TensorRef):
    """The file bytes an output tensor is, verbatim (with the checks they still need), or None."""
    st = ref.load.stored if isinstance(ref.load, StreamLoader) else None
    if st is None or st.file.name != ref.name or st.file.dtype != ref.dtype or \
            tuple(st.file.shape) != tuple(ref.shape):
        return None
    return st


MAX_HEADER = 100 << 20  # safetensors' own limit


def _file_tensors(path: Path) -> set[str] | None:
    """The tensor names of a safetensors file that could be placed whole as an output shard (None: not one;
    a .bin's tensors are byte ranges too, but the file is not a safetensors shard)."""
    if path.suffix != ".safetensors":
        return None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return {k for k in header if k != "__metadata__"}


def _whole_file_run(refs: list[TensorRef], i: int, max_shard_bytes: int) -> tuple[int, Path | None]:
    first = stored_unchanged(refs[i])
    if first is None:
        return 0, None
    path = first.file.path
    names = _file_tensors(path)
    if not names:
        return 0, None
    j, size = i, 0
    while j < len(refs) and j - i < len(names):
        st = stored_unchanged(refs[j])
        if st is None or st.file.path != path:
            break
        size += refs[j].nbytes
        j += 1
    if {r.name for r in refs[i:j]} != names or size > max_shard_bytes:
        return 0, None
    return j - i, path


def header_bytes(refs: tuple[TensorRef, ...]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for r in refs:
        header[r.name] = {"dtype": ST_NAMES[r.dtype], "shape": list(r.shape),
                          "data_offsets": [offset, offset + r.nbytes]}
        offset += r.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_index(folder: Path, shards: list[Shard]) -> None:
    # Always an index, even for one shard: vLLM then loads only the files it names.
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
             "weight_map": {r.name: s.filename for s in shards for r in s.refs}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
