"""Numbers: rebuild the training-time model independently of rlexport's merge; compute its numbers and the
export's (compare.py judges them).

The reference is built with the training stack, never with rlexport's transforms: base + adapter through PEFT
(`PeftModel.from_pretrained`, unmerged, as in training) or the trainer's full weights loaded into the
transformers class, with the value head as `Linear(hidden, 1)` on the last hidden state (after the final norm),
as TRL/LLaMA-Factory apply it. Both sides run in float32, so a difference measures the export's weights.

Plug-in point for value/reward exports: `head_scores(folder, prompts)` computes a classifier folder's per-token
scores from its own `score.*` tensors (whatever the head class), and `reference(...)` the value head's.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs, moe
from ..formats import Source
from ..formats.value_heads import is_head_tensor
from ..tensors import TensorRef
from ..transforms import clean_name
from .images import image_inputs, image_logprobs, model_class

N = "numbers"
TEXTS = ("The capital of France is", "def add(a, b):\n    return a +", "Once upon a time, there was a little",
         "1, 2, 3, 4, 5,")
# max |Δ| allowed, by the export's weight dtype: logprobs in nats, scores relative to max(1, |reference|).
# Measured on the fixtures (bf16 exports of fp32-trained models): logprobs 0.003-0.007, scores 0.4 %.
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 0.05, torch.float16: 0.01}
SCORE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.02, torch.float16: 0.005}
CACHE_WEIGHTS_BYTES = 256_000_000  # references up to this size keep their weights for the next verify call
_CACHE: dict[tuple, "Reference"] = {}


@dataclass
class Numbers:
    """What a model says on the prompts. logprobs[i][j] = log p(prompt[j+1] | prompt[:j+1])."""

    logprobs: list[list[float]] = field(default_factory=list)
    greedy: list[list[int]] = field(default_factory=list)
    margins: list[list[float]] = field(default_factory=list)   # top1 - top2 logit at each greedy step
    scores: list[list[float]] = field(default_factory=list)    # head output at every prompt position


def tolerance(dtype: torch.dtype | None, table: dict = TOLERANCE) -> float:
    return table.get(dtype, table[torch.bfloat16])


@contextmanager
def quiet():
    """transformers' loading report and progress bars off: verify prints its own table (and --json its JSON)."""
    from transformers.utils import logging as tlog
    level, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def make_prompts(tokenizer, rows: int | None) -> list[list[int]]:
    """A few fixed texts through the tokenizer; seeded random ids when that fails or leaves the vocabulary."""
    out = []
    try:
        out = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS] if tokenizer is not None else []
    except Exception:  # any tokenizer failure: fall back to ids
        out = []
    limit = rows or 2
    if len(out) != len(TEXTS) or any(len(p) < 2 or max(p) >= limit for p in out):
        g = torch.Generator().manual_seed(0)
        out = [torch.randint(0, limit, (n,), generator=g).tolist() for n in (12, 9, 15, 7)]
    return [p[:48] for p in out]


# --- computing numbers ---------------------------------------------------------------------------------------------
def left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of a left-padded batch: every row ends at the last column."""
    n, width = len(seqs), max(len(q) for q in seqs)
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, width - len(q):] = torch.tensor(q)
        mask[i, width - len(q):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def policy_numbers(model, prompts: list[list[int]], max_new_tokens: int) -> Numbers:
    """Prompt logprobs and greedy continuations, all prompts in one left-padded batch with a KV cache."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids, mask, pos = left_padded(prompts)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    lp = torch.log_softmax(out.logits.float(), -1)
    num = Numbers()
    for i, p in enumerate(prompts):
        off = width - len(p)
        num.logprobs.append([lp[i, off + j - 1, p[j]].item() for j in range(1, len(p))])
    last, past = out.logits[:, -1].float(), out.past_key_values
    steps = []
    for _ in range(max_new_tokens):
        top = last.topk(2, dim=-1)
        steps.append((top.indices[:, 0], top.values[:, 0] - top.values[:, 1]))
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], -1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=top.indices[:, :1], attention_mask=mask, position_ids=pos, past_key_values=past,
                    use_cache=True)
        last, past = out.logits[:, -1].float(), out.past_key_values
    num.greedy = [[int(t[i]) for t, _ in steps] for i in range(n)]
    num.margins = [[float(m[i]) for _, m in steps] for i in range(n)]
    return num


