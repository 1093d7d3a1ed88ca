r"""MESA's teacher forward with BatchNorm folded into its convolutions, where that pays.

A MESA step adds the teacher's no-grad eval forward to an SGD step (:class:`saf.EMA`). In
eval mode a convolution followed by BatchNorm is one convolution with

.. math:: s = \gamma/\sqrt{\sigma^2+\epsilon},\quad W' = s\,W,\quad b' = \beta - s\,\mu

(per output channel). The teacher's weights change after every step, so the fold is
redone before every forward; to make that cheap, the folded pairs' :math:`W`,
:math:`\gamma`, :math:`\beta`, :math:`\mu` and :math:`\sigma^2` are packed side by side
into one buffer (:func:`pack`: the same tensor objects, re-pointed, values unchanged) and
the whole network refolds in six kernels (:meth:`FoldedForward.refold`): exact for the
current EMA weights, up to float rounding. Folding pays when a batch's BatchNorm outputs
outnumber the conv weights enough (:data:`FOLD_MIN_RATIO`), decided once per input shape.
The teacher's graph is captured with ``torch.fx``; pairs it cannot fold (a convolution
with a bias, a module called twice, a BatchNorm before its convolution as in
pre-activation blocks) run as they are, and a model fx cannot trace runs unfolded.

Measured side by side (``benchmarks/train_cost.py``, resnet_small on digits, CPU) this
takes MESA from 1.251 to 1.238 SGD steps (medians of eight 2-thread runs) and from 1.264 to
1.240 at 1 thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BN_PARTS = ("weight", "bias", "running_mean", "running_var")


def pack(tensors: Sequence[Tensor]) -> Tensor | None:
    """Re-point ``tensors`` into one new contiguous buffer (values kept) and return it.

    Returns ``None`` (and changes nothing) unless they are distinct, contiguous and share
    one dtype and device.
    """
    if not tensors or len({id(t) for t in tensors}) < len(tensors):
        return None
    if len({(t.dtype, t.device) for t in tensors}) > 1 or not all(
        t.is_contiguous() for t in tensors
    ):
        return None
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    offset = 0
    for t in tensors:
        t.data = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return flat


def _foldable_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where the conv (no bias, zero padding) feeds only the
    BatchNorm, and each of the two modules is called exactly once."""
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        bn = mods.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if isinstance(bn, _BNS) and node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = mods[src.target]
        if (
            type(conv) in _CONVS
            and conv.bias is None
            and conv.padding_mode == "zeros"
            and len(src.users) == 1
            and calls[src.target] == calls[node.target] == 1
            and bn.affine
            and bn.track_running_stats
            and bn.running_mean is not None
            and bn.num_features == conv.out_channels
        ):
            pairs.append((src.target, node.target))
    return pairs


FOLD_MIN_RATIO = 2.0
"""Fold only when a batch's folded BatchNorm outputs have at least this many elements per
conv weight element. Measured (2 CPU threads): the refold costs about 1.2 ns per weight,
the BatchNorms it removes about 0.8 ns per output element, besides per-kernel overhead.
resnet_small on 8x8 digits (ratio 9): 2.11 instead of 2.27 ms; resnet18 on 32x32, batch
128 (ratio 7): 977 instead of 1024 ms; resnet18 on 8x8 digits (ratio 0.44): 52 instead of
44 ms, so it runs unfolded. The decision depends on shapes only (deterministic)."""


