"""Inference linears: weights laid out once for the CPU's fast small-batch kernels, and a
weight-only int8 linear.

Decode and verification multiply a handful of rows by every weight, so the kernel's
small-M path decides the step time (SmolLM2, one thread, 576 -> 49152 head at M=1: fp32
`F.linear` 9.0 ms, the same weight stored (in, out) 5.6 ms; bf16 2.3 ms prepacked for
oneDNN against 3.9 ms plain). `prepack` rewrites a model's linears in place:

- float32: a decoder weight is stored column-major (`weight` stays an (out, in) tensor, a
  transposed view), so `F.linear` runs BLAS on an (in, out) matrix: bit-identical to
  `torch.mm(x, W^T)`, no extra memory.
- bfloat16 with oneDNN: `PackedLinear` keeps `weight` and adds a blocked copy for
  `torch.ops.mkldnn._linear_pointwise` (bit-identical to `F.linear`). Under `torch.compile`
  the module falls back to `F.linear` (an `aten::mm` in the graph; see dspark/models/compile.py on freezing).
- the tied LM head keeps `lm_head.weight` as the embedding's (V, d) matrix (the drafter reads
  its rows); only its compute copy is laid out (fp32: (d, V); bf16: oneDNN blocked).

`quantize_int8` replaces them with `Int8Linear` instead: symmetric per-output-channel int8
weights, bf16 activations, `torch.ops.aten._weight_int8pack_mm`. That is a different (lossy)
target; speculation stays exact relative to it, because every target forward uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedLinear(nn.Linear):
    """`nn.Linear` whose eager CPU compute reads `packed`, a copy of `weight` laid out for the
    kernel: a oneDNN blocked tensor, or the (in, out) transpose for float32."""

    packed: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters (ties survive)
        w = linear.weight.detach()
        if w.dtype == torch.bfloat16:
            new.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        else:
            new.packed = w.t().contiguous()  # (in, out)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        if self.packed.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.packed.t(), self.bias)


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale (+ bias): q (out, in) int8, one scale per output row, x bf16.

    `weight`, when kept (the tied LM head), is the original full-precision matrix for
    callers that read it; the compute never does."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                  requires_grad=False)
        self.weight = linear.weight if keep_weight else None
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                               self.qweight, self.scales)  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of every linear inside the decoder layers."""
    return [(parent, name, child) for parent in model.model.layers.modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.no_grad()
def prepack(model: nn.Module) -> None:
    """Lay out a CPU model's linears for decode (see the module docstring); in place."""
    dtype = model.lm_head.weight.dtype
    if model.lm_head.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return
    if dtype == torch.bfloat16 and not mkldnn_bf16():
        return
    for parent, name, lin in _decoder_linears(model):
        if dtype == torch.float32:
            lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t(), requires_grad=False)
        else:
            setattr(parent, name, PackedLinear.from_linear(lin))
    model.lm_head = PackedLinear.from_linear(model.lm_head)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> None:
    """Weight-only int8 for every decoder linear and the LM head (compute only: the head's
    `weight` stays the tied embedding); the rest of the model in bf16. In place."""
    for parent, name, lin in _decoder_linears(model):
        setattr(parent, name, Int8Linear(lin))
    model.lm_head = Int8Linear(model.lm_head, keep_weight=True)
    model.to(torch.bfloat16)
