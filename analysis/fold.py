"""BatchNorm folded into the convolution before it: a faster eval-mode forward (surfaces).

In eval mode ``bn(conv(x))`` equals one convolution with rescaled weights

    W' = W * g / sqrt(v + eps),   b' = (b - m) * g / sqrt(v + eps) + beta,

so each grid point runs one kernel instead of two. :func:`fold_batchnorm` recomputes
the fold from the current (perturbed) tensors on every call, so it is exact for any
point in weight space and works with :func:`torch.func.functional_call`. When the
directions leave a pair's BatchNorm alone (Li et al.'s default ``ignore="biasbn"``),
:func:`prefold_batchnorm` folds it once for the whole grid instead, since the fold is
then linear in the convolution's tensors. The graph is captured once with
``torch.fx``; models it cannot trace fall back to the plain forward.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

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


def _conv_shift(x, w, shift, nd: int, stride, padding, dilation, groups):
    return _CONV_FNS[nd](x, w, shift, stride, padding, dilation, groups)


_FRESH.add(_conv_shift)


def _attr(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _shared_names(model: nn.Module, graph: fx.Graph) -> set[str]:
    """Tensor names read in two places (tied weights, a module called twice)."""
    count: dict[int, int] = {}
    for _, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        count[id(t)] = count.get(id(t), 0) + 1
    tied = {k for k, t in model.state_dict(keep_vars=True).items() if count.get(id(t), 0) > 1}
    reads = [n.target for n in graph.nodes if n.op == "get_attr"]
    return tied | {k for k in reads if reads.count(k) > 1}


def _fold_once(
    net: fx.GraphModule, node: fx.Node, base: dict, dirs: list, perturbed: set, shared: set
) -> bool:
    """Replace one ``_conv_bn`` node by a bare convolution on rescaled tensors, if allowed:
    its BatchNorm tensors are not ``perturbed``, and none of its tensors is ``shared``."""
    x, w, b, *bn, eps, nd, stride, padding, dilation, groups = node.args
    w_name, b_name, bn_names = _attr(w), _attr(b), [_attr(a) for a in bn]
    own = [k for k in (w_name, b_name, *bn_names) if k is not None]
    if None in bn_names or any(k not in base or k in shared for k in own):
        return False
    if any(k in perturbed for k in bn_names):
        return False
    gamma, beta, mean, var = (base[k] for k in bn_names)
    scale = gamma * torch.rsqrt(var + eps)
    s_w = scale.reshape(-1, *[1] * (base[w_name].dim() - 1))
    for t in (base, *dirs):  # W -> W s, for the origin and every direction
        if w_name in t:
            t[w_name] = t[w_name] * s_w
    if b_name is None:  # a constant shift, held by the graph module itself
        b_name = f"_prefolded_shift_{sum(1 for _ in net.buffers())}"
        net.register_buffer(b_name, beta - mean * scale, persistent=False)
        base[b_name] = getattr(net, b_name)
        b = None
    else:  # b -> (b - m) s + beta at the origin, d_b -> d_b s along a direction
        base[b_name] = (base[b_name] - mean) * scale + beta
        for d in dirs:
            if b_name in d:
                d[b_name] = d[b_name] * scale
    with net.graph.inserting_before(node):
        shift = net.graph.get_attr(b_name) if b is None else b
        args = (x, w, shift, nd, stride, padding, dilation, groups)
        node.replace_all_uses_with(net.graph.call_function(_conv_shift, args))
    net.graph.erase_node(node)
    return True


def prefold_batchnorm(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    directions: Sequence[Mapping[str, torch.Tensor]],
    perturbed: set[str],
) -> tuple[nn.Module, dict[str, torch.Tensor], list[dict[str, torch.Tensor]], int]:
    r"""Fold BatchNorm once for the whole grid where the directions leave it alone.

    When none of a conv→BN pair's BatchNorm tensors (weight, bias, running stats) is
    perturbed, as with Li et al.'s ``ignore="biasbn"``, the scale
    :math:`s = g/\sqrt{v+\epsilon}` is the same at every grid point and the fold is
    linear in the convolution's tensors:

    .. math:: (W_0 + \textstyle\sum_j c_j D_j)\,s = W_0 s + \sum_j c_j (D_j s),

    so the base point and the directions are rescaled once, and each grid point runs a
    bare convolution with a constant shift :math:`\beta - m s` (or the rescaled bias).
    Pairs whose BatchNorm is perturbed, or whose tensors are tied or read twice, keep
    the per-point fold of :func:`fold_batchnorm`.

    Args:
        model: the model (not modified).
        base: every parameter and buffer of the model at the origin (on the eval device).
        directions: the directions (same names).
        perturbed: names that some direction moves (non-zero entries).

    Returns:
        ``(net, base', directions', n)``: the module to ``functional_call`` with
        ``base' + sum_j c_j directions'_j``, and the number of pairs folded once.
    """
    net, n_folded = fold_batchnorm(model)
    base, dirs = dict(base), [dict(d) for d in directions]
    if n_folded == 0:
        return net, base, dirs, 0
    shared = _shared_names(model, net.graph)
    pairs = [n for n in net.graph.nodes if n.op == "call_function" and n.target is _conv_bn]
    n = sum(_fold_once(net, node, base, dirs, perturbed, shared) for node in pairs)
    if n:
        net.graph.eliminate_dead_code()
        net.graph.lint()
        net.recompile()
    return net, base, dirs, n
