"""Mixture-of-experts fields of a Qwen2-MoE / Qwen3-MoE ``config.json``, read as transformers reads them.

Pure Python (the runtime imports it through :mod:`qwen_export.spec`). transformers 5 semantics:

- a layer is sparse (router + experts) when ``num_experts > 0``, ``(layer + 1) % decoder_sparse_step
  == 0`` and the layer is not in ``mlp_only_layers``; otherwise it is a dense MLP of
  ``intermediate_size``;
- the router is ``softmax(x @ gate.T)`` in float32, ``topk(num_experts_per_tok)``, renormalised to a
  sum of 1 when ``norm_topk_prob``, then cast to the activation dtype;
- Qwen2-MoE adds a shared expert (an MLP of ``shared_expert_intermediate_size``) scaled by
  ``sigmoid(x @ shared_expert_gate.T)``; Qwen3-MoE has none;
- Qwen3-MoE's ``num_experts`` is stored as ``num_local_experts`` by transformers 5 (its attribute
  map); either key is read.

Training-only fields (``output_router_logits``, ``router_aux_loss_coef``) do not change inference and
are ignored; sliding-window attention on an MoE model is refused (not implemented).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwen_export.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """The sparse MLP of an MoE decoder. ``sparse_layers[i]``: layer ``i`` routes to experts."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each routed expert's (moe_intermediate_size)
    norm_topk_prob: bool
    shared_expert_intermediate_size: int  # 0: no shared expert (Qwen3-MoE)
    sparse_layers: tuple[bool, ...]

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    def expert_params(self, hidden: int) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * hidden * self.intermediate_size

    def active_mlp_params(self, hidden: int) -> int:
        """Parameters a token reads in a sparse layer's MLP: router, top-k experts, shared expert."""
        shared = 3 * hidden * self.shared_expert_intermediate_size + hidden if self.has_shared_expert else 0
        return hidden * self.num_experts + self.top_k * self.expert_params(hidden) + shared

    def total_mlp_params(self, hidden: int) -> int:
        """Parameters of a sparse layer's MLP: router, every expert, shared expert."""
        shared = 3 * hidden * self.shared_expert_intermediate_size + hidden if self.has_shared_expert else 0
        return hidden * self.num_experts + self.num_experts * self.expert_params(hidden) + shared

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoESpec:
        data = dict(data)
        data["sparse_layers"] = tuple(bool(x) for x in data["sparse_layers"])
        return cls(**data)


def _int(raw: dict[str, Any], key: str, default: int, source: str, low: int = 1) -> int:
    value = raw.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10_000_000:
        raise ConfigError(f"{source}: {key}={value!r} must be an integer in {low} .. 10,000,000")
    return value


def parse_moe(raw: dict[str, Any], source: str, model_type: str, layers: int) -> MoESpec:
    """The MoE fields of a ``qwen2_moe`` or ``qwen3_moe`` config (transformers' defaults)."""
    qwen2 = model_type == "qwen2_moe"
    if raw.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not implemented for {model_type} models")
    if "num_experts" in raw or qwen2:
        experts = _int(raw, "num_experts", 60 if qwen2 else 128, source, low=0)
    else:
        experts = _int(raw, "num_local_experts", 128, source, low=0)
    top_k = _int(raw, "num_experts_per_tok", 4 if qwen2 else 8, source)
    if experts and top_k > experts:
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} is more than num_experts={experts}")
    inter = _int(raw, "moe_intermediate_size", 1408 if qwen2 else 768, source)
    shared = _int(raw, "shared_expert_intermediate_size", 5632, source) if qwen2 else 0
    step = _int(raw, "decoder_sparse_step", 1, source)
    only = raw.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ConfigError(f"{source}: mlp_only_layers={only!r} must be a list of layer indices")
    norm = raw.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ConfigError(f"{source}: norm_topk_prob={norm!r} must be true or false")
    sparse = tuple(i not in only and experts > 0 and (i + 1) % step == 0 for i in range(layers))
    return MoESpec(experts, top_k, inter, norm, shared, sparse)
