"""OpenVINO target, export side: lower the portable ONNX graph to a stateful OpenVINO IR.

Lowering (export side, :func:`emit`)::

    portable ONNX (standard ops; int4/int8 weights as blocked DequantizeLinear)
      --openvino.convert_model-->  ov.Model  (its ONNX frontend already recognises the decomposed
                                   attention as ScaledDotProductAttention; the weights stay
                                   compressed: Convert/Subtract/Multiply decompression chains)
      --f16 decompression-->  scales/zero points stored as f16, NNCF's form (f16_decompression)
      --lm_head-->    the logits Result reads a 3-D MatMul directly, the pattern openvino-genai's
                      paged-attention backend needs to compute only the sampled token's logits
      --logits rows-->  the ``logits_indices`` input becomes the Constant [-1] (the engines open it
                        again at load: engine.open_logits_rows)
      --beam_idx-->   a Gather(past, beam_idx, axis=0) in front of every past_key_values.* input
      --make stateful-->  past_key_values.* / present.* become ReadValue/Assign pairs (variables),
                          initialised to zeros [batch, kv_heads, 0, head_dim]
      --save_model-->  openvino_model.xml + openvino_model.bin (no fp16 compression of fp32 weights)

This is the signature openvino-genai and optimum-intel use (inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``beam_idx``; output ``logits``), and the pattern OpenVINO's
CPU plugin turns into its fused attention with an internal KV cache (ReadValue -> Gather(beam_idx)
-> Concat -> SDPA -> Assign). :func:`runtime_report` inspects the compiled model to prove it.

The tokenizer is converted with ``openvino_tokenizers.convert_tokenizer`` (when installed) into
``openvino_tokenizer.xml`` / ``openvino_detokenizer.xml`` so ``openvino_genai.LLMPipeline(OUT,
"CPU")`` runs the artifact as is.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import ArtifactError, EngineUnavailableError
from qwen_export.targets.openvino.engine import (
    DETOKENIZER_XML,
    INSTALL_HINT,
    MODEL_BIN,
    MODEL_XML,
    PAST_PREFIX,
    PRESENT_PREFIX,
    TOKENIZER_IR_FILES,
    TOKENIZER_XML,
    _ov,
    _short_type,
    fold_logits_rows,
    unflatten_lm_head,
)


# ---------------------------------------------------------------------------------------- export
def emit(
    model: Any,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    message: Callable[[str], None] = lambda text: None,
    fp16_weights: bool = False,
) -> list[str]:
    """Lower the portable ONNX IR ``model`` to a stateful OpenVINO IR in ``out_dir``; with
    ``fp16_weights`` the float weights are stored as fp16 (OpenVINO decompresses them on load).

    The ONNX is written to a scratch folder inside ``out_dir`` (streamed, ``progress(done,
    total)`` per tensor), converted, made stateful and saved; the scratch folder is removed.
    """
    ov = _ov()
    from qwen_export.onnx_writer import write_onnx

    scratch = out_dir / ".onnx-for-openvino"
    scratch.mkdir()
    try:
        write_onnx(model, scratch, "model.onnx", "model.onnx.data", progress)
        message("converting to OpenVINO IR")
        ov_model = ov.convert_model(os.fspath(scratch / "model.onnx"))
        halved = f16_decompression(ov_model)
        if halved:
            message(f"{halved} weight decompressions in f16 (scales stored as f16)")
        unflatten_lm_head(ov_model)
        fold_logits_rows(ov_model)
        make_stateful(ov_model)
        ov.save_model(ov_model, os.fspath(out_dir / MODEL_XML), compress_to_fp16=fp16_weights)
        del ov_model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [MODEL_XML, MODEL_BIN]


#: element types of quantized weight codes (DequantizeLinear inputs after conversion)
_CODE_TYPES = frozenset({"i4", "u4", "i8", "u8"})


def f16_decompression(ov_model: Any) -> int:
    """Rewrite every f32 weight decompression to NNCF's f16 form; return how many were rewritten.

    The ONNX frontend turns ``DequantizeLinear(codes, scales[, zero_points])`` of an fp32 graph into
    ``Convert(codes -> f32) [- zero_points] * scales(f32 Constant) [-> Reshape]``. This stores the
    scales (and zero points) as f16 and decompresses in f16, ``Convert(codes -> f16) [- zp] *
    scales(f16) [-> Reshape] -> Convert(f32)``, the form optimum-intel/NNCF write, which the CPU
    plugin still runs as compressed weights: the scales take half the bytes (int8 block 32: 1.0625
    instead of 1.125 bytes per weight; int4: 0.5625 instead of 0.625), read on every decode step.
    Scales below f16's normal range (2**-14) become subnormals: their absolute error is at most
    2**-25 * qmax, far below a typical block's rounding error. A tensor with a scale f16 cannot
    hold (above 65504, or non-zero but below 2**-25) keeps f32.
    """
    _ov()
    # Only the chains are held, and each is dropped once rewritten: with it goes the last reference
    # to its f32 scales, so at most one tensor's f32 and f16 scales coexist.
    chains = [chain for chain in map(_decompression_chain, ov_model.get_ordered_ops()) if chain is not None]
    chains.reverse()
    count = 0
    while chains:
        count += _halve(*chains.pop())
    if count:
        ov_model.validate_nodes_and_infer_types()
    return count


def _halve(convert: Any, subtract: Any, scale: Any, mul: Any) -> bool:
    """Rewrite one decompression chain (see :func:`f16_decompression`) unless f16 cannot hold
    its scales (overflow, or a non-zero scale flushed to zero); return whether it was rewritten."""
    from openvino import opset13

    values = scale.get_data()
    halves = values.astype(np.float16)
    if not np.isfinite(halves).all() or ((halves == 0) & (values != 0)).any():
        return False
    x = opset13.convert(convert.input(0).get_source_output(), "f16")
    if subtract is not None:
        x = opset13.subtract(x, _as_f16(subtract.input(1).get_source_output()))
    y = opset13.multiply(x, opset13.constant(halves))
    tail = mul.output(0)
    users = list(tail.get_target_inputs())
    if len(users) == 1 and users[0].get_node().get_type_name() == "Reshape":
        reshape = users[0].get_node()
        y = opset13.reshape(y, reshape.input(1).get_source_output(), reshape.get_attributes()["special_zero"])
        tail = reshape.output(0)
    widened = opset13.convert(y, "f32")
    for consumer in list(tail.get_target_inputs()):
        consumer.replace_source_output(widened.output(0))
    return True


def _decompression_chain(mul: Any) -> tuple[Any, Any, Any, Any] | None:
    """(Convert, Subtract or None, scale Constant, ``mul``) when ``mul`` is ``Convert(codes -> f32)
    [- zp] * f32 Constant`` with low-bit Constant codes; None otherwise."""
    if mul.get_type_name() != "Multiply":
        return None
    data, scale = (port.get_source_output().get_node() for port in mul.inputs())
    if scale.get_type_name() != "Constant" or _short_type(scale.get_output_element_type(0)) != "f32":
        return None
    subtract = None
    if data.get_type_name() == "Subtract":
        subtract, data = data, data.input(0).get_source_output().get_node()
        zero_points = subtract.input(1).get_source_output().get_node()
        if zero_points.get_type_name() == "Convert":
            zero_points = zero_points.input(0).get_source_output().get_node()
        if zero_points.get_type_name() != "Constant":
            return None
    if data.get_type_name() != "Convert" or _short_type(data.get_output_element_type(0)) != "f32":
        return None
    codes = data.input(0).get_source_output().get_node()
    if codes.get_type_name() != "Constant" or _short_type(codes.get_output_element_type(0)) not in _CODE_TYPES:
        return None
    return data, subtract, scale, mul


def _as_f16(zero_points: Any) -> Any:
    """The zero points as f16: ``Convert(u4/u8 Constant -> f16)``, or an f32 Constant's values."""
    from openvino import opset13

    node = zero_points.get_node()
    if node.get_type_name() == "Convert":
        return opset13.convert(node.input(0).get_source_output(), "f16")
    return opset13.constant(node.get_data().astype(np.float16))


