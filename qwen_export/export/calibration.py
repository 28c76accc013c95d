"""Calibration activations for AWQ: the inputs of every linear layer group on a calibration text.

:func:`collect_activation_stats` runs the checkpoint's model in PyTorch on the CPU, in float32, one
decoder layer at a time (only that layer's weights are in memory): the embedding rows of the
calibration tokens, then each layer with hooks on its projections' inputs, then the final norm
(for an untied lm_head). The text is split into sequences of equal length, at most
:data:`SEQUENCE_LENGTH` tokens (fewer than one token per sequence is dropped), each run as its own
causal sequence (no padding, no KV cache).

Groups (one input shared by the group's weights), each with ``mean_abs`` [K] (float64, over every
calibration token) and ``sample`` [T <= max_rows, K] (float32, evenly spaced tokens):

- ``layers.{i}.qkv``: input of q/k/v (``input_layernorm``'s output);
- ``layers.{i}.o``: input of o_proj (the attention output);
- ``layers.{i}.gate_up``: input of gate/up (``post_attention_layernorm``'s output);
- ``layers.{i}.down``: input of down_proj (``silu(gate) * up``);
- ``lm_head``: input of an untied lm_head (``model.norm``'s output).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import OptionError
from qwen_export.spec import ModelSpec

#: Tokens per calibration sequence (longer texts are split); bounds the attention's memory.
SEQUENCE_LENGTH = 512
#: Calibration tokens used at most (the rest of a long file is ignored).
MAX_TOKENS = 4096
#: A calibration file must give at least this many tokens.
MIN_TOKENS = 32

#: The built-in calibration text (about 5,000 tokens: code in ten languages, English prose and
#: documentation, ChatML conversations, math and data formats, Chinese and six other languages),
#: used when the export is not given ``--calibration FILE``. Written for this purpose; it shares no
#: text with the accuracy benchmark's evaluation text (``benchmarks/quant_real_text.txt``).
DEFAULT_TEXT_FILE = Path(__file__).with_name("calibration_default.txt")
DEFAULT_TEXT = DEFAULT_TEXT_FILE.read_text(encoding="utf-8")


@dataclasses.dataclass
class Stats:
    """Calibration statistics of one linear input: mean |x| per channel and a sample of rows."""

    mean_abs: np.ndarray  # [K] float64
    sample: np.ndarray  # [T, K] float32


#: bytes of text read from a ``--calibration`` directory at most (:data:`MAX_TOKENS` tokens are
#: about 20 KB of text: this leaves room for files that tokenize densely)
MAX_DIRECTORY_BYTES = 1 << 20


def calibration_text(path: Path | None) -> tuple[str, str]:
    """``(text, source)``: the file's text (UTF-8) and its name, a directory's text files (see
    :func:`directory_text`), or the built-in text."""
    if path is None:
        return DEFAULT_TEXT, "built-in"
    path = Path(path)
    if path.is_dir():
        return directory_text(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OptionError(f"--calibration {str(path)!r}: file not found") from None
    except OSError as exc:
        raise OptionError(f"--calibration {str(path)!r}: cannot read it ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(f"--calibration {str(path)!r}: not UTF-8 text (byte {exc.start})") from None
    return text, path.name


def directory_text(directory: Path) -> tuple[str, str]:
    """The UTF-8 regular files under ``directory`` (recursively, in path order; hidden names, links
    and files that are not UTF-8 text are passed over and counted), joined by blank lines, up to
    :data:`MAX_DIRECTORY_BYTES`; the source names the directory and what was used and passed over.
    OptionError when no file is text."""
    texts: list[str] = []
    skipped = total = 0
    for file in sorted(directory.rglob("*")):
        if total >= MAX_DIRECTORY_BYTES:
            break
        hidden = any(part.startswith(".") for part in file.relative_to(directory).parts)
        if file.is_dir() and not file.is_symlink() and not hidden:
            continue
        text = (
            None if hidden or file.is_symlink() or not file.is_file() else _utf8_head(file, MAX_DIRECTORY_BYTES - total)
        )
        if text is None:
            skipped += 1
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
    if not texts:
        raise OptionError(f"--calibration {str(directory)!r}: no UTF-8 text file in the directory")
    return "\n\n".join(texts), f"{directory.name}/ ({len(texts)} files, {skipped} passed over)"


def _utf8_head(file: Path, limit: int) -> str | None:
    """The first ``limit`` bytes of ``file`` as text (a character cut at the limit dropped), or None
    when it cannot be read or is not UTF-8."""
    try:
        with file.open("rb") as f:
            data = f.read(limit)
    except OSError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(data) == limit and exc.start >= limit - 3:
            return data[: exc.start].decode("utf-8", errors="strict")
        return None


def calibration_tokens(tokenizer: Any, text: str, source: str, limit: int = MAX_TOKENS) -> list[int]:
    """Token ids of ``text`` (at most ``limit``); OptionError when under :data:`MIN_TOKENS`."""
    ids = [int(i) for i in tokenizer.encode(text)][:limit]
    if len(ids) < MIN_TOKENS:
        raise OptionError(
            f"--calibration {source!r}: {len(ids)} tokens; calibration needs at least {MIN_TOKENS} tokens of text"
        )
    return ids


class _Recorder:
    """Accumulates the inputs of one group over the calibration sequences."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def add(self, x: Any) -> None:
        self.rows.append(x.detach().reshape(-1, x.shape[-1]).float().numpy().copy())

    def stats(self, max_rows: int) -> Stats:
        x = np.concatenate(self.rows, axis=0)
        mean_abs = np.mean(np.abs(x.astype(np.float64)), axis=0)
        if x.shape[0] > max_rows:
            x = x[np.linspace(0, x.shape[0] - 1, max_rows).round().astype(np.int64)]
        return Stats(mean_abs=mean_abs, sample=np.ascontiguousarray(x, dtype=np.float32))


