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

from . import archs
from .errors import RlexportError
from .formats import Source
from .formats.value_heads import TRL_HEAD
from .tensors import TensorRef
from .hub_layout import to_hub_layout
from .transforms import apply_adapter, cast, strip_wrappers, tie_embeddings

HEAD_NAMES = {"weight": "score.weight", "bias": "score.bias"}


def _by_kind(src: Source) -> dict[str, TensorRef]:
    prefix = src.head.prefix
    by_kind = {}
    for ref in src.value_head:
        kind = ref.name.rsplit(".", 1)[-1]
        if kind not in HEAD_NAMES or not ref.name.endswith(f"{prefix.rsplit('.', 1)[-1]}.{kind}"):
            raise RlexportError("value-head-unknown", f"unexpected value-head tensor '{ref.name}'",
                                file=ref.origin, hint=f"expected {prefix}.weight and optionally {prefix}.bias")
        by_kind[kind] = ref
    if "weight" not in by_kind:
        raise RlexportError("value-head-missing", "value head has a bias but no weight", file=src.value_head_file,
                            hint="copy the complete value_head.safetensors from the training run")
    return by_kind


def head_refs(src: Source, *, normalize: bool = True) -> list[TensorRef]:
    """`score.weight` and `score.bias` in float32, with the reward normalisation folded in when there is one.

    OpenRLHF serves (h @ w + b - mean) / std; folding gives w' = w / std, b' = (b - mean) / std, computed in
    float64 and rounded once to float32, so the engine's raw output is the trainer's normalised reward. A head
    saved without a bias gets a zero one: the token classifier's score has a bias, and a missing one would be
    initialised at random by transformers.
    """
    if not src.value_head:
        raise RlexportError("value-head-missing", f"no value head to export (no {TRL_HEAD}.* or score.* head "
                            "tensors)", file=src.path,
                            hint="export the reward model from its own RM run folder, which saves the head")
    by_kind = _by_kind(src)
    w = by_kind["weight"]
    if len(w.shape) != 2 or w.shape[0] != 1:
        raise RlexportError("value-head-shape", f"{w.name} has shape {list(w.shape)}, expected [1, H]",
                            file=w.origin, hint="only single-output value heads are supported")
    b = by_kind.get("bias") or TensorRef("score.bias", torch.float32, (1,), lambda: torch.zeros(1), w.origin)
    info = src.head
    mean, std = (info.mean, info.std) if normalize and info.normalizable else (0.0, 1.0)
    # The head stays float32 whatever the body's dtype: vLLM runs pooling heads in float32 anyway, and a
    # bias like 4.8 would lose 2 digits in bfloat16.
    return [w.renamed(HEAD_NAMES["weight"]).mapped(lambda t: (t.double() / std).float(), dtype=torch.float32),
            b.renamed(HEAD_NAMES["bias"]).mapped(lambda t: ((t.double() - mean) / std).float(), dtype=torch.float32)]


def head_record(src: Source, *, normalize: bool = True) -> dict:
    """What config.json's `rlexport` field says about the head: where it came from and what it serves."""
    info = src.head
    folded = normalize and info.normalizable
    serves = ("normalised reward (score - mean) / std" if folded else "raw reward") if info.pooling == "last" \
        else ("normalised per-token value" if folded else "per-token value")
    return {"target": "value", "head": info.prefix, "convention": info.convention, "stage": src.stage,
            "head_bias": len(src.value_head) == 2, "mean": info.mean, "std": info.std,
            "normalization_folded": folded, "serves": serves,
            "pooling": ("last token (classify)" if info.pooling == "last" else "every token (token_classify)")
            + "; token_classify = every token, classify = last token", "activation": "none"}


def plan_value(src: Source, dtype: torch.dtype, *, allow_nonfinite: bool,
               normalize: bool = True) -> tuple[list[TensorRef], dict]:
    """The body (no output layer) and the float32 score head; and the `rlexport` record for config.json."""
    head = head_refs(src, normalize=normalize)
    refs = to_hub_layout(strip_wrappers(list(src.weights)), src.config)  # MoE experts, VLM prefixes: hub names
    if src.adapter is not None:
        refs = apply_adapter(refs, src.adapter)
    refs, _ = tie_embeddings(refs, src.config)  # a tied pair keeps its embedding; the LM head goes
    emb, out_layer = archs.embedding_pair(src.config)
    hidden = next((r.shape[1] for r in refs if r.name == emb), None)
    if hidden is not None and head[0].shape[1] != hidden:
        raise RlexportError("value-head-shape", f"value head expects hidden size {head[0].shape[1]}, the model "
                            f"has {hidden}", file=src.value_head_file, hint="pass the --base the head was trained on")
    # neither token-classification class has an output layer (its bias neither, where a family has one)
    no_output = (out_layer, out_layer.removesuffix(".weight") + ".bias")
    body = [cast(r, dtype, allow_nonfinite=allow_nonfinite) for r in refs if r.name not in no_output]
    return body + head, head_record(src, normalize=normalize)
