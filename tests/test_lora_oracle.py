"""Every PEFT variant rlexport merges, on every architecture it names, against PEFT itself.

Per case: a random tiny base, a random adapter made by PEFT (non-zero B, perturbed DoRA magnitudes, trained
copies and tokens), then
  - the oracle: PeftModel.from_pretrained + merge_and_unload in float32, saved by transformers (checkpoint names);
  - every exported float32 tensor within 1e-6 relative of the oracle's, the same names, the same config facts;
  - the bfloat16 export equal to the oracle rounded once;
  - the float32 export's logits through transformers within 1e-4 of the *unmerged* PeftModel's.
Helpers here are shared with the other test_lora_* modules.
"""
from __future__ import annotations

import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import rlexport
from factories import TOKENIZER_FROM, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: conftest.one_thread

# ---- architectures: tiny configs, head_dim 64 -----------------------------------------------------------------

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=64),
    "mistral": dict(model_type="mistral", head_dim=64),
    "gemma": dict(model_type="gemma", head_dim=64, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", head_dim=64, tie_word_embeddings=True, query_pre_attn_scalar=64),
    "phi3": dict(model_type="phi3"),
    "gpt2": dict(model_type="gpt2", n_inner=256),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
}
LINEAR = {  # the linear modules LoRA targets per architecture
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "mixtral": ATTN, "qwen2_moe": ATTN + ("shared_expert.gate_proj", "shared_expert.down_proj"),
}
EMBED = {"gpt2": "wte"}
BIASED = ("qwen2", "gpt2", "qwen2_moe")   # bases whose targeted layers have a bias (lora_bias needs one)
MOE = {"mixtral": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
       "qwen2_moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
NEW_TOKENS = ("<tool>", "</tool>", "<think>", "</think>", "<a>", "<b>", "<c>", "<d>")


def targets(arch: str) -> list[str]:
    return list(LINEAR.get(arch, ATTN + MLP))


@dataclass
class Case:
    arch: str
    variant: str
    lora: dict                       # LoraConfig (or LoHa/LoKr/IA3 config) kwargs
    kind: str = "lora"               # lora | loha | lokr | ia3
    resize: int | None = None        # grow the vocabulary before training (LLaMA-Factory resize_vocab)
    tied: bool | None = None         # override the architecture's tie_word_embeddings
    expect_tied: bool | None = None  # what the export's config must say (None: the oracle's)

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.variant}"


def variants(arch: str) -> list[Case]:
    """The variants that apply to `arch` (PEFT refuses the others, e.g. lora_bias on bias-free layers)."""
    t, emb = targets(arch), EMBED.get(arch, "embed_tokens")
    first, last = t[0], t[-1]
    out = [
        Case(arch, "lora", dict(target_modules=t, r=4, lora_alpha=8)),
        Case(arch, "rslora", dict(target_modules=t, r=8, lora_alpha=4, use_rslora=True)),
        Case(arch, "dora", dict(target_modules=t, r=4, lora_alpha=8, use_dora=True)),
        Case(arch, "patterns", dict(target_modules=t, r=4, lora_alpha=8, rank_pattern={first: 2, rf"1\.\S*{last}": 6},
                                    alpha_pattern={last: 3, first: 16})),
        Case(arch, "layers_to_transform", dict(target_modules=t, r=4, lora_alpha=8, layers_to_transform=[1])),
        Case(arch, "embedding", dict(target_modules=[emb, "lm_head", first], r=4, lora_alpha=8)),
        Case(arch, "embedding_dora", dict(target_modules=[emb, first], r=4, lora_alpha=8, use_dora=True)),
        Case(arch, "modules_to_save", dict(target_modules=[first], modules_to_save=["lm_head", emb])),
        Case(arch, "resized_vocab", dict(target_modules=t, modules_to_save=[emb, "lm_head"]), resize=328),
        Case(arch, "trainable_tokens", dict(target_modules=[first], trainable_token_indices=[1, 2, 7])),
        # tied embeddings: a side trained alone gets its own tensor (untied); shared changes keep the tie
        Case(arch, "tied_lora", dict(target_modules=t), tied=True, expect_tied=True),
        Case(arch, "tied_head_lora", dict(target_modules=["lm_head", first]), tied=True, expect_tied=False),
        Case(arch, "tied_embed_lora", dict(target_modules=[emb, first]), tied=True, expect_tied=False),
        Case(arch, "tied_head_copy", dict(target_modules=[first], modules_to_save=["lm_head"]), tied=True,
             expect_tied=False),
        Case(arch, "tied_tokens", dict(target_modules=[first], trainable_token_indices=[3, 4]), tied=True,
             expect_tied=True),
    ]
    if arch in BIASED:
        biased = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj"]
        out.append(Case(arch, "lora_bias", dict(target_modules=biased, lora_bias=True)))
        out.append(Case(arch, "bias_all", dict(target_modules=[first], bias="all")))
    if arch in MOE:
        out.append(Case(arch, "moe_experts", dict(target_modules=[first], target_parameters=MOE[arch], r=2,
                                                  rank_pattern={"down_proj": 3})))
    if arch in ("llama", "qwen2", "gpt2"):  # the other PEFT types with a closed-form merge
        linear = ["lm_head"] if arch == "gpt2" else t  # rlexport merges LoHa/LoKr on Linear layers, not Conv1D
        out.append(Case(arch, "loha", dict(target_modules=linear, r=4, alpha=8), kind="loha"))
        out.append(Case(arch, "lokr", dict(target_modules=linear, r=4, alpha=8), kind="lokr"))
        out.append(Case(arch, "ia3", dict(target_modules=t, feedforward_modules=[last]), kind="ia3"))
    return out