def _embed(checkpoint: Any, ids: list[int], hidden: int) -> np.ndarray:
    """Embedding rows of ``ids`` [T, H] float32, read in row blocks (never the whole table)."""
    name = "model.embed_tokens.weight"
    vocab = checkpoint.shape(name)[0]
    wanted = np.asarray(ids, dtype=np.int64)
    if wanted.min() < 0 or wanted.max() >= vocab:
        raise OptionError(f"calibration token id out of range for a vocabulary of {vocab}")
    out = np.empty((len(ids), hidden), np.float32)
    step = max(1, (64 << 20) // max(1, 4 * hidden))
    for start in range(0, vocab, step):
        hit = (wanted >= start) & (wanted < start + step)
        if hit.any():
            block = checkpoint.read_rows(name, start, min(vocab, start + step))
            out[hit] = block[wanted[hit] - start].astype(np.float32)
    return out


def _load_params(module: Any, prefix: str, spec: ModelSpec, checkpoint: Any) -> None:
    """Fill ``module``'s parameters from the checkpoint (``*.weight_t``: the HF weight transposed)."""
    import torch

    from qwen_export.export.trace import _binding_for

    for pname, param in module.named_parameters():
        binding = _binding_for(f"{prefix}.{pname}", spec)
        assert binding.hf_name is not None
        tensor = torch.from_numpy(np.asarray(checkpoint.read(binding.hf_name), dtype=np.float32))
        if binding.transpose:
            tensor = tensor.T
        if tuple(tensor.shape) != tuple(param.shape):
            raise OptionError(
                f"calibration: {binding.hf_name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        param.data = tensor.contiguous()  # PyTorch's transposing copy uses every thread


class LayerRunner:
    """The calibration tokens' hidden states, run through the decoder one layer at a time (float32,
    PyTorch, CPU): only the current layer's weights are in memory. ``hidden`` holds one [1, S, H]
    tensor per sequence, all of one length of at most :data:`SEQUENCE_LENGTH` tokens."""

    def __init__(self, checkpoint: Any, spec: ModelSpec, token_ids: list[int]) -> None:
        import torch

        from qwen_export.export.modeling import QwenForExport
        from qwen_export.export.trace import rope_inv_freq_and_scale
        from qwen_export.spec import LogitsMode

        self.checkpoint, self.spec = checkpoint, spec
        inv_freq, rope_scale = rope_inv_freq_and_scale(spec)
        helper = types.SimpleNamespace(
            spec=spec,
            dtype=torch.float32,
            rotary_inv_freq=torch.as_tensor(np.asarray(inv_freq, dtype=np.float32)),
            rope_scale=rope_scale,
            logits_mode=LogitsMode.ALL,
        )
        count = -(-len(token_ids) // SEQUENCE_LENGTH)
        length = len(token_ids) // count  # equal lengths (at most count - 1 tokens dropped): one batch
        token_ids = token_ids[: count * length]
        embedded = _embed(checkpoint, token_ids, spec.hidden_size)
        self.hidden = [
            torch.from_numpy(embedded[b : b + length].copy())[None] for b in range(0, len(token_ids), length)
        ]
        del embedded
        self.extras = []
        for x in self.hidden:
            s = x.shape[1]
            positions = torch.arange(s, dtype=torch.int64)[None]
            cos, sin = QwenForExport._rotary(helper, positions)  # type: ignore[arg-type]
            masks = QwenForExport._masks(helper, torch.ones(1, s, dtype=torch.int64), torch.arange(s)[:, None])  # type: ignore[arg-type]
            self.extras.append((cos, sin, masks))
        self.empty_kv = torch.zeros(1, spec.num_key_value_heads, 0, spec.head_dim, dtype=torch.float32)

    def layer(self, i: int) -> Any:
        """Decoder layer ``i`` with its checkpoint weights (float32, eval mode)."""
        import torch

        from qwen_export.export.modeling import DecoderLayer

        with torch.device("cpu"):
            layer = DecoderLayer(self.spec, i, torch.float32).eval()
        _load_params(layer, f"model.layers.{i}", self.spec, self.checkpoint)
        return layer

    def run(self, layer: Any, i: int, *, advance: bool, kv: Any = None) -> None:
        """Every sequence through ``layer`` (its hooks see the inputs); ``advance``: keep the outputs
        as the next layer's inputs; ``kv(keys, values)``: called with each sequence's keys (after
        the rotary embedding) and values, [1, kv_heads, S, head_dim]."""
        import torch

        with torch.no_grad():
            for j, x in enumerate(self.hidden):
                cos, sin, masks = self.extras[j]
                out, keys, values = layer(x, cos, sin, masks[self.spec.layer_types[i]], self.empty_kv, self.empty_kv)
                if kv is not None:
                    kv(keys, values)
                if advance:
                    self.hidden[j] = out

    def run_batched(self, layer: Any, i: int, bf16: bool = False) -> None:
        """Every sequence through ``layer`` in one batch [sequences, S, H] (its hooks see every
        calibration row in one call), the outputs kept as the next layer's inputs; ``bf16``: the
        matrix products in bfloat16 (autocast; norms, softmax and the residual stay float32)."""
        import torch

        cos, sin, masks = self.extras[0]
        empty = self.empty_kv.expand(len(self.hidden), -1, -1, -1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _, _ = layer(torch.cat(self.hidden), cos, sin, masks[self.spec.layer_types[i]], empty, empty)
        self.hidden = list(out.split(1))

    def final_norm(self) -> list[Any]:
        """The final norm's outputs (the lm_head's inputs), one per sequence."""
        import torch

        from qwen_export.export.modeling import RMSNorm

        norm = RMSNorm(self.spec.hidden_size, self.spec.rms_norm_eps, torch.float32)
        _load_params(norm, "model.norm", self.spec, self.checkpoint)
        with torch.no_grad():
            return [norm(x) for x in self.hidden]


def collect_activation_stats(
    checkpoint: Any, spec: ModelSpec, token_ids: list[int], max_rows: int = 512
) -> dict[str, Stats]:
    """Statistics of every linear input group on ``token_ids`` (see the module docstring)."""
    runner = LayerRunner(checkpoint, spec, token_ids)
    stats: dict[str, Stats] = {}
    for i in range(spec.num_hidden_layers):
        layer = runner.layer(i)
        groups = {f"layers.{i}.{g}": _Recorder() for g in ("qkv", "o", "gate_up", "down")}
        targets = {
            "qkv": layer.self_attn.q_proj,
            "o": layer.self_attn.o_proj,
            "gate_up": layer.mlp.gate_proj,
            "down": layer.mlp.down_proj,
        }
        handles = [
            module.register_forward_pre_hook(lambda _m, args, r=groups[f"layers.{i}.{g}"]: r.add(args[0]))
            for g, module in targets.items()
        ]
        try:
            runner.run(layer, i, advance=True)
        finally:
            for handle in handles:
                handle.remove()
        stats.update({name: rec.stats(max_rows) for name, rec in groups.items()})
        del layer, groups, targets
    if not spec.tie_word_embeddings:
        rec = _Recorder()
        for x in runner.final_norm():
            rec.add(x)
        stats["lm_head"] = rec.stats(max_rows)
    return stats


def collect_norm_peaks(checkpoint: Any, spec: ModelSpec, token_ids: list[int]) -> dict[str, np.ndarray]:
    """Per layer, each channel's largest magnitude (float32 [hidden]) at the output of the two
    RMSNorms (the inputs of q/k/v and of gate/up) over ``token_ids``, keyed
    ``layers.{i}.input_layernorm`` / ``layers.{i}.post_attention_layernorm``: the smoothing of
    ``export --prefill int8`` (:mod:`qwen_export.targets.onnxruntime.prefill_int8`)."""
    runner = LayerRunner(checkpoint, spec, token_ids)
    peaks: dict[str, np.ndarray] = {}

    def record(key: str) -> Callable[..., None]:
        def add(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float().numpy()
            peaks[key] = np.maximum(peaks[key], x) if key in peaks else x

        return add

    for i in range(spec.num_hidden_layers):
        layer = runner.layer(i)
        handles = [
            layer.self_attn.q_proj.register_forward_pre_hook(record(f"layers.{i}.input_layernorm")),
            layer.mlp.gate_proj.register_forward_pre_hook(record(f"layers.{i}.post_attention_layernorm")),
        ]
        try:
            runner.run(layer, i, advance=True)
        finally:
            for handle in handles:
                handle.remove()
        del layer
    return {key: value.astype(np.float32) for key, value in peaks.items()}


class _KVPeaks:
    """One layer's key pair lengths and value magnitudes, maximised over the sequences."""

    def __init__(self, spec: ModelSpec) -> None:
        shape = (spec.num_key_value_heads, spec.head_dim)
        self.half = spec.head_dim // 2
        self.keys, self.values = np.zeros(shape), np.zeros(shape)

    def add(self, keys: Any, values: Any) -> None:
        k, h = keys[0].double().numpy(), self.half  # [kv_heads, S, head_dim]
        pair = np.sqrt(k[..., :h] ** 2 + k[..., h : 2 * h] ** 2).max(axis=1)
        for part in (slice(0, h), slice(h, 2 * h)):
            np.maximum(self.keys[:, part], pair, out=self.keys[:, part])
        np.maximum(self.values, np.abs(values[0].double().numpy()).max(axis=1), out=self.values)


def collect_kv_ranges(checkpoint: Any, spec: ModelSpec, token_ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer ``(key_max, value_max)``, float64 [kv_heads, head_dim], over ``token_ids``: for keys
    (after the rotary embedding) the largest length of each rotated channel pair (i, i + head_dim/2),
    written to both channels (no position's rotation changes it); for values the absolute maximum
    per channel. The int8 KV cache's scales come from these."""
    runner = LayerRunner(checkpoint, spec, token_ids)
    ranges = []
    for i in range(spec.num_hidden_layers):
        peaks = _KVPeaks(spec)
        layer = runner.layer(i)
        runner.run(layer, i, advance=True, kv=peaks.add)
        ranges.append((peaks.keys, peaks.values))
        del layer
    return ranges
