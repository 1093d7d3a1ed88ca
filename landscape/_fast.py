"""A faster inference pass for surfaces: BatchNorm folded into the convolution before it.

In eval mode ``bn(conv(x))`` equals one convolution with rescaled weights

    W' = W * g / sqrt(v + eps),   b' = (b - m) * g / sqrt(v + eps) + beta,

so each grid point runs one kernel instead of two. The fold is recomputed from
the current (perturbed) tensors on every call, so it is exact for any point in
weight space and works with :func:`torch.func.functional_call`. The graph is
captured once with ``torch.fx``; models it cannot trace fall back to the plain
forward.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _conv_bn(x, w, b, g, beta, mean, var, eps: float, nd: int, stride, padding, dilation, groups):
    scale = g * torch.rsqrt(var + eps)
    w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    shift = beta - mean * scale if b is None else (b - mean) * scale + beta
    return _CONV_FNS[nd](x, w, shift, stride, padding, dilation, groups)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) in _CONVS
        and isinstance(bn, _BNS)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.affine
        and bn.num_features == conv.out_channels
    )


_FRESH = {_conv_bn, operator.add, torch.add}  # ops whose output is a new tensor (no view)
_RELUS = {torch.relu, F.relu}


def _relu_in_place(gm: fx.GraphModule) -> None:
    """``relu(t)`` -> ``relu_(t)`` where ``t`` is a fresh tensor used only by the relu.

    Saves one activation-sized allocation and copy per ReLU; exact, since nothing
    else reads ``t``.
    """
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        if (
            node.op == "call_function"
            and node.target in _RELUS
            and not node.kwargs.get("inplace", False)
            and isinstance(src, fx.Node)
            and src.op == "call_function"
            and src.target in _FRESH
            and len(src.users) == 1
        ):
            node.target, node.kwargs = torch.relu_, {}


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A ``torch.fx`` copy of ``model``'s graph with conv→BN pairs folded (eval mode only).

    The returned GraphModule shares ``model``'s submodules and tensors (nothing
    is copied), so ``functional_call(folded, params, x)`` accepts the same names
    as ``model``. Returns ``(model, 0)`` when the model cannot be traced or has
    nothing to fold.

    Returns:
        ``(module, number_of_folded_pairs)``.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow, unsupported ops, ...
        return model, 0
    mods = dict(gm.named_modules())
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BNS):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = mods[src.target], mods[node.target]
        if not _foldable(conv, bn):
            continue
        with gm.graph.inserting_before(node):
            get = lambda mod, name: gm.graph.get_attr(f"{mod}.{name}")  # noqa: E731
            args = (
                src.args[0],
                get(src.target, "weight"),
                None if conv.bias is None else get(src.target, "bias"),
                get(node.target, "weight"),
                get(node.target, "bias"),
                get(node.target, "running_mean"),
                get(node.target, "running_var"),
                float(bn.eps),
                _CONVS[type(conv)],
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            )
            fused = gm.graph.call_function(_conv_bn, args)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(src)
        n += 1
    if n == 0:
        return model, 0
    _relu_in_place(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, n
