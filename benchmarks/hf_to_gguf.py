"""A Qwen2 checkpoint written as a GGUF for llama.cpp, so llama.cpp can run beside every other engine in
``compare.py`` on a checkpoint that has no published GGUF (the random 0.5B shape of
``export_real_shape.py``).

1. The checkpoint's tensors are written with the ``gguf`` package's ``GGUFWriter`` under llama.cpp's
   Qwen2 names (the package's own ``get_tensor_name_map``): matrices as float16,
   norms and biases as float32; the hyper-parameters as llama.cpp's ``qwen2.*`` keys.
2. The vocabulary (``tokenizer.*`` keys: tokens, types, merges, special ids, chat template) is copied
   from another GGUF of the same tokenizer (``--vocab-from``, e.g. the real Qwen2.5-Coder-1.5B's:
   every Qwen2.5 shares the 151,936-entry vocabulary); a size mismatch is an error.
3. ``--quantize Q4_K_M`` (or any llama.cpp file type name) then runs ``llama_model_quantize`` of
   llama-cpp-python in its own interpreter (``--llama-python``), which is what llama.cpp's
   ``llama-quantize`` tool does; the float16 file is removed afterwards unless ``--keep-f16``.

    .venv/bin/python benchmarks/hf_to_gguf.py /work/rs/checkpoint /work/rs/rs-q4_k_m.gguf \\
        --vocab-from /work/real/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --quantize Q4_K_M

Qwen2 / Qwen2.5 text checkpoints only (no Qwen3 q/k norms, no MoE, no vision): anything else is an
error naming what is missing. The output is written to a temporary name and renamed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import numpy as np

from qwen_export.export.checkpoint import Checkpoint

#: llama.cpp file types by name (``llama_ftype`` in llama.h)
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if rc else 0)
"""


def _vocab(writer, source: Path, vocab_size: int) -> None:  # noqa: ANN001 - gguf.GGUFWriter
    import gguf

    if not source.is_file():
        raise SystemExit(f"error: --vocab-from {source} does not exist")
    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise SystemExit(f"error: {source} has no tokenizer.ggml.tokens: pass a GGUF with a vocabulary")
    if len(tokens.data) != vocab_size:
        raise SystemExit(f"error: {source} has {len(tokens.data)} tokens, the checkpoint's vocab_size is {vocab_size}")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def write_f16(checkpoint: Path, out: Path, vocab_from: Path) -> None:
    import gguf

    ck = Checkpoint.open(checkpoint)
    spec = ck.spec
    if spec.qk_norm or getattr(spec, "num_experts", 0):
        raise SystemExit("error: only Qwen2 / Qwen2.5 text checkpoints are written (no q/k norms, no experts)")
    writer = gguf.GGUFWriter(str(out), arch="qwen2")
    writer.add_name(checkpoint.name)
    writer.add_block_count(spec.num_hidden_layers)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_attention_heads)
    writer.add_head_count_kv(spec.num_key_value_heads)
    writer.add_rope_freq_base(float(spec.rope_theta))
    writer.add_layer_norm_rms_eps(float(spec.rms_norm_eps))
    writer.add_file_type(FILE_TYPES["F16"])
    _vocab(writer, vocab_from, spec.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, spec.num_hidden_layers)
    for hf in ck.names():
        if spec.tie_word_embeddings and hf == "lm_head.weight":
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SystemExit(f"error: {checkpoint}'s {hf} has no llama.cpp Qwen2 name")
        array = ck.read(hf).astype(np.float32)
        writer.add_tensor(name, array.astype(np.float16) if array.ndim == 2 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def quantize(f16: Path, out: Path, file_type: str, llama_python: Path, threads: int) -> None:
    if not llama_python.is_file():
        raise SystemExit(
            f"error: {llama_python} not found: set up llama-cpp-python (benchmarks/README.md) or pass --llama-python"
        )
    cmd = [str(llama_python), "-c", _QUANTIZE, str(f16), str(out), str(FILE_TYPES[file_type]), str(threads)]
    if subprocess.run(cmd, check=False).returncode:
        raise SystemExit(f"error: llama_model_quantize failed on {f16}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="the GGUF to write")
    p.add_argument("--vocab-from", type=Path, required=True, help="a GGUF of the same tokenizer")
    p.add_argument("--quantize", choices=[t for t in FILE_TYPES if t != "F16"], default=None)
    p.add_argument("--llama-python", type=Path, default=Path("/work/anchors/llamacpp-venv/bin/python"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-f16", action="store_true")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists: remove it first")
    tmp = args.out.with_name(args.out.name + ".partial")
    f16 = args.out.with_name(args.out.stem + "-f16.gguf") if args.quantize else tmp
    try:
        write_f16(args.checkpoint, f16, args.vocab_from)
        if args.quantize:
            quantize(f16, tmp, args.quantize, args.llama_python, args.threads)
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
        if args.quantize and not args.keep_f16:
            f16.unlink(missing_ok=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
