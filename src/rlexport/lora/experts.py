"""LoRA on parameters (PEFT target_parameters), in practice MoE expert stacks.

PEFT wraps the in-memory parameter (transformers >= 5 fuses experts: `<block>.experts.gate_up_proj`
[experts, out, in]) with lora_A [r*E, in] and lora_B [out, r*E]; several parameters of one module nest, the inner
one under `.base_layer`. Which parameter a saved pair belongs to is decided by shape. The checkpoint keeps either
the fused parameter itself or one 2-D tensor per expert and part (archs.Experts); the delta is sliced to match.
"""
from __future__ import annotations

import itertools
import re

import torch

from .. import archs
from ..errors import RlexportError
from ..tensors import TensorRef
from .config import lora_scaling, rank_alpha


def _layouts(m, module: str) -> dict[str, tuple]:
    """Candidate parameters of `module`: name -> ("fused", name, shape) or ("split", [(name, rows)...] per expert,
    (E, out, in))."""
    out = {}
    for t in m.config.get("target_parameters") or ():
        tmod, _, p = t.rpartition(".")
        if not (tmod == module or module.endswith("." + tmod)):
            continue
        fused = m.resolve(f"{module}.{p}")
        if fused is not None:
            out[p] = ("fused", fused, m.shape(fused))
            continue
        spec = next((e for e in m.arch.experts if e.param == p), None)
        if spec is None:
            continue
        block = module
        for frm, to in m.arch.renames:
            block = block.replace(frm, to)
        experts = []
        while all(f"{block}.{len(experts)}.{part}.weight" in m.base for part in spec.parts):
            names = [f"{block}.{len(experts)}.{part}.weight" for part in spec.parts]
            experts.append([(n, m.shape(n)) for n in names])
        if experts:
            first = experts[0]
            if any([s for _, s in e] != [s for _, s in first] for e in experts):
                raise RlexportError("base-shape-mismatch", f"the experts under {block} differ in shape",
                                    file=m.adapter.path, hint="pass the --base the adapter was trained on")
            shape = (len(experts), sum(s[0] for _, s in first), first[0][1][1])
            out[p] = ("split", experts, shape)
    return out


def plan_param(m, u) -> None:
    """Add the ops of one saved ParamWrapper pair to the Merge `m`."""
    layouts = _layouts(m, u.module)
    a, b = u.a, u.b

    def fits(shape) -> bool:
        e = shape[0] if len(shape) == 3 else 1
        out, inn = shape[-2:]
        return a.shape[1] == inn and b.shape[0] == out and a.shape[0] == b.shape[1] and a.shape[0] % e == 0
    found = [p for p, lay in layouts.items() if fits(lay[2]) and (u.module, p) not in m.params_taken]
    if len(found) != 1:
        what = "matches none" if not found else f"could be any of {', '.join(found)}"
        raise RlexportError("base-shape-mismatch", f"the adapter's parameter LoRA on {u.module} "
                            f"(A {list(a.shape)}, B {list(b.shape)}) {what} of the base's target_parameters",
                            file=m.adapter.path, hint="pass the --base the adapter was trained on")
    p = found[0]
    m.params_taken.add((u.module, p))
    kind, where, shape = layouts[p]
    experts = shape[0] if len(shape) == 3 else 1
    r, alpha = rank_alpha(m.config, f"{u.module}.{p}", m.adapter.path / "adapter_config.json")
    if r * experts != a.shape[0]:
        raise RlexportError("adapter-rank-mismatch", f"{u.module}.{p}: tensors have rank {a.shape[0] // experts} "
                            f"but adapter_config.json says r={r}", file=m.adapter.path / "adapter_config.json",
                            hint="use the adapter_config.json saved with these weights")
    s = lora_scaling(m.config, r, alpha)
    if kind == "fused" and len(shape) == 2:
        m.add(where, (a, b, s, False))
        return
    if kind == "fused":
        def fused(w: torch.Tensor) -> torch.Tensor:
            b3 = b.load().float().reshape(b.shape[0], -1, experts)
            a3 = a.load().float().reshape(experts, -1, a.shape[-1])
            return w.add_(torch.einsum("o r e, e r i -> e o i", b3, a3) * s)
        m.add(where, fused)
        return
    # one 2-D tensor per expert and part: expert e's rows [lo, hi) of the delta, as a plain low-rank term
    for e, parts in enumerate(where):
        a_e = a.mapped(lambda t, e=e: t.reshape(experts, -1, t.shape[-1])[e], shape=(r, a.shape[1]))
        row = 0
        for name, pshape in parts:
            lo, hi = row, row + pshape[0]
            row = hi
            b_e = b.mapped(lambda t, e=e, lo=lo, hi=hi: t.reshape(t.shape[0], -1, experts)[lo:hi, :, e],
                           shape=(hi - lo, r))
            m.add(name, (a_e, b_e, s, False))


