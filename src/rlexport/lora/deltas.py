"""The merge formulas, on float32 tensors, written in the same operation order as PEFT so that a float32 merge
matches `merge_and_unload` bit for bit and a 16-bit export is that result rounded once (by transforms.cast).

Shapes use PEFT's conventions: lora_A [r, in], lora_B [out, r]; a weight is [out, in] unless `fan_in_fan_out`
(transformers Conv1D, [in, out]); embeddings are [vocab, dim] with lora_embedding_A [r, vocab], _B [dim, r].
"""
from __future__ import annotations

import torch


def fp32(ref) -> torch.Tensor:
    """A TensorRef's values in float32, the one precision every formula here runs in."""
    return ref.load().to(torch.float32)


def linear_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """peft lora.Linear.get_delta_weight: transpose(B @ A, fan_in_fan_out) * scaling."""
    d = b @ a
    return (d.T if fan_in_fan_out else d) * scaling


def embedding_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """peft lora.Embedding.get_delta_weight: (B @ A).T * scaling, shape [vocab, dim]."""
    return (b @ a).T * scaling


def dora_linear(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """peft DoraLinearVariant.merge: m / ||W + dW||_row * (W + dW), the norm per output row ([out, in] view)."""
    wt, dt = (w.T, delta.T) if fan_in_fan_out else (w, delta)
    norm = torch.linalg.norm(wt + 1 * dt, dim=1).to(wt.dtype)
    factor = (magnitude / norm).view(-1, 1)
    return (factor.T if fan_in_fan_out else factor) * (w + delta)


def dora_embedding(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """peft DoraEmbeddingVariant.merge: the norm per embedding column, m is [dim]."""
    norm = torch.linalg.norm(w.T + 1 * delta.T, dim=1).to(w.dtype)
    return (magnitude / norm).view(1, -1) * (w + delta)


def loha_delta(w1a, w1b, w2a, w2b, scaling: float) -> torch.Tensor:
    """peft LoHa (Hadamard product): ((w1a @ w1b) * (w2a @ w2b)) * scale."""
    return ((w1a @ w1b) * (w2a @ w2b)) * torch.tensor(scaling)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scaling: float) -> torch.Tensor:
    """peft LoKr (Kronecker product): kron(w1, w2) * scale; w1 / w2 are full or products of their factors."""
    return torch.kron(w1, w2.contiguous()) * scaling


def ia3_scale(w: torch.Tensor, vec: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """peft IA3 Linear.merge: W * l, l is [out, 1] (scales rows) or [1, in] (feed-forward: scales columns)."""
    return torch.mul(w, vec.T if fan_in_fan_out else vec)
