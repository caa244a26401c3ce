"""The streaming pipeline: row blocks, bounded buffers, checks on every block, unchanged shards placed whole."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import rlexport
from rlexport import stream, writer
from test_export import load_folder


def _export_bytes(src, out, **kw) -> dict[str, bytes]:
    rlexport.export(src, out, **kw)
    return {k: v.view(torch.uint8).numpy().tobytes() if v.numel() else b"" for k, v in load_folder(out).items()}


def test_tiny_blocks_give_the_same_bytes_as_whole_tensors(tmp_path, tiny_lora, monkeypatch):
    whole = _export_bytes(tiny_lora, tmp_path / "a", dtype="bfloat16")
    monkeypatch.setattr(writer, "BLOCK_BYTES", 1000)       # many blocks per tensor, ragged last block
    monkeypatch.setattr(writer, "SUB_BLOCK_BYTES", 300)    # several sub-blocks per block
    monkeypatch.setattr(writer, "COPY_BYTES", 4096)
    blocks = _export_bytes(tiny_lora, tmp_path / "b", dtype="bfloat16")
    assert blocks == whole
    f32 = _export_bytes(tiny_lora, tmp_path / "c", dtype="float32")
    monkeypatch.setattr(writer, "default_workers", lambda: 1)
    assert _export_bytes(tiny_lora, tmp_path / "d", dtype="float32") == f32


def test_buffers_are_bounded_by_the_sub_block_not_the_tensor(tmp_path, tiny_lora, monkeypatch):
    biggest = []
    take = stream.Scratch.take

    def spy(self, dtype, shape):
        t = take(self, dtype, shape)
        biggest.append(t.numel() * t.element_size())
        return t
    monkeypatch.setattr(stream.Scratch, "take", spy)
    monkeypatch.setattr(writer, "SUB_BLOCK_BYTES", 2048)
    rlexport.export(tiny_lora, tmp_path / "out", dtype="bfloat16")
    tensors = load_folder(tmp_path / "out").values()
    largest_tensor = max(t.numel() * 4 for t in tensors)
    widest_row = max(t.shape[-1] for t in tensors)
    from rlexport.lora.streamed import MIN_ROWS
    # float32 rows of a 2 KB sub-block, or of MIN_ROWS rows for the LoRA product (+ a merged short tail)
    assert biggest and max(biggest) <= 4 * widest_row * 2 * max(MIN_ROWS, 2048 // 2 // widest_row + 1)
    assert max(biggest) < largest_tensor


def _bf16_model(path, tensors):
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                  "torch_dtype": "bfloat16", "tie_word_embeddings": False}))
    return path


def _tensors():
    torch.manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(64, 32).bfloat16(),
            "model.norm.weight": torch.ones(32).bfloat16(),
            "lm_head.weight": torch.randn(64, 32).bfloat16()}


@pytest.mark.parametrize("link", ["auto", "hard", "copy"])
def test_unchanged_model_is_placed_whole_and_still_checked(tmp_path, link):
    src = _bf16_model(tmp_path / "m", _tensors())
    rlexport.export(src, tmp_path / "out", link=link)
    out = tmp_path / "out" / "model-00001-of-00001.safetensors"
    got = load_file(out)
    assert all(torch.equal(got[k], v) for k, v in _tensors().items())
    same_inode = os.stat(out).st_ino == os.stat(src / "model.safetensors").st_ino
    assert same_inode == (link == "hard")
    if link != "copy":
        assert out.read_bytes() == (src / "model.safetensors").read_bytes()  # the input file, header and all

    bad = _tensors()
    bad["model.norm.weight"][3] = float("nan")
    src2 = _bf16_model(tmp_path / "bad", bad)
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(src2, tmp_path / "out2", link=link)
    assert e.value.code == "nonfinite-weights" and "model.norm.weight" in e.value.message
    assert not (tmp_path / "out2").exists()
    rlexport.export(src2, tmp_path / "out3", link=link, allow_nonfinite=True)
    assert load_file(tmp_path / "out3" / "model-00001-of-00001.safetensors")["model.norm.weight"].isnan().sum() == 1


def test_checks_see_every_block(tmp_path, monkeypatch):
    t = _tensors()
    t["lm_head.weight"][-1, -1] = float("inf")  # in the last block only
    src = _bf16_model(tmp_path / "m", t)
    monkeypatch.setattr(writer, "BLOCK_BYTES", 256)
    monkeypatch.setattr(writer, "SUB_BLOCK_BYTES", 64)
    for link in ("auto", "copy"):
        with pytest.raises(rlexport.RlexportError) as e:
            rlexport.export(src, tmp_path / f"out-{link}", link=link)
        assert e.value.code == "nonfinite-weights" and "lm_head.weight" in e.value.message
    t = _tensors()
    t["lm_head.weight"][-1, -1] = 70000.0
    src = _bf16_model(tmp_path / "m2", t)
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(src, tmp_path / "out-fp16", dtype="float16")
    assert e.value.code == "fp16-overflow"