# ---- building bases and adapters ---------------------------------------------------------------------------------

def base_model(root: Path, arch: str, *, tied: bool | None = None, seed: int = 0) -> Path:
    spec = dict(ARCHS[arch])
    if tied is not None:
        spec["tie_word_embeddings"] = tied
    path = root / f"base-{arch}-{spec.get('tie_word_embeddings', False)}-{seed}"
    if not (path / "config.json").is_file():
        make_tiny_model(path, seed=seed, **spec)
    return path


_LOADED: dict[Path, torch.nn.Module] = {}


def load_base(base: Path):
    """A fresh float32 copy of the base model (PEFT edits models in place; loading once per base is faster)."""
    import copy
    from transformers import AutoModelForCausalLM
    if base not in _LOADED:
        _LOADED[base] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return copy.deepcopy(_LOADED[base])


def grown_tokenizer(dest: Path, size: int) -> None:
    """The base tokenizer plus new special tokens up to `size` (what a trainer saves beside the adapter)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TOKENIZER_FROM)
    tok.add_special_tokens({"additional_special_tokens": list(NEW_TOKENS[: size - len(tok)])})
    assert len(tok) == size
    tok.save_pretrained(dest)


def peft_config(case: Case):
    import peft
    cls = {"lora": peft.LoraConfig, "loha": peft.LoHaConfig, "lokr": peft.LoKrConfig, "ia3": peft.IA3Config}
    kw = dict(case.lora)
    if case.kind == "lora":
        kw["init_lora_weights"] = False
    elif case.kind in ("loha", "lokr"):
        kw["init_weights"] = False
    return cls[case.kind](**kw)


def make_adapter(path: Path, base: Path, case: Case, *, seed: int = 1) -> Path:
    """Train-like adapter: every trainable tensor moved off its init (B, magnitudes, copies, token rows)."""
    from unittest import mock

    from peft import PeftModel, get_peft_model
    model = load_base(base)
    if case.resize:
        model.resize_token_embeddings(case.resize, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, peft_config(case))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if "magnitude" in name or "ia3_l" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name or "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
            else:  # modules_to_save copies, trainable token rows, biases (bias="all")
                p.add_(torch.randn_like(p) * 0.05)
    with warnings.catch_warnings(), mock.patch.object(PeftModel, "create_or_update_model_card"):  # no README
        warnings.simplefilter("ignore")
        pm.save_pretrained(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if case.resize:
        grown_tokenizer(path, case.resize)
    return path


# ---- the oracle and the comparison -------------------------------------------------------------------------------

def prompt(vocab: int) -> torch.Tensor:
    ids = [1, 5, 17, 2, 33, 100, 250, 7, 0, 319] + list(range(320, vocab))
    return torch.tensor([ids])


@dataclass
class Oracle:
    tensors: dict[str, torch.Tensor]
    config: dict
    logits: torch.Tensor       # the unmerged PeftModel's, float32


def one_sided_tied_lora(case: Case) -> bool:
    """LoRA on embed_tokens or lm_head of a tied model: each side is trained on its own."""
    tied = case.tied if case.tied is not None else ARCHS[case.arch].get("tie_word_embeddings", False)
    sides = {EMBED.get(case.arch, "embed_tokens"), "lm_head"}
    return tied and case.kind == "lora" and bool(sides & set(case.lora.get("target_modules", ())))


def untie_embeddings(model) -> None:
    """Give the output embedding its own copy of the shared weight (PEFT then merges each side into its own)."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False


