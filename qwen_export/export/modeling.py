"""Export-oriented PyTorch Qwen decoder with explicit KV-cache inputs and outputs.

This module exists only to be traced by ``torch.onnx.export``; it is built on the ``meta`` device so
no weight is ever materialised (the tracer only needs shapes and dtypes). Real weights are bound to
the ONNX initializers afterwards, tensor by tensor (see :mod:`qwen_export.export.trace`).

Layout choices that make the traced graph ready for ONNX Runtime:

- linear weights are stored transposed, ``[in, out]`` (initializer ``<hf name>_t``), so each
  projection is one ``MatMul`` with no ``Transpose`` in front of it;
- the rotary ``inv_freq`` is an initializer (``rotary.inv_freq``) computed from the ModelSpec in
  float32, YaRN included; cos/sin are computed from ``position_ids`` in the graph, in float32;
- RMSNorm statistics and the attention softmax are computed in float32 whatever the weight dtype
  (Qwen overflows fp16 otherwise), exactly as transformers' eager implementation does;
- the mask is built in the graph from ``attention_mask`` (padding), causality and, for sliding
  layers, the window, in KV-cache coordinates as transformers does; masked scores use the dtype's
  most negative finite value so fully-masked padding rows give finite (ignored) outputs.

Fixed-capacity KV buffers (``cache_position`` given; the TensorRT graph, ``CacheIO.SCATTER``): the
past buffers are [B, KV, capacity, D]; the new keys/values are scattered at ``cache_position``
(the same columns for every row) and attention reads the first ``attention_mask.shape[1]``
columns, with the query heads of each KV head stacked so no key/value is repeated per head.

Forward signature (canonical IO, docs/architecture.md)::

    input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
    past [2*L tensors: key_i, value_i, each [B, KV, P, D]],
    logits_indices [K] int64 (LogitsMode.LAST only: which of the S new positions get logits)
      -> logits [B, K or S, V] float32, present [2*L tensors [B, KV, P+S, D]]
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_export.spec import LayerType, LogitsMode, ModelSpec


class Linear(nn.Module):
    """``y = x @ weight_t + bias`` with the weight stored as [in, out]."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(fan_in, fan_out, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(fan_out, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    """RMSNorm with the variance in float32 (transformers' Qwen2RMSNorm)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(in_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        self.q_proj = Linear(h, spec.q_size, spec.qkv_bias, dtype)
        self.k_proj = Linear(h, spec.kv_size, spec.qkv_bias, dtype)
        self.v_proj = Linear(h, spec.kv_size, spec.qkv_bias, dtype)
        self.o_proj = Linear(spec.q_size, h, spec.o_bias, dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
        self.sliding = spec.layer_types[layer] is LayerType.SLIDING

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        cache_position: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (the KV cache) for every new token; with ``rows`` (positions among the
        new tokens, negative from the end) the output projection runs on those tokens only."""
        spec = self.spec
        b, s = x.shape[0], x.shape[1]
        d, heads, kv_heads = spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads
        q = self.q_proj(x).view(b, s, heads, d)
        k = self.k_proj(x).view(b, s, kv_heads, d)
        v = self.v_proj(x).view(b, s, kv_heads, d).transpose(1, 2)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache_position is None:
            present_k = torch.cat([past_k, k], dim=2)
            present_v = torch.cat([past_v, v], dim=2)
            out = self._attend_repeated(q, present_k, present_v, mask, x.dtype)
        else:
            # fixed-capacity buffers: write the new rows at cache_position, attend over the first
            # W = mask width columns (columns not yet written are masked out)
            idx = cache_position[None, None, :, None].expand(b, kv_heads, s, d)
            present_k = past_k.scatter(2, idx, k)
            present_v = past_v.scatter(2, idx, v)
            width = mask.shape[-1]
            out = self._attend_grouped(q, present_k[:, :, :width], present_v[:, :, :width], mask, x.dtype)
        out = out.transpose(1, 2).reshape(b, s, heads * d)
        if rows is not None:
            out = torch.index_select(out, 1, rows)
        return self.o_proj(out), present_k, present_v

    def _attend_repeated(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """[B, H, S, D] attention over keys/values repeated to every query head (transformers'
        ``repeat_kv``; the ONNX Runtime and OpenVINO fusions match this form)."""
        b, kv_heads, total, d = keys.shape
        heads, groups = self.spec.num_attention_heads, self.spec.kv_groups
        k_all = keys[:, :, None].expand(b, kv_heads, groups, total, d).reshape(b, heads, total, d)
        v_all = values[:, :, None].expand(b, kv_heads, groups, total, d).reshape(b, heads, total, d)
        scores = torch.matmul(q, k_all.transpose(2, 3)).to(torch.float32) * (d**-0.5)
        probs = torch.softmax(scores + mask, dim=-1).to(dtype)
        return torch.matmul(probs, v_all)

    def _attend_grouped(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The same attention without copying keys/values per query head: the G query heads of a
        KV head are stacked along the sequence axis ([B, KV, G*S, D]), so each KV head is one
        MatMul operand. Scores and softmax in float32; mask [B, 1, S, W] broadcast over G."""
        b, kv_heads, width, d = keys.shape
        groups, s = self.spec.kv_groups, q.shape[2]
        qg = q.reshape(b, kv_heads, -1, d)  # -1: a traced G*S would be shared across layers
        scores = torch.matmul(qg, keys.transpose(2, 3)).to(torch.float32) * (d**-0.5)
        scores = scores.reshape(b, kv_heads, groups, s, width) + mask[:, :, None]
        probs = torch.softmax(scores, dim=-1).to(dtype).reshape(b, kv_heads, -1, width)
        return torch.matmul(probs, values).reshape(b, kv_heads * groups, s, d)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, False, dtype)
        self.up_proj = Linear(hidden, intermediate, False, dtype)
        self.down_proj = Linear(intermediate, hidden, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """A sparse layer's MLP (transformers' Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock).

    Router: ``softmax(x @ gate)`` in float32, top-k, renormalised when ``norm_topk_prob``, cast to
    the activation dtype. Each expert runs on the tokens routed to it only (``NonZero`` of its
    top-k hits, ``Gather`` of those rows, the expert's three MatMuls, ``ScatterND`` add back), in
    expert order as transformers accumulates them; every expert keeps its own 2-D weights, so the
    quantization passes see ordinary linear weights. The shared expert (Qwen2-MoE) is added,
    scaled by ``sigmoid(x @ shared_expert_gate)``. The nodes of the routed part are traced under
    the scope ``model.layers.{i}.mlp`` (targets' MoE lowerings find the block there)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        moe = spec.moe
        assert moe is not None
        h = spec.hidden_size
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.gate = Linear(h, moe.num_experts, False, dtype)
        self.experts = nn.ModuleList(MLP(h, moe.intermediate_size, dtype) for _ in range(moe.num_experts))
        self.shared_expert: MLP | None = None
        if moe.has_shared_expert:
            self.shared_expert = MLP(h, moe.shared_expert_intermediate_size, dtype)
            self.shared_expert_gate = Linear(h, 1, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(flat).to(torch.float32), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            # NonZero on a float mask and a plain ScatterND (a token picks an expert at most once),
            # added in expert order: standard ops every target's parser takes (TensorRT: no BOOL
            # NonZero, no ScatterND reduction)
            # columns taken with select (Gather), not as_tuple's Slices: onnxscript's Slice-pair
            # rewrite rule scans the whole graph per Slice, quadratic in a 128-expert graph
            hits = torch.nonzero((chosen == e).to(x.dtype))
            token, slot = hits[:, 0], hits[:, 1]
            y = expert(flat[token]) * weights[token, slot][:, None]
            out = out + torch.zeros_like(flat).index_put((token,), y)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        # batch as -1: the exporter reads a named batch dim from attention_mask, which OpenVINO's
        # paged-attention rewrite removes
        return out.reshape(-1, shape[1], shape[2])


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, layer, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp: nn.Module
        if spec.is_sparse_layer(layer):
            self.mlp = SparseMoE(spec, dtype)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        cache_position: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm attention and MLP blocks with their residuals; every node of a layer is traced
        inside this module's scope (``model.layers.{i}``), which :mod:`qwen_export.export.trace` relies on.

        ``rows`` (the last layer of a graph that returns the logits of some positions only, the
        ``logits_indices`` input): the layer still writes every new token's keys/values to the KV
        cache, but only those tokens go through the output projection, the residuals and the MLP;
        the other tokens' hidden states would feed nothing. Output [B, len(rows), H]."""
        h, present_k, present_v = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, past_k, past_v, cache_position, rows
        )
        if rows is not None:
            x = torch.index_select(x, 1, rows)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_k, present_v


class Backbone(nn.Module):
    """Holds parameters under the same names as transformers' ``model.*`` (weights suffixed ``_t``)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, dtype) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class QwenForExport(nn.Module):
    """The traced module. Construct it under ``torch.device("meta")``."""

    def __init__(
        self,
        spec: ModelSpec,
        dtype: torch.dtype,
        logits: LogitsMode,
        prune_last_layer: bool = False,
        embeds_input: bool = False,
    ) -> None:
        """``prune_last_layer`` (``LogitsMode.LAST`` only): the last decoder layer computes its
        output for the ``logits_indices`` tokens only (see ``DecoderLayer.forward``), which saves
        about 1/L of a prefill's matmul work. ``embeds_input``: the first input is the token
        embeddings [B, S, hidden] (a vision-language decoder, image features merged in) instead of
        ``input_ids``."""
        super().__init__()
        self.embeds_input = embeds_input
        if prune_last_layer and logits is not LogitsMode.LAST:
            raise ValueError("prune_last_layer needs LogitsMode.LAST: every position's hidden state is needed")
        self.spec, self.dtype, self.logits_mode = spec, dtype, logits
        self.prune_last_layer = prune_last_layer
        self.model = Backbone(spec, dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, False, dtype)
        self.rotary_inv_freq = nn.Parameter(torch.empty(spec.head_dim // 2, dtype=torch.float32), requires_grad=False)
        _, self.rope_scale = spec.rope_inv_freq_and_scale()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[torch.Tensor],
        cache_position: torch.Tensor | None = None,
        logits_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``cache_position`` [S] (fixed-capacity KV buffers only): the buffer columns the new
        tokens are written to; without it the new tokens follow the ``past`` columns.
        ``logits_indices`` [K] (``LogitsMode.LAST``): the positions among the new tokens whose
        logits are returned (negative: from the end; ``[-1]`` the last only), the same for every
        batch row: logits [B, K, V]."""
        spec = self.spec
        if (logits_indices is None) != (self.logits_mode is LogitsMode.ALL):
            raise ValueError("logits_indices is given with LogitsMode.LAST, and only then")
        s = input_ids.shape[1]
        x = input_ids if self.embeds_input else self.model.embed_tokens(input_ids)
        cos, sin = self._rotary(position_ids)
        if cache_position is None:
            q_pos = torch.arange(s, device=input_ids.device)[:, None] + past_key_values[0].shape[2]
        else:
            q_pos = cache_position[:, None]
        masks = self._masks(attention_mask, q_pos)
        presents: list[torch.Tensor] = []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            mask = masks[spec.layer_types[i]]
            rows = logits_indices if self.prune_last_layer and i == last else None
            past_k, past_v = past_key_values[2 * i], past_key_values[2 * i + 1]
            x, pk, pv = layer(x, cos, sin, mask, past_k, past_v, cache_position, rows)
            presents += [pk, pv]
        if self.logits_mode is LogitsMode.LAST and not self.prune_last_layer:
            x = torch.index_select(x, 1, logits_indices)
        x = self.model.norm(x)
        if spec.tie_word_embeddings:
            # Gemm(transB=1) reads the [vocab, hidden] embedding as is: no transposed copy of the
            # largest tensor is made (a Transpose would be constant-folded by the engine).
            b, s_out = x.shape[0], x.shape[1]
            flat = nn.functional.linear(x.reshape(b * s_out, spec.hidden_size), self.model.embed_tokens.weight)
            logits = flat.reshape(b, s_out, spec.vocab_size)
        else:
            logits = self.lm_head(x)
        return logits.to(torch.float32), presents

    def _rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, 1, S, D], computed in float32 then cast (transformers' Qwen2RotaryEmbedding).
        M-RoPE (``spec.mrope_section``): ``position_ids`` is [3, B, S] and the frequency pairs of
        section i take their angle from stream i (time, height, width), as Qwen2-VL's rotary does."""
        freqs = position_ids.to(torch.float32)[..., None] * self.rotary_inv_freq
        if self.spec.mrope_section is not None:
            parts = torch.split(freqs, list(self.spec.mrope_section), dim=-1)
            freqs = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.rope_scale
        sin = emb.sin() * self.rope_scale
        return cos.to(self.dtype)[:, None], sin.to(self.dtype)[:, None]

    def _masks(self, attention_mask: torch.Tensor, q_pos: torch.Tensor) -> dict[LayerType, torch.Tensor]:
        """Additive masks [B, 1, S, W] (float32, W = mask width) for full and, when present,
        sliding layers; ``q_pos`` [S, 1] holds the new tokens' KV-cache columns."""
        total = attention_mask.shape[1]
        k_pos = torch.arange(total, device=attention_mask.device)[None, :]
        allowed = (k_pos <= q_pos)[None, None] & (attention_mask[:, None, None, :] > 0)
        neg = torch.finfo(torch.float32).min
        zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
        low = torch.full((), neg, dtype=torch.float32, device=attention_mask.device)
        out = {LayerType.FULL: torch.where(allowed, zero, low)}
        if self.spec.sliding_window is not None and self.spec.has_sliding_layers:
            window = (k_pos > q_pos - self.spec.sliding_window)[None, None]
            out[LayerType.SLIDING] = torch.where(allowed & window, zero, low)
        return out