def make_stateful(ov_model: Any) -> None:
    """Add ``beam_idx`` and turn every ``past_key_values.*``/``present.*`` pair into a variable.

    Before: Parameter past_key_values.{i}.{k} -> ... -> Result present.{i}.{k}.
    After: ReadValue(zeros [B, kv_heads, 0, D]) -> Gather(beam_idx, axis 0) -> ... -> Assign.
    Raises ArtifactError when the IO is not the canonical one.
    """
    ov = _ov()
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    inputs = [port.get_any_name() for port in ov_model.inputs]
    outputs = {port.get_any_name() for port in ov_model.outputs}
    past = [name for name in inputs if name.startswith(PAST_PREFIX)]
    pairs = {name: PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in past}
    missing = [out for out in pairs.values() if out not in outputs]
    first = _first_input(inputs)
    if not past or missing or first is None or "beam_idx" in inputs:
        raise ArtifactError(
            "the traced graph does not have the canonical KV-cache IO (past_key_values.* inputs, "
            f"present.* outputs, no beam_idx); found inputs {inputs}"
        )
    batch = ov_model.input(first).get_partial_shape()[0]
    beam_idx = opset13.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([batch]))
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    for name in past:
        port = ov_model.input(name)
        consumers = port.get_target_inputs()
        reordered = opset13.gather(port, beam_idx, opset13.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(reordered.output(0))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, pairs)
    _zero_initial_state(ov_model)