@torch.no_grad()
def score_numbers(backbone, weight: torch.Tensor, bias: torch.Tensor | None, prompts,
                  norm: tuple[float, float] | None = None) -> Numbers:
    """The head on the final hidden states, as the trainer computes it (OpenRLHF: (score - mean) / std after)."""
    w = weight.float()
    b = bias.float() if bias is not None else None
    scores = []
    for p in prompts:
        h = backbone(torch.tensor([p])).last_hidden_state[0].float()
        s = h @ w.T + (b if b is not None else 0)
        if norm is not None:
            s = (s - norm[0]) / norm[1]
        scores.append(s[:, 0].tolist())
    return Numbers(scores=scores)


def _backbone(causal_lm):
    return getattr(causal_lm, causal_lm.base_model_prefix)


def _load_full(src: Source, target: str = "policy"):
    """The trainer's full weights in the transformers class, float32, loaded strictly."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(src.config_dir)
    model = model_class(src.config).from_config(config, dtype=torch.float32)
    state = {}
    # a MoE checkpoint stored per expert (hub layout): stacked into transformers 5's fused expert parameters
    weights = moe.to_memory_layout({clean_name(r.name): r for r in src.weights}, src.config)
    for n, r in weights.items():  # the head is not among them (Source.value_head)
        name = archs.to_memory(src.config, n)  # a vision-language model's hub names too
        if not is_head_tensor(name):
            state[name] = r.load().to(torch.float32)
    result = model.load_state_dict(state, strict=False)
    # a reward model or critic saved whole has no LM head; its value target never needs one
    tied = {k for k in result.missing_keys if k.startswith("lm_head") and (config.tie_word_embeddings or
                                                                          target == "value")}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"the checkpoint does not load into {type(model).__name__}: missing "
                         f"{sorted(set(result.missing_keys) - tied)[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    return model.eval()


def _load_peft(src: Source):
    """Base + adapter through PEFT, unmerged: the model as it ran in training."""
    from peft import PeftModel
    if src.base_dir is None:
        return _load_peft_saved_whole(src)
    base = model_class(src.config).from_pretrained(src.base_dir, dtype=torch.float32)
    rows = next((r.shape[0] for n, r in src.adapter.full.items() if n.endswith("embed_tokens.weight")), None)
    if rows is not None and rows != base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(rows)
    return PeftModel.from_pretrained(base, src.path).eval()


def _load_peft_saved_whole(src: Source):
    """A PeftModel its trainer saved whole (verl: base and LoRA factors in the rank files, no adapter folder):
    the base from its tensors, PEFT's own LoRA layers around it, the saved factors loaded into them."""
    from peft import get_peft_model
    model = get_peft_model(_load_full(src), src.adapter.peft_config())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for u in src.adapter.updates:
            for role, ref in (("A", u.a), ("B", u.b)):
                nest = ".base_layer" * u.depth  # several MoE expert parameters: nested ParamWrappers
                params[f"base_model.model.{u.module}{nest}.lora_{role}.default.weight"].copy_(ref.load().float())
    return model.eval()


@dataclass
class Reference:
    numbers: Numbers
    weights: dict[str, torch.Tensor] | None  # the merged float32 tensors, by export name (backbone + lm_head)
    how: str


def _key(src: Source, target: str, prompts, max_new_tokens: int) -> tuple:
    files = [src.path / "adapter_model.safetensors", src.value_head_file, *(Path(r.origin) for r in src.weights[:1])]
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files if f is not None and Path(f).is_file())
    return (str(Path(src.path).resolve()), str(src.base_dir), target, stamp, max_new_tokens,
            tuple(map(tuple, prompts)))


