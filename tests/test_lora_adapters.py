"""Several adapters in one folder (`--adapter NAME`), QLoRA adapters, the streamed merge, PEFT's tied merge."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import rlexport
from rlexport.cli import main
from test_lora_oracle import (Case, assert_matches_oracle, base_model, export_logits, load_folder, make_adapter,
                              peft_oracle, prompt)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return base_model(tmp_path_factory.mktemp("bases"), "qwen2")


def two_adapters(path, base, *, with_default: bool):
    """PeftModel.save_pretrained with two adapters: `default` at the root, the other in `<name>/`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    first = "default" if with_default else "alpha"
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                        adapter_name=first)
    pm.add_adapter("beta", LoraConfig(target_modules=["o_proj"], r=2, use_rslora=True, lora_alpha=3,
                                      init_lora_weights=False))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(path, selected_adapters=[first, "beta"])
    for cfg_file in path.rglob("adapter_config.json"):
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = str(base)
        cfg_file.write_text(json.dumps(cfg))
    return path


def test_adapter_option_picks_each_adapter_of_a_folder(tmp_path, qwen2):
    folder = two_adapters(tmp_path / "two", qwen2, with_default=True)
    assert (folder / "adapter_config.json").is_file() and (folder / "beta" / "adapter_config.json").is_file()
    for name, sub in (("default", folder), ("beta", folder / "beta")):
        oracle = peft_oracle(qwen2, sub, tmp_path / f"oracle-{name}")
        got = load_folder(rlexport.export(folder, tmp_path / name, dtype="float32", adapter=name).out)
        assert_matches_oracle(got, oracle.tensors)
    # without --adapter the root's (default) adapter is the one merged
    plain = load_folder(rlexport.export(folder, tmp_path / "plain", dtype="float32").out)
    assert all(torch.equal(plain[k], v) for k, v in load_folder(tmp_path / "default").items())
    assert not torch.equal(plain["model.layers.0.self_attn.o_proj.weight"],
                           load_folder(tmp_path / "beta")["model.layers.0.self_attn.o_proj.weight"])


def test_cli_adapter_option_and_the_one_line_errors(tmp_path, qwen2, capsys):
    folder = two_adapters(tmp_path / "subs", qwen2, with_default=False)
    assert not (folder / "adapter_config.json").exists()  # only alpha/ and beta/
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", str(folder), "--out", str(tmp_path / "x"), "-q"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error[several-adapters]: the folder holds adapters alpha, beta") and "--adapter" in err
    assert "\n" not in err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["export", str(folder), "--out", str(tmp_path / "x"), "--adapter", "gamma", "-q"])
    assert capsys.readouterr().err.startswith("error[adapter-not-found]: no adapter 'gamma' here")
    main(["export", str(folder), "--out", str(tmp_path / "beta"), "--adapter", "beta", "--dtype", "float32", "-q"])
    assert_matches_oracle(load_folder(tmp_path / "beta"), peft_oracle(qwen2, folder / "beta", tmp_path / "o").tensors)


def test_qlora_adapter_merges_into_the_full_precision_base_and_refuses_a_quantized_one(tmp_path, qwen2):
    # A QLoRA adapter is an ordinary LoRA file trained over a 4-bit copy of the base; its config names the
    # quantized checkpoint. Merging into that checkpoint cannot be exact: rlexport refuses and asks for the
    # full-precision base, into which the merge is PEFT's.
    import shutil
    quant = tmp_path / "base-bnb-4bit"
    shutil.copytree(qwen2, quant)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quant / "config.json").write_text(json.dumps(cfg))
    case = Case("qwen2", "qlora", dict(target_modules=["q_proj", "down_proj"], r=16, lora_alpha=32))
    adapter = make_adapter(tmp_path / "qlora", qwen2, case)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(quant)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(adapter, tmp_path / "out", dtype="float32")
    assert e.value.code == "quantized-base" and "bitsandbytes" in e.value.message and "--base" in e.value.hint
    assert not (tmp_path / "out").exists()
    got = load_folder(rlexport.export(adapter, tmp_path / "out", dtype="float32", base=qwen2).out)
    assert_matches_oracle(got, peft_oracle(qwen2, adapter, tmp_path / "oracle").tensors)


def test_peft_merge_of_a_one_sided_tied_lora_changes_the_model(tmp_path):
    # Why rlexport does not copy merge_and_unload here: on tied embeddings PEFT adds the lm_head LoRA into the
    # shared weight, so the input embedding changes too and the merged model is not the trained one.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = base_model(tmp_path, "gemma")
    adapter = make_adapter(tmp_path / "a", base, Case("gemma", "head", dict(target_modules=["lm_head"])))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        trained = pm(prompt(320)).logits
        peft_merged = pm.merge_and_unload()(prompt(320)).logits
    assert (peft_merged - trained).abs().max() > 1e-3
    out = rlexport.export(adapter, tmp_path / "out", dtype="float32").out
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(export_logits(out, 320), trained, rtol=0, atol=1e-4)