def peft_oracle(base: Path, adapter: Path, out: Path, *, resize: int | None = None, untie_first: bool = False,
                untie: bool = False) -> Oracle:
    """PEFT's merge in float32. With `untie`, the merged tensors come from a base untied before loading the
    adapter: PEFT's merge_and_unload of a tied model adds a one-sided LoRA into the shared weight, changing the
    other side (test_peft_merge_of_a_one_sided_tied_lora_changes_the_model shows it); the logits still come
    from the adapter on the tied base, as trained."""
    from peft import PeftModel
    if untie:
        logits = peft_oracle(base, adapter, out, resize=resize).logits
        merged = peft_oracle(base, adapter, out.with_name(out.name + "-untied"), resize=resize, untie_first=True)
        return Oracle(merged.tensors, merged.config, logits)
    model = load_base(base)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    if untie_first:
        untie_embeddings(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, adapter)
        pm.eval()
        with torch.no_grad():
            logits = pm(prompt(resize or 320)).logits
        pm.merge_and_unload().save_pretrained(out)
    return Oracle(load_folder(out), json.loads((out / "config.json").read_text()), logits)


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def export_logits(folder: Path, vocab: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(prompt(vocab)).logits


def assert_matches_oracle(got: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(oracle)
    for name, ref in oracle.items():
        g = got[name]
        assert g.shape == ref.shape and g.dtype == torch.float32, name
        scale = ref.abs().max().clamp_min(1e-30)
        assert float((g - ref).abs().max() / scale) <= 1e-6, name


def assert_rounded_once(got: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(oracle)
    for name, ref in oracle.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], ref.to(torch.bfloat16)), name


def run_case(case: Case, root: Path, tmp: Path) -> None:
    base = base_model(root, case.arch, tied=case.tied)
    adapter = make_adapter(tmp / "adapter", base, case, seed=zlib.crc32(case.id.encode()))  # random per case
    oracle = peft_oracle(base, adapter, tmp / "oracle", resize=case.resize, untie=one_sided_tied_lora(case))
    out32 = rlexport.export(adapter, tmp / "f32", dtype="float32").out
    got = load_folder(out32)
    before = load_folder(base)
    changed = [n for n, t in got.items() if n not in before or t.shape != before[n].shape
               or not torch.equal(t, before[n].float())]
    assert changed, "the adapter changed nothing: the case cannot fail"
    assert_matches_oracle(got, oracle.tensors)
    cfg = json.loads((out32 / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == oracle.config.get("tie_word_embeddings", False)
    if case.expect_tied is not None:
        assert cfg["tie_word_embeddings"] == case.expect_tied
    vocab = case.resize or 320
    assert cfg["vocab_size"] == vocab
    if case.resize:  # the trained tokenizer, not the base's
        assert (out32 / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()
    assert_rounded_once(load_folder(rlexport.export(adapter, tmp / "bf16", dtype="bfloat16").out), oracle.tensors)
    torch.testing.assert_close(export_logits(out32, vocab), oracle.logits, rtol=0, atol=1e-4)


CASES = [c for arch in ARCHS for c in variants(arch)]


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-bases")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_export_equals_peft_merge(case, bases, tmp_path):
    run_case(case, bases, tmp_path)


def test_every_architecture_and_variant_is_covered():
    covered = {(c.arch, c.variant) for c in CASES}
    assert {a for a, _ in covered} == set(ARCHS)
    for v in ("lora", "rslora", "dora", "patterns", "layers_to_transform", "embedding", "modules_to_save",
              "resized_vocab", "trainable_tokens", "tied_head_lora", "tied_head_copy"):
        assert all((a, v) in covered for a in ARCHS), v
    assert all((a, "lora_bias") in covered for a in BIASED) and all((a, "moe_experts") in covered for a in MOE)

