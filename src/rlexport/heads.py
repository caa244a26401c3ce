"""Value and reward heads -> a token-classification model that vLLM's pooling runner and transformers serve.

TRL / LLaMA-Factory's value head is `v_head.summary = Linear(hidden, 1)` with bias, applied to the final
(post-norm) hidden state at every position. The one encoding that is exact in both stacks (checked on
vLLM 0.32 and transformers 5.19; see README "Value and reward models"):

- architecture `<Family>ForTokenClassification`, `num_labels: 1`, `problem_type: "regression"`;
- `score.weight` <- `v_head.summary.weight` [1, H], `score.bias` <- `v_head.summary.bias` [1];
- no `lm_head.weight` (neither class has one).

vLLM builds it as the causal-LM body plus a `score` head with the bias attached, pooled per token
(`token_classify`, the default for this architecture) or at the last token (`PoolerConfig(task="classify")`);
`problem_type: regression` turns its default sigmoid off. transformers' `*ForTokenClassification` has a biased
`score`, so `AutoModelForTokenClassification` gives the same numbers. (`*ForSequenceClassification` would drop
the bias in transformers.)
"""
from __future__ import annotations

import torch

from . import folder
from .errors import RlexportError
from .formats import Source
from .tensors import TensorRef
from .transforms import apply_adapter, cast, strip_wrappers, tie_embeddings

HEAD_NAMES = {"weight": "score.weight", "bias": "score.bias"}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
OUTPUT_LAYERS = ("lm_head.weight", "lm_head.bias", "embed_out.weight")


def value_architecture(config: dict, *, file) -> str:
    for arch in config.get("architectures") or []:
        for suffix in CAUSAL_SUFFIXES:
            if arch.endswith(suffix):
                return arch[: -len(suffix)] + "ForTokenClassification"
    raise RlexportError("no-value-architecture", f"cannot derive a token-classification architecture from "
                        f"{config.get('architectures')}", file=file,
                        hint="the value target supports causal-LM bases (architectures ending in ForCausalLM)")


def head_refs(src: Source) -> list[TensorRef]:
    if not src.value_head:
        where = "the PPO reward adapter's head is kept in memory by LLaMA-Factory, never saved" \
            if src.stage == "ppo-reward-adapter" else "no v_head.summary.* tensors or value_head.safetensors"
        raise RlexportError("value-head-missing", f"no value head to export ({where})", file=src.path,
                            hint="export the reward model from its own RM run folder, which saves the head")
    by_kind = {}
    for ref in src.value_head:
        kind = ref.name.rsplit(".", 1)[-1]
        if kind not in HEAD_NAMES or not ref.name.endswith(f"summary.{kind}"):
            raise RlexportError("value-head-unknown", f"unexpected value-head tensor '{ref.name}'",
                                file=ref.origin, hint="only TRL's v_head.summary (Linear(hidden, 1)) is supported")
        by_kind[kind] = ref
    if "weight" not in by_kind:
        raise RlexportError("value-head-missing", "value head has a bias but no weight", file=src.value_head_file,
                            hint="copy the complete value_head.safetensors from the training run")
    w = by_kind["weight"]
    if len(w.shape) != 2 or w.shape[0] != 1:
        raise RlexportError("value-head-shape", f"v_head.summary.weight has shape {list(w.shape)}, expected [1, H]",
                            file=w.origin, hint="only single-output value heads are supported")
    # The head stays float32 whatever the body's dtype: vLLM runs pooling heads in float32 anyway, and a
    # bias like 4.8 would lose 2 digits in bfloat16.
    out = [cast(w.renamed(HEAD_NAMES["weight"]), torch.float32)]
    if "bias" in by_kind:
        out.append(cast(by_kind["bias"].renamed(HEAD_NAMES["bias"]), torch.float32))
    return out


def plan_value(src: Source, dtype: torch.dtype, *, allow_nonfinite: bool) -> tuple[list[TensorRef], dict]:
    head = head_refs(src)
    refs = strip_wrappers(list(src.weights))
    if src.adapter is not None:
        refs = apply_adapter(refs, src.adapter)
    refs, _ = tie_embeddings(refs, src.config)  # a tied pair keeps its embedding; the LM head goes
    hidden = next((r.shape[1] for r in refs if r.name.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if hidden is not None and head[0].shape[1] != hidden:
        raise RlexportError("value-head-shape", f"value head expects hidden size {head[0].shape[1]}, the model "
                            f"has {hidden}", file=src.value_head_file, hint="pass the --base the head was trained on")
    body = [cast(r, dtype, allow_nonfinite=allow_nonfinite) for r in refs if r.name not in OUTPUT_LAYERS]
    has_bias = len(head) == 2
    cfg = folder.model_config(src, dtype=dtype, vocab_size=None, tied=False, updates={
        "architectures": [value_architecture(src.config, file=src.path)],
        "num_labels": 1, "id2label": {"0": "value"}, "label2id": {"value": 0},
        "problem_type": "regression",
        # Documented in the README: where the head came from and how to get raw per-token values.
        "rlexport": {"target": "value", "head": "v_head.summary", "head_bias": has_bias,
                     "stage": src.stage, "pooling": "token_classify (all tokens); classify = last token",
                     "activation": "none"},
    })
    return body + head, cfg
