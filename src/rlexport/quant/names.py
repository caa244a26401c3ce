"""compressed-tensors tensor names back to the dense parameters, for the structure checks (headers only).

A quantized Linear `X` is stored as `X.weight` (int8 / float8_e4m3fn codes, the dense shape) or
`X.weight_packed` ([out, in * bits / 32] int32) with `X.weight_shape` ([2] int64), plus `X.weight_scale`
([out, 1] or [out, in / group_size], a float dtype). The checks compare the dense `X.weight` [out, in] with the
meta-device model, so every Linear is proven present and shaped right; the scale's shape is checked here.
"""
from __future__ import annotations

SUFFIXES = (".weight_scale", ".weight_packed", ".weight_shape", ".weight_zero_point", ".weight_g_idx")


def _weights_args(config: dict) -> dict | None:
    q = (config or {}).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        return None
    for group in (q.get("config_groups") or {}).values():
        if isinstance(group, dict) and isinstance(group.get("weights"), dict):
            return group["weights"]
    return {}


def dense_shapes(config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """(name -> shape with every quantized Linear as its dense `.weight`, problems with the quantized tensors).
    Without a compressed-tensors quantization_config the shapes come back unchanged."""
    args = _weights_args(config)
    if args is None:
        return dict(shapes), []
    bits = int(args.get("num_bits") or 8)
    group = args.get("group_size") if args.get("strategy") == "group" else None
    out: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    for name, shape in shapes.items():
        if name.endswith(".weight_packed"):
            module = name[: -len(".weight_packed")]
            if len(shape) != 2:
                problems.append(f"{name}: packed weight of shape {list(shape)}, expected 2-D")
                continue
            out[f"{module}.weight"] = (shape[0], shape[1] * 32 // bits)
            if f"{module}.weight_shape" not in shapes:
                problems.append(f"{name} without {module}.weight_shape (vLLM cannot unpack it)")
        elif not name.endswith(SUFFIXES):
            out[name] = tuple(shape)
    for name, shape in shapes.items():
        if not name.endswith(".weight_scale"):
            continue
        module = name[: -len(".weight_scale")]
        dense = out.get(f"{module}.weight")
        if dense is None or len(dense) != 2:
            problems.append(f"{name} scales no 2-D {module}.weight")
            continue
        want = (dense[0], -(-dense[1] // group) if group else 1)
        if tuple(shape) != want:
            problems.append(f"{name}: stored {list(shape)}, expected {list(want)} (vLLM's loader fails on it)")
    return out, problems
