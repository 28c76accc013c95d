"""What to quantize and how: the options of ``qwen-export export --weights/--block-size/...``.

Conventions shared by :mod:`.numeric`, :mod:`.algorithms`, the ``quantize`` pass and the ONNX
Runtime lowering:

- a linear weight is stored as ``W`` [K, N] = [in, out] (our ``*_t`` initializers); it is quantized
  in blocks of ``block_size`` consecutive input rows (axis 0), one scale (and zero point) per block
  and output column: ``scales`` [K / block_size, N];
- the embedding ``E`` [V, H] is quantized along H (axis 1) in blocks: ``scales`` [V, H / block_size]
  (so each vocabulary row is self-contained for ``Gather`` and, transposed, for the tied lm_head);
- codes: symmetric int4 in [-8, 7] / int8 in [-128, 127] with zero point 0; asymmetric uint4 in
  [0, 15] / uint8 in [0, 255] with a per-block zero point;
- ``dequantize(q) = (q - zero_point) * scale``, exactly ONNX ``DequantizeLinear`` (opset 21,
  ``axis``, ``block_size``).
"""

from __future__ import annotations

import dataclasses
import enum

from ..errors import OptionError


class WeightFormat(enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int | None:
        return {WeightFormat.INT8: 8, WeightFormat.INT4: 4}.get(self)


class QuantAlgorithm(enum.Enum):
    RTN = "rtn"  # round to nearest, scale from the block's range
    CLIP = "clip"  # data-free: per-block clipping ratio searched to minimise the weight error
    AWQ = "awq"  # calibration: activation-aware per-input-channel scaling, searched on real activations


class Keep(enum.Enum):
    """Tensors that may stay in higher precision (mixed precision)."""

    EMBEDDING = "embedding"  # embed_tokens (and a tied lm_head, which shares it)
    LM_HEAD = "lm_head"  # an untied lm_head


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    fmt: WeightFormat
    block_size: int = 32
    symmetric: bool = True
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN
    #: tensors kept in the model dtype; the embedding/tied head is quantized to int8 by default
    #: (``embedding_bits``) rather than kept: it is the largest tensor.
    keep: frozenset[Keep] = frozenset()
    #: bits for the embedding (and tied lm_head) when not kept: 8 by default even for int4.
    embedding_bits: int = 8
    #: layer indices kept in the model dtype (e.g. the first and last layers, most sensitive).
    keep_layers: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.fmt.bits is None:
            raise OptionError(f"--weights {self.fmt.value} is not a quantized format")
        if self.block_size not in (32, 64, 128):
            raise OptionError(f"--block-size must be 32, 64 or 128, got {self.block_size}")
        if self.embedding_bits not in (4, 8):
            raise OptionError(f"embedding bits must be 4 or 8, got {self.embedding_bits}")

    @property
    def bits(self) -> int:
        assert self.fmt.bits is not None
        return self.fmt.bits

    def to_dict(self) -> dict[str, object]:
        return {
            "weights": self.fmt.value,
            "bits": self.bits,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "algorithm": self.algorithm.value,
            "keep": sorted(k.value for k in self.keep),
            "embedding_bits": self.embedding_bits,
            "keep_layers": sorted(self.keep_layers),
        }