def reference(src: Source, target: str, prompts, *, max_new_tokens: int = 12, weights: bool = True,
              normalize: bool = True) -> Reference:
    """The training-time model's numbers (and merged weights) on the prompts, built with transformers/PEFT.

    Small references are cached per process (verifying several exports of one checkpoint rebuilds it once).
    """
    key = _key(src, target, prompts, max_new_tokens) + (normalize,)
    hit = _CACHE.get(key)
    if hit is not None and (hit.weights is not None or not weights):
        return hit
    with quiet():
        ref = _build(src, target, prompts, max_new_tokens, weights, normalize)
    if ref.weights is None or sum(t.nbytes for t in ref.weights.values()) <= CACHE_WEIGHTS_BYTES:
        _CACHE.clear()
        _CACHE[key] = ref
    return ref


def _build(src: Source, target: str, prompts, max_new_tokens: int, weights: bool, normalize: bool = True) -> Reference:
    if src.adapter is not None:
        model, how = _load_peft(src), f"base {src.base_dir} + adapter {src.path} through PEFT (unmerged)"
    else:
        model, how = _load_full(src, target), f"the trainer's full weights {src.path}"
    if target == "policy":
        num = policy_numbers(model, prompts, max_new_tokens)
        # vision-language: one more row, a chat with a picture (the training processor, from the checkpoint)
        num.logprobs += image_logprobs(model, image_inputs(_processor_dir(src), src.config))
    else:
        if not src.value_head:
            raise ValueError("the checkpoint has no value head to compare the exported head with")
        head = {r.name.rsplit(".", 1)[-1]: r.load() for r in src.value_head}
        inner = model.get_base_model() if src.adapter is not None else model
        info = src.head
        norm = (info.mean, info.std) if normalize and info.normalizable else None
        num = score_numbers(_backbone(inner), head["weight"], head.get("bias"), prompts, norm)
        how += f", value head {src.value_head_file}" + (f", normalised (x - {info.mean}) / {info.std}" if norm else "")
    state = None
    if weights:
        merged = model.merge_and_unload() if src.adapter is not None else model
        # by export name (a vision-language model's hub layout); no copy: the model goes
        state = {archs.to_hub(src.config, k): v.detach() for k, v in merged.state_dict().items()}
        state = moe.split_state(state, src.config)  # MoE experts one by one, as the export writes them
        if target == "value":
            state = {k: v for k, v in state.items() if not k.startswith("lm_head")}
    del model
    return Reference(num, state, how)


def head_scores(folder: Path, prompts, refs: dict[str, TensorRef]) -> tuple[Numbers, list[str]]:
    """Per-token scores of a classifier folder: its backbone (transformers, float32) + its stored score.*."""
    import transformers
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    with quiet():
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    weight = refs["score.weight"].load()
    bias = refs["score.bias"].load() if "score.bias" in refs else None
    problems = _loading_problems(info, ignore={"score.bias"})
    return score_numbers(_backbone(model), weight, bias, prompts), problems


def _loading_problems(info: dict, ignore=frozenset()) -> list[str]:
    out = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        items = [k for k in (info.get(key) or []) if (k[0] if isinstance(k, tuple) else k) not in ignore]
        if items:
            out.append(f"transformers {key.replace('_', ' ')}: {sorted(map(str, items))[:3]}")
    return out


def export_numbers(folder: Path, target: str, prompts, refs: dict[str, TensorRef], *,
                   max_new_tokens: int = 12) -> tuple[Numbers, list[str]]:
    """The export loaded the way a user loads it (from_pretrained), upcast to float32; plus loading problems."""
    if target == "value":
        return head_scores(folder, prompts, refs)
    import json
    config = json.loads((Path(folder) / "config.json").read_text())
    with quiet():
        model, info = model_class(config).from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    model.eval()
    num = policy_numbers(model, prompts, max_new_tokens)
    num.logprobs += image_logprobs(model, image_inputs(Path(folder), config))  # the export's own processor
    return num, _loading_problems(info)


def _processor_dir(src: Source) -> Path | None:
    if archs.vision_of(src.config) is None:
        return None
    from ..folder import processor_dir
    return processor_dir(src)