class FoldedForward:
    """The teacher's eval forward with its conv->BN pairs folded, from packed tensors.

    Args:
        module: the teacher (eval mode).
        pairs: its foldable ``(conv, bn)`` names (:func:`_foldable_pairs`).
        gm: its fx graph.
        flat: the buffer ``packed`` lives in.
        packed: the pairs' conv weights, then each BatchNorm part, in that order.

    Built by :func:`fold_teacher`, which packs ``packed`` (the pairs' conv weights, then
    each BatchNorm part) into ``flat`` so that each is one contiguous run.

    Whether folding pays is decided once per input shape (:data:`FOLD_MIN_RATIO`); the
    two paths agree to float rounding. Memory: three buffers the size of the folded conv
    weights (the folded weights, the gathered scales, the int32 channel index): 128 MiB for
    resnet18, 193 MiB for WRN-28-10 (whose pre-activation blocks fold one pair each).
    """

    def __init__(
        self, module: nn.Module, pairs, gm: fx.GraphModule, flat: Tensor, packed: list[Tensor]
    ):
        self._packed, self._ptrs = packed, [t.data_ptr() for t in packed]
        mods = dict(module.named_modules())
        convs, bns = [mods[c] for c, _ in pairs], [mods[b] for _, b in pairs]
        n_w = sum(c.weight.numel() for c in convs)
        n_c = sum(b.num_features for b in bns)
        self.weight = flat[:n_w]
        self.bn = flat[n_w : n_w + 4 * n_c].view(4, n_c)  # gamma, beta, mean, var
        eps = {float(b.eps) for b in bns}
        self.eps: float | Tensor = (
            eps.pop()
            if len(eps) == 1
            else torch.cat([torch.full((b.num_features,), float(b.eps)) for b in bns]).to(flat)
        )
        dev = flat.device
        per_channel = torch.tensor(
            [c.weight[0].numel() for c in convs for _ in range(c.out_channels)]
        )
        # the BatchNorm channel of every conv weight (int32: 4 bytes a weight)
        self.channel = torch.arange(n_c, dtype=torch.int32).repeat_interleave(per_channel).to(dev)
        self.scale, self.shift = flat.new_empty(n_c), flat.new_empty(n_c)
        self.folded, self._gathered = flat.new_empty(n_w), flat.new_empty(n_w)
        self.gm = self._rewrite(gm, convs, pairs)
        self.module, self._bns, self._use = module, bns, {}

    def _rewrite(self, gm: fx.GraphModule, convs, pairs) -> fx.GraphModule:
        ow = oc = 0
        bn_of = {b: k for k, (_, b) in enumerate(pairs)}
        for k, conv in enumerate(convs):
            n, c = conv.weight.numel(), conv.out_channels
            w = self.folded[ow : ow + n].view_as(conv.weight)
            gm.register_buffer(f"_folded_weight_{k}", w, persistent=False)
            gm.register_buffer(f"_folded_shift_{k}", self.shift[oc : oc + c], persistent=False)
            ow, oc = ow + n, oc + c
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node.target not in bn_of:
                continue
            k, src = bn_of[node.target], node.args[0]
            conv = convs[k]
            with gm.graph.inserting_before(node):
                args = (
                    src.args[0],
                    gm.graph.get_attr(f"_folded_weight_{k}"),
                    gm.graph.get_attr(f"_folded_shift_{k}"),
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                    conv.groups,
                )
                new = gm.graph.call_function(_CONVS[type(conv)], args)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            gm.graph.erase_node(src)
        gm.graph.lint()
        gm.recompile()
        return gm

    def is_current(self) -> bool:
        """Whether the teacher's tensors still live in the packed buffer (not after
        ``module.to(...)`` or ``t.data = ...``)."""
        return [t.data_ptr() for t in self._packed] == self._ptrs

    @torch.no_grad()
    def refold(self) -> None:
        """:math:`s = \\gamma/\\sqrt{\\sigma^2+\\epsilon}`, :math:`W' = sW`,
        :math:`b' = \\beta - s\\mu` for every pair at once (six kernels)."""
        gamma, beta, mean, var = self.bn
        torch.add(var, self.eps, out=self.scale)
        self.scale.rsqrt_().mul_(gamma)
        torch.index_select(self.scale, 0, self.channel, out=self._gathered)
        torch.mul(self.weight, self._gathered, out=self.folded)
        torch.addcmul(beta, mean, self.scale, value=-1.0, out=self.shift)

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        use = self._use.get(key)
        if use is None:
            use = self._use[key] = self._pays(x)
        if not use:
            return self.module(x)
        self.refold()
        return self.gm(x)

    def _pays(self, x: Tensor) -> bool:
        """Whether folding pays for batches shaped like ``x``: the folded BatchNorms'
        outputs have at least :data:`FOLD_MIN_RATIO` elements per conv weight element
        (counted in one plain forward). The output of a call depends on its shape only,
        never on the calls before it, so a resumed run computes what an uninterrupted one
        does."""
        counts: list[int] = []
        hooks = [bn.register_forward_hook(lambda m, i, o: counts.append(o.numel()))
                 for bn in self._bns]  # fmt: skip
        try:
            self.module(x)
        finally:
            for h in hooks:
                h.remove()
        return sum(counts) >= FOLD_MIN_RATIO * self.weight.numel()


def fold_teacher(module: nn.Module) -> FoldedForward | None:
    """The folded forward of ``module`` (its foldable pairs' tensors packed for it), or
    ``None`` when nothing can be folded or packed."""
    try:
        gm = fx.symbolic_trace(module)
        pairs = _foldable_pairs(gm)
    except Exception:  # data-dependent control flow, unsupported ops, ...
        return None
    if not pairs:
        return None
    # packing order: the pairs' conv weights, then their BatchNorms' weights, biases,
    # running means and running variances (each part one contiguous run)
    keys = [f"{c}.weight" for c, _ in pairs]
    keys += [f"{b}.{part}" for part in _BN_PARTS for _, b in pairs]
    sd = module.state_dict(keep_vars=True)
    tensors = [sd[k] for k in keys]
    flat = pack(tensors)
    return None if flat is None else FoldedForward(module, pairs, gm, flat, tensors)
