"""Export-oriented PyTorch vision tower of Qwen2-VL and Qwen2.5-VL (traced on the ``meta`` device,
weights bound afterwards, as :mod:`qwen_export.export.modeling` does for the decoder).

The graph encodes the patches of one request (any number of frames of one image or clip); what
transformers computes with Python loops from ``grid_thw`` (rotary positions, the window order,
the attention segments) the runtime computes with numpy (:mod:`qwen_export.runtime.vision_input`)
and feeds as index inputs, so the graph itself has no data-dependent control flow::

    pixel_values [N, C*T*P*P] float32   patches (Qwen2.5-VL: in window order)
    position_ids [N, 2] int64           each patch's (row, column) in its frame, same order
    segment_ids  [N] int64              the frame of each patch: full-attention blocks attend within it
    (Qwen2.5-VL only; the windowed blocks, W = ``VisionSpec.window_patches``:)
    window_slots [windows, W] int64     the patch in each slot of each window (a padding slot: 0)
    window_mask  [windows, W] float32   0 for a patch, the most negative float for a padding slot
    window_rows  [N] int64              each patch's slot (row-major in window_slots)
      -> image_embeds [N / merge^2, hidden] float32   (Qwen2.5-VL: in window order; the runtime
                                                        puts them back)

A windowed block gathers q, k and v into [heads, windows, W, head_dim] and attends within each
window (scores [heads, windows, W, W]: linear in N), then gathers the patches back; only the
full-attention blocks form the [N, N] scores.

Layout choices: the patch embedding (a Conv3d whose stride equals its kernel) is one ``MatMul``
against the kernel flattened to [C*T*P*P, embed] (initializer ``patch_embed.proj.weight_t``);
linear weights are [in, out] (``<name>_t``); rotary cos/sin are computed in float32 from
``rotary.inv_freq`` as transformers does; attention is non-causal with an additive mask made from
the segment (or window) ids, the softmax in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from qwen_export.export.modeling import Linear, RMSNorm, rotate_half
from qwen_export.vision import VisionNorm, VisionSpec


class Windows(NamedTuple):
    """The windowed blocks' layout (the module docstring's ``window_*`` inputs); ``bias`` is the
    mask as [1, windows, 1, W], added to scores [H, windows, W, W]."""

    slots: torch.Tensor
    bias: torch.Tensor
    rows: torch.Tensor


Mask = torch.Tensor | Windows  # a dense [N, N] additive bias, or windows


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _norm(spec: VisionSpec, size: int) -> nn.Module:
    if spec.norm is VisionNorm.LAYER_NORM:
        return LayerNorm(size, spec.norm_eps)
    return RMSNorm(size, spec.norm_eps, torch.float32)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return nn.functional.gelu(x)
    if name == "gelu_pytorch_tanh":
        return nn.functional.gelu(x, approximate="tanh")
    return nn.functional.silu(x)


class PatchEmbed(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.proj = Linear(spec.patch_dim, spec.embed_dim, False, torch.float32)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv = Linear(spec.embed_dim, 3 * spec.embed_dim, True, torch.float32)
        self.proj = Linear(spec.embed_dim, spec.embed_dim, True, torch.float32)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # [1, N, D] against [H, N, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(mask, Windows):
            out = self._windowed(q, k, v, mask)
        else:
            out = _attend(q, k, v, mask, self.head_dim)
        return self.proj(out.transpose(0, 1).reshape(n, self.heads * self.head_dim))

    def _windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows) -> torch.Tensor:
        shape = (self.heads, -1, windows.slots.shape[1], self.head_dim)  # [H, windows, W, D]
        slots = windows.slots.reshape(-1)
        q, k, v = (t.index_select(1, slots).reshape(shape) for t in (q, k, v))
        out = _attend(q, k, v, windows.bias, self.head_dim)
        return out.reshape(self.heads, -1, self.head_dim).index_select(1, windows.rows)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, head_dim: int) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * (head_dim**-0.5) + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class VisionMLP(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.act = spec.hidden_act
        self.gated = spec.norm is VisionNorm.RMS_NORM  # Qwen2.5-VL: SwiGLU with biases
        if self.gated:
            self.gate_proj = Linear(spec.embed_dim, spec.mlp_dim, True, torch.float32)
            self.up_proj = Linear(spec.embed_dim, spec.mlp_dim, True, torch.float32)
            self.down_proj = Linear(spec.mlp_dim, spec.embed_dim, True, torch.float32)
        else:
            self.fc1 = Linear(spec.embed_dim, spec.mlp_dim, True, torch.float32)
            self.fc2 = Linear(spec.mlp_dim, spec.embed_dim, True, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(_act(self.act, self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(_act(self.act, self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(spec, spec.embed_dim), _norm(spec, spec.embed_dim)
        self.attn = VisionAttention(spec)
        self.mlp = VisionMLP(spec)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class MergerMLP(nn.Module):
    """``merger.mlp``: Linear (index 0), GELU, Linear (index 2), named as the checkpoint names them."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.add_module("0", Linear(width, width, True, torch.float32))
        self.add_module("2", Linear(width, out, True, torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = getattr(self, "0"), getattr(self, "2")
        return second(nn.functional.gelu(first(x)))


class PatchMerger(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.width = spec.embed_dim * spec.merge_unit
        self.ln_q = _norm(spec, spec.embed_dim)
        self.mlp = MergerMLP(self.width, spec.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


class VisionTower(nn.Module):
    """``visual`` of a Qwen-VL checkpoint; see the module docstring for the IO."""

    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        quarter = spec.head_dim // 4
        self.register_buffer("rotary_inv_freq", torch.empty(quarter, dtype=torch.float32), persistent=True)
        self.blocks = nn.ModuleList([VisionBlock(spec) for _ in range(spec.depth)])
        self.merger = PatchMerger(spec)

    def forward(
        self,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        window_slots: torch.Tensor | None = None,
        window_mask: torch.Tensor | None = None,
        window_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.rotary_inv_freq  # [N, 2, D/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1)  # [N, D]
        cos, sin = freqs.cos(), freqs.sin()
        full: Mask = _segment_bias(segment_ids)
        windowed = full
        if window_slots is not None and window_mask is not None and window_rows is not None:
            windowed = Windows(window_slots, window_mask.unsqueeze(1).unsqueeze(0), window_rows)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if self.spec.is_full_attention(i) else windowed)
        return self.merger(x)


def _segment_bias(ids: torch.Tensor) -> torch.Tensor:
    """[N, N] float32: 0 where two patches share a segment, the most negative float elsewhere."""
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    # Python scalars, not torch.zeros/full of shape (): those trace to an Expand with a 0-d shape,
    # which ONNX Runtime accepts and OpenVINO's ONNX frontend refuses (the shape must be 1-D)
    return torch.where(same, 0.0, torch.finfo(torch.float32).min)
