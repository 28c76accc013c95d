"""A pre-quantized checkpoint's ``quantization_config`` (AutoAWQ GEMM, GPTQ), reduced to what the
stored layout depends on (:class:`PrequantConfig`); :mod:`.prequant` reads the stored tensors."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen_export.errors import CheckpointError

_REQUANTIZE = "re-quantize from the float checkpoint instead (e.g. --weights int4 --algorithm awq)"


class Method(enum.Enum):
    AWQ = "awq"
    GPTQ = "gptq"


@dataclasses.dataclass(frozen=True)
class PrequantConfig:
    """A checkpoint's ``quantization_config``, reduced to what the stored layout depends on."""

    method: Method
    bits: int
    group_size: int  # -1: one group spanning all of K
    symmetric: bool  # zero point fixed at 2^(bits-1) (GPTQ ``sym``); AWQ GEMM always has zero points
    zero_offset: int  # added to the stored zero points: 1 for GPTQ v1 (``zero - 1`` stored), else 0
    desc_act: bool  # GPTQ act-order: g_idx must still turn out to be k // group_size

    def group(self, k: int) -> int:
        """The block size along K of a linear with ``k`` inputs."""
        return k if self.group_size == -1 else self.group_size

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def describe(self) -> str:
        zeros = "symmetric" if self.symmetric else "zero points"
        return f"{self.method.value.upper()} int{self.bits} (group {self.group_size}, {zeros})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "desc_act": self.desc_act,
        }


# --- config.json --------------------------------------------------------------------------------------


def detect(raw: Mapping[str, Any], source: str = "config.json") -> PrequantConfig | None:
    """The :class:`PrequantConfig` of a parsed config.json, or None when it has no quantization_config.

    Raises CheckpointError for quantization this importer cannot keep as stored (other methods,
    bit widths or packings) with what was found and what to do instead.
    """
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{source}: quantization_config is {type(qc).__name__}, expected an object")
    method = str(qc.get("quant_method", "")).lower()
    if method == Method.AWQ.value:
        return _awq_config(qc, source)
    if method == Method.GPTQ.value:
        return _gptq_config(qc, source)
    raise CheckpointError(
        f"{source}: quantization_config.quant_method {qc.get('quant_method')!r} is not supported; pre-quantized "
        f"checkpoints are imported from AWQ (gemm) and GPTQ (int4/int8) only: {_REQUANTIZE}"
    )


def read_config(path: str | Path) -> PrequantConfig | None:
    """:func:`detect` on a config.json file (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the config ({exc})") from None
    return detect(raw, str(path)) if isinstance(raw, dict) else None


def _int(qc: Mapping[str, Any], keys: Sequence[str], default: int | None, source: str) -> int:
    for key in keys:
        if key in qc:
            value = qc[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(f"{source}: quantization_config.{key} is {value!r}, expected an integer")
            return value
    if default is None:
        raise CheckpointError(f"{source}: quantization_config has no {keys[0]}")
    return default


def _group_size(qc: Mapping[str, Any], keys: Sequence[str], source: str) -> int:
    group = _int(qc, keys, None, source)
    if group != -1 and (group <= 0 or group % 8):
        raise CheckpointError(f"{source}: quantization_config.{keys[0]} is {group}, expected -1 or a multiple of 8")
    return group


def _awq_config(qc: Mapping[str, Any], source: str) -> PrequantConfig:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(
            f"{source}: AWQ version {version!r} packs the weights for its own kernel; only AutoAWQ's 'gemm' layout "
            f"is imported: {_REQUANTIZE}"
        )
    backend = str(qc.get("backend", "autoawq")).lower()
    if backend != "autoawq":
        raise CheckpointError(f"{source}: AWQ backend {backend!r} is not supported (only 'autoawq'): {_REQUANTIZE}")
    bits = _int(qc, ("bits", "w_bit"), None, source)
    if bits != 4:
        raise CheckpointError(f"{source}: AWQ bits={bits}; only 4-bit AWQ (gemm) checkpoints exist: {_REQUANTIZE}")
    if qc.get("zero_point", True) is not True:
        raise CheckpointError(
            f"{source}: AWQ zero_point={qc.get('zero_point')!r}; the gemm layout needs zero points: {_REQUANTIZE}"
        )
    group = _group_size(qc, ("group_size", "q_group_size"), source)
    return PrequantConfig(Method.AWQ, bits, group, symmetric=False, zero_offset=0, desc_act=False)


def _gptq_config(qc: Mapping[str, Any], source: str) -> PrequantConfig:
    bits = _int(qc, ("bits",), None, source)
    if bits not in (4, 8):
        raise CheckpointError(f"{source}: GPTQ bits={bits}; only 4- and 8-bit GPTQ are imported: {_REQUANTIZE}")
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(
            f"{source}: GPTQ checkpoint_format {fmt!r} is a kernel-specific packing; only 'gptq' and 'gptq_v2' "
            f"are imported: {_REQUANTIZE}"
        )
    pack = str(qc.get("pack_dtype", "int32")).lower().removeprefix("torch.")
    if pack != "int32":
        raise CheckpointError(f"{source}: GPTQ pack_dtype {pack!r}; only int32 packing is imported: {_REQUANTIZE}")
    if qc.get("dynamic"):
        raise CheckpointError(
            f"{source}: GPTQ 'dynamic' per-module overrides are not supported (one bits/group_size for every "
            f"linear): {_REQUANTIZE}"
        )
    group = _group_size(qc, ("group_size",), source)
    return PrequantConfig(
        Method.GPTQ,
        bits,
        group,
        symmetric=qc.get("sym", True) is not False,
        zero_offset=1 if fmt == "gptq" else 0,
        desc_act=bool(qc.get("desc_act", False)),
    )
