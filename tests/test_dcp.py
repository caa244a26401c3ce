"""The shared torch-DCP reader (formats/dcp.py): `.metadata` through the allowlist, chunk byte ranges read lazily,
views (fixed leading indices, row ranges) of checkpoints torch.distributed.checkpoint writes here, and one-line
errors for each way a DCP folder can be broken."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import rlexport
from factories import FIXTURES
from rlexport.formats.dcp import load_metadata, open_index, ref

NEMO = FIXTURES / "nemorl_dcp_policy_qwen2" / "ckpt" / "step_4" / "policy" / "weights"


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict]:
    import torch.distributed.checkpoint as dcp
    g = torch.Generator().manual_seed(0)
    sd = {"stack": torch.randn(3, 6, 4, generator=g), "flat": torch.randn(7, generator=g),
          "half": torch.randn(5, 2, generator=g).to(torch.bfloat16)}
    dcp.save(sd, checkpoint_id=tmp_path / "ck", no_dist=True)
    return tmp_path / "ck", sd


def _error(fn) -> rlexport.RlexportError:
    with pytest.raises(rlexport.RlexportError) as e:
        fn()
    assert "\n" not in str(e.value)
    return e.value


def test_views_read_the_bytes_torch_wrote(saved, monkeypatch):
    folder, sd = saved
    calls, real = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append(n) or real(fd, n, off))
    index = open_index(folder)
    assert set(index.tensors) == set(sd) and not calls  # indexing reads no tensor bytes
    st = index.tensors["stack"]
    assert st.shape == (3, 6, 4) and st.dtype == torch.float32
    assert torch.equal(ref(st, "all").load(), sd["stack"])
    assert torch.equal(ref(st, "layer1", lead=(1,)).load(), sd["stack"][1])
    rows = ref(st, "cut", lead=(2,), rows=[(4, 6), (0, 1)]).load()  # stacked in the order asked
    assert torch.equal(rows, torch.cat([sd["stack"][2, 4:6], sd["stack"][2, 0:1]]))
    assert torch.equal(ref(index.tensors["flat"], "f", rows=[(2, 5)]).load(), sd["flat"][2:5])
    assert torch.equal(ref(index.tensors["half"], "h").load(), sd["half"])


def test_a_real_sharded_checkpoint_is_read_chunk_by_chunk():
    index = open_index(NEMO)  # NeMo-RL's FSDP2 save: every tensor in 2 row chunks, one file per rank
    st = index.tensors["model.model.embed_tokens.weight"]
    assert len(st.chunks) == 2 and {c.file.name for c in st.chunks} == {"__0_0.distcp", "__1_0.distcp"}
    whole = ref(st, "e").load()
    assert whole.shape == (320, 128)
    assert torch.equal(ref(st, "e", rows=[(150, 170)]).load(), whole[150:170])  # across the chunk border


def test_a_class_outside_the_allowlist_is_refused_and_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=4))
    e = _error(lambda: load_metadata(tmp_path / ".metadata"))
    assert e.code == "unsafe-pickle" and "system" in str(e) and not (tmp_path / "pwned").exists()


def test_damaged_metadata(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}, protocol=4))
    assert _error(lambda: load_metadata(tmp_path / ".metadata")).code == "corrupt-pickle"
    (tmp_path / ".metadata").write_bytes(b"\x80\x04garbage")
    assert _error(lambda: load_metadata(tmp_path / ".metadata")).code == "corrupt-pickle"


def test_a_missing_distcp_file_is_named(saved):
    folder, _ = saved
    victim = next(folder.glob("*.distcp"))
    victim.unlink()
    e = _error(lambda: open_index(folder))
    assert e.code == "missing-file" and victim.name in str(e)


def test_sizes_beyond_the_file(saved):
    folder, _ = saved
    victim = next(folder.glob("*.distcp"))
    os.truncate(victim, victim.stat().st_size - 10)
    e = _error(lambda: open_index(folder))
    assert e.code == "corrupt-checkpoint" and victim.name in str(e) and "truncated" in str(e)


def test_chunks_that_do_not_cover_a_tensor(tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(NEMO, folder)
    md = load_metadata(folder / ".metadata")
    key = "model.model.embed_tokens.weight"
    drop = [i for i in md.storage_data if i.fqn == key and tuple(i.offset) != (0, 0)]
    for i in drop:  # the second rank's chunk has no storage entry
        del md.storage_data[i]
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f, protocol=4)
    st = open_index(folder).tensors[key]
    e = _error(lambda: ref(st, "model.embed_tokens.weight", file=folder / ".metadata"))
    assert e.code == "corrupt-checkpoint" and "do not cover" in str(e) and ".metadata" in str(e)


def test_a_storage_path_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(NEMO, folder)
    md = load_metadata(folder / ".metadata")
    first = next(iter(md.storage_data))
    md.storage_data[first].relative_path = "../../etc/passwd"
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f, protocol=4)
    e = _error(lambda: open_index(folder))
    assert e.code == "corrupt-checkpoint" and "outside" in str(e)