def _first_input(inputs: list[str]) -> str | None:
    """The tokens' input: ``input_ids`` [B, S], or a vision-language decoder's ``inputs_embeds``
    [B, S, hidden]; None when there is neither."""
    return next((name for name in ("input_ids", "inputs_embeds") if name in inputs), None)


def _zero_initial_state(ov_model: Any) -> None:
    """Give every ReadValue an initializer: zeros [batch, kv_heads, past, head_dim] where batch is
    input_ids' (or inputs_embeds') and past = len(attention_mask) - len(input_ids), 0 on a fresh state.

    Without one the CPU plugin cannot compile the variables (their batch is dynamic); computing
    ``past`` from the inputs keeps that axis dynamic, so a plain (unfused) Assign accepts growth."""
    from openvino import opset13

    first = _first_input([port.get_any_name() for port in ov_model.inputs])
    ids_shape = opset13.shape_of(ov_model.input(first), output_type="i64")
    mask_shape = opset13.shape_of(ov_model.input("attention_mask"), output_type="i64")
    batch = opset13.gather(ids_shape, opset13.constant([0]), opset13.constant(0))
    past = opset13.subtract(
        opset13.gather(mask_shape, opset13.constant([1]), opset13.constant(0)),
        opset13.gather(ids_shape, opset13.constant([1]), opset13.constant(0)),
    )
    for op in ov_model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims = [d.get_length() if d.is_static else None for d in op.get_output_partial_shape(0)]
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            raise ArtifactError(f"KV-cache variable {op.get_friendly_name()} has shape {dims}, expected [B, H, T, D]")
        parts = [batch, opset13.constant([dims[1]], dtype=np.int64), past, opset13.constant([dims[3]], dtype=np.int64)]
        zeros = opset13.broadcast(
            opset13.constant(0.0, dtype=op.get_output_element_type(0)), opset13.concat(parts, axis=0)
        )
        op.set_arguments([zeros])
    ov_model.validate_nodes_and_infer_types()


def io_signature(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The saved IR's inputs and outputs (the stateful signature): name -> dtype and shape."""
    ov = _ov()
    model = ov.Core().read_model(os.fspath(out_dir / MODEL_XML))

    def describe(ports: Any) -> dict[str, Any]:
        return {
            port.get_any_name(): {
                "dtype": _short_type(port.get_element_type()),
                "shape": [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()],
            }
            for port in ports
        }

    return {"inputs": describe(model.inputs), "outputs": describe(model.outputs)}


#: files AutoTokenizer may read from a checkpoint (what the tokenizer IR is made of)
TOKENIZER_SOURCES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: converted tokenizer IRs kept per process, by the sha256 of their source files (up to 4)
_tokenizer_irs: collections.OrderedDict[str, dict[str, bytes]] = collections.OrderedDict()


def write_tokenizer_ir(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Convert the checkpoint's tokenizer with openvino_tokenizers (what openvino-genai loads).

    The conversion takes seconds; its files are kept per process by the hash of the tokenizer
    files, so exporting the same checkpoint again (another dtype or weight format) copies them.
    Returns the files written; raises EngineUnavailableError when openvino-tokenizers is missing.
    """
    digest = hashlib.sha256()
    for name in TOKENIZER_SOURCES:
        path = checkpoint_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    key = digest.hexdigest()
    if key not in _tokenizer_irs:
        scratch = Path(tempfile.mkdtemp(prefix="tokenizer-ir-", dir=out_dir))
        try:
            _convert_tokenizer(checkpoint_dir, scratch)
            _tokenizer_irs[key] = {name: (scratch / name).read_bytes() for name in TOKENIZER_IR_FILES}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        while len(_tokenizer_irs) > 4:
            _tokenizer_irs.popitem(last=False)
    _tokenizer_irs.move_to_end(key)
    for name, data in _tokenizer_irs[key].items():
        (out_dir / name).write_bytes(data)
    return list(TOKENIZER_IR_FILES)


def _convert_tokenizer(checkpoint_dir: Path, out_dir: Path) -> None:
    ov = _ov()
    try:
        from openvino_tokenizers import convert_tokenizer
    except ImportError:
        raise EngineUnavailableError(
            f"the tokenizer IR for openvino-genai needs openvino-tokenizers; {INSTALL_HINT}"
        ) from None
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.fspath(checkpoint_dir))
    tokenizer, detokenizer = convert_tokenizer(hf, with_detokenizer=True)
    ov.save_model(tokenizer, os.fspath(out_dir / TOKENIZER_XML))
    ov.save_model(detokenizer, os.fspath(out_dir / DETOKENIZER_XML))