def test_streamed_row_blocks_equal_peft_order_merge_bit_for_bit():
    from rlexport.lora.streamed import LowRankMerge
    from rlexport.stream import Rows, Scratch, StreamLoader
    from rlexport.tensors import TensorRef

    def ref(t):
        return TensorRef("t", t.dtype, tuple(t.shape), lambda: t)
    torch.manual_seed(0)
    for transposed in (False, True):
        w = torch.randn(300, 200).to(torch.bfloat16)
        a, b = torch.randn(8, 300 if transposed else 200), torch.randn(200 if transposed else 300, 8)
        s = 16 / 8 ** 0.5  # rsLoRA: not a power of two, where a fused addmm would round differently
        d = b @ a
        peft = w.float() + (d.T if transposed else d) * s
        whole = LowRankMerge(lambda: w, [(ref(a), ref(b), s, transposed)], (300, 200))()
        assert torch.equal(whole, peft)

        class Base(StreamLoader, Rows):  # a streamable base, as the writer sees file slices
            dtype, shape = w.dtype, tuple(w.shape)

            def open(self):
                return self

            def rows(self, start, stop, scratch):
                return w[start:stop].clone()
        loader = LowRankMerge(Base(), [(ref(a), ref(b), s, transposed)], (300, 200))
        assert loader.streamable
        opened = loader.open()
        blocks = torch.cat([opened.rows(i, min(i + 37, 300), Scratch()).clone() for i in range(0, 300, 37)])
        assert torch.equal(blocks, peft)


def test_a_bfloat16_adapter_file_merges_as_peft_upcasts_it(tmp_path, qwen2):
    # trainers often save adapters in bf16; PEFT loads them upcast to float32 (autocast_adapter_dtype)
    from safetensors.torch import load_file, save_file
    adapter = make_adapter(tmp_path / "a", qwen2, Case("qwen2", "bf16", dict(target_modules=["q_proj", "up_proj"],
                                                                            use_dora=True, use_rslora=True)))
    f = adapter / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f)
    got = load_folder(rlexport.export(adapter, tmp_path / "out", dtype="float32").out)
    assert_matches_oracle(got, peft_oracle(qwen2, adapter, tmp_path / "oracle").tensors)


def test_an_in_memory_peft_dump_with_adapter_names_reads_like_the_saved_file(tmp_path, qwen2):
    # `lora_A.default.weight`, `lora_magnitude_vector.default.weight`: names of a live PeftModel's state dict
    from safetensors.torch import load_file, save_file
    import shutil
    saved = make_adapter(tmp_path / "a", qwen2, Case("qwen2", "dump", dict(target_modules=["k_proj"], use_dora=True)))
    oracle = peft_oracle(qwen2, saved, tmp_path / "oracle").tensors
    adapter = shutil.copytree(saved, tmp_path / "dump")
    f = adapter / "adapter_model.safetensors"
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
               .replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight"): v
               for k, v in load_file(f).items()}
    save_file(renamed, f)
    assert any(".default." in k for k in load_file(f))
    assert_matches_oracle(load_folder(rlexport.export(adapter, tmp_path / "out", dtype="float32").out), oracle)


def test_streamed_dora_row_blocks_equal_peft_dora_merge_bit_for_bit():
    # DoRA's norm is per output row: rows of the merged weight need only rows of W and B (and all of A)
    from peft.tuners.lora.dora import DoraLinearLayer
    from rlexport.lora.streamed import Dora, LowRankMerge
    from rlexport.stream import Rows, Scratch, StreamLoader
    from rlexport.tensors import TensorRef

    def ref(t):
        return TensorRef("t", t.dtype, tuple(t.shape), lambda: t)
    torch.manual_seed(0)
    w = torch.randn(300, 200).to(torch.bfloat16)
    a, b = torch.randn(8, 200) * 0.1, torch.randn(300, 8) * 0.1
    m = torch.rand(300) + 0.5
    for s in (16 / 8 ** 0.5, 2.0):  # rsLoRA and a power of two (the fused path is off for DoRA)
        delta = (b @ a) * s
        # PEFT's merge (DoraLinearVariant.merge_safe): factor = m / weight_norm, new = factor * (W + dW)
        norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(w.float(), delta, scaling=1).detach()
        peft = (m / norm).view(-1, 1) * (w.float() + delta)

        class Base(StreamLoader, Rows):
            dtype, shape = w.dtype, tuple(w.shape)

            def open(self):
                return self

            def rows(self, start, stop, scratch):
                return w[start:stop].clone()
        term = Dora((ref(a), ref(b), s, False), ref(m))
        assert torch.equal(LowRankMerge(lambda: w, [term], (300, 200))(), peft)
        opened = LowRankMerge(Base(), [term], (300, 200)).open()
        blocks = torch.cat([opened.rows(i, min(i + 37, 300), Scratch()).clone() for i in range(0, 300, 37)])
        assert torch.equal(blocks, peft)
