"""The streaming writer: shard plan, byte-exact safetensors, memory bounded by the largest tensor."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from rlexport.tensors import TensorRef, parse_size
from rlexport.output.layout import plan_shards
from rlexport.output.writer import write_shard


def refs_from(tensors: dict[str, torch.Tensor], live: list[int]):
    def loader(t):
        def load():
            live.append(t.numel() * t.element_size())  # bytes handed to the writer, one tensor at a time
            return t.clone()
        return load
    return [TensorRef(k, v.dtype, tuple(v.shape), loader(v)) for k, v in tensors.items()]


def test_written_file_reads_back_with_the_safetensors_library(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64),
               "d": torch.randn(2, 2).half(), "empty": torch.zeros(0)}
    shard = plan_shards(refs_from(tensors, []), 10**9)[0]
    write_shard(tmp_path / "x.safetensors", shard)
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_shard_plan_respects_limit_and_order():
    tensors = {f"t{i}": torch.zeros(250) for i in range(10)}  # 1000 bytes each
    shards = plan_shards(refs_from(tensors, []), 2500)
    assert [len(s.refs) for s in shards] == [2, 2, 2, 2, 2]
    assert [r.name for s in shards for r in s.refs] == list(tensors)
    big = plan_shards(refs_from({"huge": torch.zeros(10_000)}, []), 100)
    assert len(big) == 1  # a tensor larger than the limit gets a shard of its own, never an empty one


def test_sizes_parse_like_transformers():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 * 1024**3 and parse_size("500KB") == 500_000