# ---- a PeftModel saved whole (verl's rank files): the target_parameters settings PEFT used, from the tensors ----

_NESTED = re.compile(r"^(?P<module>.+?)(?P<nest>(?:\.base_layer)+)\.(?P<param>[^.]+)$")


def saved_whole_params(refs: list[TensorRef], config: dict, r: int, alpha, file) -> dict:
    """`target_parameters`, `rank_pattern`, `alpha_pattern` of a PeftModel whose state dict was saved whole with
    only r and alpha recorded (verl's lora_train_meta.json). Names are without `base_model.model.` and adapter name.

    A ParamWrapper'd parameter is stored as `M(.base_layer)^n.P` (n wrappers on module M); the parameters of M are
    wrapped in definition order, the first innermost (peft BaseTuner._inject_parameters), so the pair
    `M(.base_layer)^d.lora_A` belongs to the (n-d)-th targeted parameter; the shapes must agree. Its rank is the
    rows of lora_A over the experts. PEFT's conversion of a transformers-4 target list (verl's default
    target_modules="all-linear") gives a fused parameter of k parts rank k*r and alpha k*alpha; anything else
    disagrees with the recorded r."""
    names = {ref.name: ref for ref in refs}
    modules: dict[str, tuple[int, list[TensorRef]]] = {}
    for ref in refs:
        m = _NESTED.match(ref.name)
        if m and m["param"] not in ("weight", "bias") and len(ref.shape) == 3 and ".lora_" not in ref.name:
            n = m["nest"].count(".base_layer")
            modules.setdefault(m["module"], (n, []))[1].append(ref)
    arch = archs.arch_of(config)
    targets: list[str] = []
    ranks: dict[str, int] = {}
    for module, (n, params) in modules.items():
        pairs = [(names.get(f"{module}{'.base_layer' * d}.lora_A.weight"),
                  names.get(f"{module}{'.base_layer' * d}.lora_B.weight")) for d in range(n)]
        fits = [c for c in itertools.combinations(params, n)
                if all(a is not None and b is not None and _fits(p.shape, a, b) for p, (a, b) in
                       zip(c, reversed(pairs)))]
        if len(fits) != 1:
            raise RlexportError("adapter-rank-mismatch", f"the LoRA pairs under {module} fit "
                                f"{'none' if not fits else 'several'} of its parameters "
                                f"{[p.name.rsplit('.', 1)[-1] for p in params]}", file=file,
                                hint="the rank files do not come from one PEFT model; copy them again")
        for p, (a, _) in zip(fits[0], reversed(pairs)):
            leaf = p.name.rsplit(".", 1)[-1]
            tmod = module.rsplit(".", 1)[-1]
            if f"{tmod}.{leaf}" not in targets:
                targets.append(f"{tmod}.{leaf}")
            rank = a.shape[0] // p.shape[0]
            if ranks.setdefault(leaf, rank) != rank:
                raise RlexportError("adapter-rank-mismatch", f"{leaf}: LoRA rank {rank} under {module}, "
                                    f"{ranks[leaf]} elsewhere", file=file,
                                    hint="the rank files do not come from one PEFT model; copy them again")
    rank_pattern, alpha_pattern = {}, {}
    for leaf, rank in ranks.items():
        spec = next((x for x in arch.experts if x.param == leaf), None)
        k = len(spec.parts) if spec else 1
        if rank not in (r, k * r):
            raise RlexportError("adapter-rank-mismatch", f"{leaf}: the tensors have LoRA rank {rank} but the run "
                                f"recorded r={r} (PEFT gives a parameter r or {k} x r)", file=file,
                                hint="use the lora_train_meta.json saved with these rank files")
        if rank != r:
            rank_pattern[rf".*\.{leaf}"], alpha_pattern[rf".*\.{leaf}"] = rank, alpha * rank // r \
                if isinstance(alpha, int) and (alpha * rank) % r == 0 else alpha * rank / r
    return {"target_parameters": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "param_modules": sorted(modules)}


def _fits(shape, a: TensorRef, b: TensorRef) -> bool:
    e, out, inn = shape
    return len(a.shape) == 2 and len(b.shape) == 2 and a.shape[1] == inn and b.shape[0] == out \
        and a.shape[0] == b.shape[1] and a.shape[0] % e == 0
