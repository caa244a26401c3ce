"""hub_layout.to_hub_layout on MoE tensors (rlexport.moe): fused transformers-5 experts split into the hub
checkpoint's per-expert tensors, per family (archs.Moe rows), lazily and from only the expert's own bytes; the
experts checked against config.json; config.json's expert-count key as the hub spells it."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rlexport import moe
from rlexport.errors import RlexportError
from rlexport.formats.files import safetensors_refs
from rlexport.hub_layout import to_hub_layout
from rlexport.stream import FileSlice, StreamLoader
from rlexport.tensors import TensorRef

E, I, H = 4, 6, 8  # experts, expert intermediate size, hidden size

CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", num_local_experts=E, hidden_size=H, moe_intermediate_size=I),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=E, hidden_size=H, moe_intermediate_size=I,
                      shared_expert_intermediate_size=2 * I),
    "mixtral": dict(model_type="mixtral", num_local_experts=E, hidden_size=H, intermediate_size=I),
    "deepseek_v3": dict(model_type="deepseek_v3", n_routed_experts=E, hidden_size=H, moe_intermediate_size=I,
                        n_shared_experts=1),
}
# (family, hub names of layer 0's expert 1, router, what must pass through unchanged)
HUB = {
    "qwen3_moe": (("mlp.experts.1.gate_proj", "mlp.experts.1.up_proj", "mlp.experts.1.down_proj"), "mlp.gate", ()),
    "qwen2_moe": (("mlp.experts.1.gate_proj", "mlp.experts.1.up_proj", "mlp.experts.1.down_proj"), "mlp.gate",
                  ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                   "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight")),
    "mixtral": (("block_sparse_moe.experts.1.w1", "block_sparse_moe.experts.1.w3", "block_sparse_moe.experts.1.w2"),
                "block_sparse_moe.gate", ()),
    "deepseek_v3": (("mlp.experts.1.gate_proj", "mlp.experts.1.up_proj", "mlp.experts.1.down_proj"), "mlp.gate",
                    ("mlp.gate.e_score_correction_bias", "mlp.shared_experts.gate_proj.weight")),
}


def ref(name: str, t: torch.Tensor, counter: list | None = None) -> TensorRef:
    def load():
        if counter is not None:
            counter.append(name)
        return t.clone()
    return TensorRef(name, t.dtype, tuple(t.shape), load, "mem")


def fused_layer(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, H, generator=g),
         "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, I, generator=g),
         "model.layers.0.mlp.gate.weight": torch.randn(E, H, generator=g),
         "model.layers.0.input_layernorm.weight": torch.randn(H, generator=g)}
    for extra in HUB[family][2]:
        shape = (1, H) if "shared_expert_gate" in extra else (E,) if "bias" in extra else (2 * I, H)
        t[f"model.layers.0.{extra}"] = torch.randn(*shape, generator=g)
    return t


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fused_experts_become_the_hub_names_with_gate_rows_first(family):
    tensors = fused_layer(family)
    out = {r.name: r for r in to_hub_layout([ref(n, t) for n, t in tensors.items()], CONFIGS[family])}
    (gate, up, down), router, passthrough = HUB[family]
    p = "model.layers.0."
    gu, dn = tensors[p + "mlp.experts.gate_up_proj"], tensors[p + "mlp.experts.down_proj"]
    assert torch.equal(out[p + gate + ".weight"].load(), gu[1, :I])   # transformers 5: gate rows first
    assert torch.equal(out[p + up + ".weight"].load(), gu[1, I:])
    assert torch.equal(out[p + down + ".weight"].load(), dn[1])
    assert torch.equal(out[p + router + ".weight"].load(), tensors[p + "mlp.gate.weight"])
    for name in passthrough:  # shared experts and router buffers are not experts
        assert torch.equal(out[p + name].load(), tensors[p + name])
    experts = [n for n in out if ".experts." in n]
    assert len(experts) == 3 * E and not any(n.endswith(("gate_up_proj", "down_proj")) for n in out)
    assert len(out) == 3 * E + 2 + len(passthrough)


def test_hub_layout_input_passes_unchanged():
    cfg = CONFIGS["qwen3_moe"]
    refs = [ref(r.name, r.load()) for r in to_hub_layout([ref(n, t) for n, t in fused_layer("qwen3_moe").items()],
                                                          cfg)]
    again = to_hub_layout(refs, cfg)
    assert [r.name for r in again] == [r.name for r in refs] and all(a is b for a, b in zip(again, refs))


def test_non_moe_and_fused_hub_families_are_untouched():
    refs = [ref(n, t) for n, t in fused_layer("qwen3_moe").items()]
    for cfg in (dict(model_type="qwen2"), dict(model_type="gpt_oss")):  # gpt-oss hub checkpoints are fused
        assert [r.name for r in to_hub_layout(refs, cfg)] == [r.name for r in refs]


def test_split_reads_only_each_experts_bytes_from_a_safetensors_file(tmp_path):
    tensors = fused_layer("qwen3_moe")
    save_file(tensors, tmp_path / "m.safetensors")
    out = {r.name: r for r in to_hub_layout(safetensors_refs(tmp_path / "m.safetensors"), CONFIGS["qwen3_moe"])}
    up = out["model.layers.0.mlp.experts.2.up_proj.weight"]
    # a plain byte range of the file: streamed (and copied) like any stored tensor, never the whole fused tensor
    assert isinstance(up.load, FileSlice) and up.load.nbytes == I * H * 4
    assert torch.equal(up.load(), tensors["model.layers.0.mlp.experts.gate_up_proj"][2, I:])
    dn = out["model.layers.0.mlp.experts.3.down_proj.weight"]
    assert torch.equal(dn.load(), tensors["model.layers.0.mlp.experts.down_proj"][3])


def test_a_fused_tensor_that_cannot_stream_is_loaded_once_for_all_its_experts():
    loads = []
    tensors = fused_layer("qwen3_moe")
    out = to_hub_layout([ref(n, t, loads) for n, t in tensors.items()], CONFIGS["qwen3_moe"])
    gu = [r for r in out if r.name.endswith(("gate_proj.weight", "up_proj.weight"))]
    got = [r.load() for r in gu]
    assert loads.count("model.layers.0.mlp.experts.gate_up_proj") == 1
    assert torch.equal(torch.stack(got[::2]), tensors["model.layers.0.mlp.experts.gate_up_proj"][:, :I])
    assert gu[0].load().shape == (I, H)  # a later load reads it again
    assert loads.count("model.layers.0.mlp.experts.gate_up_proj") == 2


def test_a_streamable_source_is_read_one_expert_at_a_time():
    layer = fused_layer("qwen3_moe")
    full = layer["model.layers.0.mlp.experts.down_proj"]
    asked = []

    class Rows:
        def rows(self, start, stop, scratch):
            asked.append((start, stop))
            return full[start:stop].clone()

        def close(self):
            pass

    class Src(StreamLoader):
        dtype, shape = full.dtype, tuple(full.shape)

        def open(self):
            return Rows()
    r = TensorRef("model.layers.0.mlp.experts.down_proj", full.dtype, tuple(full.shape), Src(), "mem")
    gu = ref("model.layers.0.mlp.experts.gate_up_proj", layer["model.layers.0.mlp.experts.gate_up_proj"])
    out = {x.name: x for x in moe.to_per_expert([r, gu], CONFIGS["qwen3_moe"])}
    assert torch.equal(out["model.layers.0.mlp.experts.2.down_proj.weight"].load(), full[2])
    assert asked == [(2, 3)]


# ---- bad input: one error, before any byte is read ------------------------------------------------------------

def _hub_refs(family="qwen3_moe"):
    return [ref(n, t) for n, t in fused_layer(family).items()]


def test_expert_missing():
    refs = [r for r in to_hub_layout(_hub_refs(), CONFIGS["qwen3_moe"]) if ".experts.2.up_proj" not in r.name]
    with pytest.raises(RlexportError) as e:
        to_hub_layout(refs, CONFIGS["qwen3_moe"])
    assert e.value.code == "moe-expert-missing" and "experts.2.up_proj" in e.value.message


def test_last_experts_missing_against_config():
    refs = [r for r in to_hub_layout(_hub_refs(), CONFIGS["qwen3_moe"]) if ".experts.3." not in r.name]
    with pytest.raises(RlexportError) as e:
        moe.check_experts(refs, CONFIGS["qwen3_moe"])
    assert e.value.code == "moe-expert-missing"


@pytest.mark.parametrize("hub", [False, True])
def test_expert_count_disagrees_with_config(hub):
    cfg = dict(CONFIGS["qwen3_moe"], num_local_experts=3)
    refs = to_hub_layout(_hub_refs(), CONFIGS["qwen3_moe"]) if hub else _hub_refs()
    with pytest.raises(RlexportError) as e:
        to_hub_layout(refs, cfg)
    assert e.value.code == "moe-expert-count" and "num_experts = 3" in e.value.message


@pytest.mark.parametrize("name,shape", [("model.layers.0.mlp.gate.weight", (E - 1, H)),
                                        ("model.layers.0.mlp.gate.weight", (E, H + 1)),
                                        ("model.layers.0.mlp.shared_expert_gate.weight", (2, H))])
def test_router_of_the_wrong_shape(name, shape):
    refs = [ref(r.name, torch.zeros(shape)) if r.name == name else r for r in _hub_refs("qwen2_moe")]
    with pytest.raises(RlexportError) as e:
        to_hub_layout(refs, CONFIGS["qwen2_moe"])
    assert e.value.code == "moe-router-shape"


# ---- config.json ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,key,gone", [("qwen3_moe", "num_experts", "num_local_experts"),
                                             ("qwen2_moe", "num_experts", None),
                                             ("mixtral", "num_local_experts", None),
                                             ("deepseek_v3", "n_routed_experts", None)])
def test_config_spells_the_expert_count_as_the_hub_does(family, key, gone):
    cfg = moe.hub_config(dict(CONFIGS[family]))
    assert cfg[key] == E and (gone is None or gone not in cfg)


def test_facts_name_the_layout_found_and_written():
    cfg = CONFIGS["qwen2_moe"]
    fused = [r.name for r in _hub_refs("qwen2_moe")]
    f = moe.facts(fused, dict(cfg, num_experts_per_tok=2))
    assert f["experts"] == E and f["top_k"] == 2 and f["layout_found"] == "fused"
    assert f["layout_written"] == "per-expert" and "shared_expert_gate" in f["shared_experts"]
    assert moe.facts([r.name for r in to_hub_layout(_hub_refs("qwen2_moe"), cfg)], cfg)["layout_found"] == \
        "per-expert"
    assert moe.facts(fused, dict(model_type="qwen2")) is None
