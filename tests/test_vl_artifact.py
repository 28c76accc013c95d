"""Qwen2-VL / Qwen2.5-VL artifacts end to end: `qwen-export export` of a tiny seeded VL checkpoint,
the runtime with images in chat messages (logits against transformers' whole model over the prompt
and 16 decode steps), the KV cache across turns with images, the CLI's --image, and the refusals."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from test_vl_vision import _image
from typer.testing import CliRunner

import qwen_export
from qwen_export.cli import app
from qwen_export.runtime.multimodal import image_sources

STEPS = 16


@functools.cache
def _transformers_model(ckpt):
    import torch
    import transformers

    return transformers.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()


def _messages(*parts):
    content = [{"type": "image", "image": p} if not isinstance(p, str) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def test_vl_artifact_logits_match_transformers(vl_artifact) -> None:
    """Our export, preprocessing, vision session, embedding merge and M-RoPE positions against
    transformers' Qwen2(.5)-VL on the same image and chat: the prompt's last logits, then 16
    teacher-forced decode steps, within 1e-4."""
    ckpt, artifact = vl_artifact
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["extra"]["multimodal"]["vision_model"] == "vision.onnx"
    assert manifest["extra"]["multimodal"]["embeddings_dtype"] == "float32"  # a float export: exact
    fused = {p["name"]: p["fired"] for p in manifest["passes"]}
    assert fused["attention"] == {"group_query_attention": 2}  # M-RoPE decoder: GQA on rotated q/k
    assert manifest["extra"]["kv_cache"]["layout"] == "shared"
    _match_transformers(ckpt, qwen_export.load(artifact))


def _match_transformers(ckpt, llm) -> None:
    """The prompt's last logits of one image chat, then 16 teacher-forced decode steps, within 1e-4
    of transformers' whole model."""
    import torch

    from qwen_export.runtime.mrope import token_types

    mm, engine = llm.multimodal, llm.engine
    plain, sources = image_sources(_messages(_image(90, 140, seed=5), "Describe this."))
    patches = mm.prepare_images(sources)
    ids = mm.expand(llm.tokenizer.apply_chat_template_ids(plain), patches)
    assert ids.count(mm.spec.image_token_id) == patches[0].num_tokens(2)
    assert mm.set_prompt(ids, patches) == len(ids)
    reference = _transformers_model(ckpt)
    with torch.no_grad():
        ref = reference(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.from_numpy(patches[0].pixel_values),
            image_grid_thw=torch.tensor([patches[0].grid_thw]),
            mm_token_type_ids=torch.from_numpy(token_types(ids, mm.spec)).unsqueeze(0).int(),
            use_cache=True,
        )
        ours = engine.forward(np.asarray([ids]))
        np.testing.assert_allclose(ours[0, -1], ref.logits[0, -1].numpy(), atol=1e-4, rtol=0)
        cache, token = ref.cache, int(ref.logits[0, -1].argmax())
        for _ in range(STEPS):
            ref = reference(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            ours = engine.forward(np.asarray([[token]]))
            np.testing.assert_allclose(ours[0, -1], ref.logits[0, -1].numpy(), atol=1e-4, rtol=0)
            cache, token = ref.cache, int(ref.logits[0, -1].argmax())


def _first_logprobs(llm, messages) -> tuple[str, int, np.ndarray]:
    result = llm.chat(messages, max_tokens=4, temperature=0, logprobs=5)
    first = result.logprobs[0]
    return result.text, result.reused_tokens, np.asarray([alt[2] for alt in first.top])


def test_vl_chat_turns_reuse_the_cache_and_notice_a_changed_image(vl_artifact) -> None:
    """A second turn reuses the first turn's cache (its image is not encoded again) and equals a
    fresh engine's answer; a turn whose earlier image was replaced (same size, other pixels)
    drops the cache from that image on, and equals a fresh engine's answer too."""
    _, artifact = vl_artifact
    a, b, c = _image(84, 112, seed=1), _image(56, 84, seed=2), _image(84, 112, seed=3)
    llm = qwen_export.load(artifact)
    first = llm.chat(_messages(a, "What is this?"), max_tokens=4, temperature=0)
    turn2 = _messages(a, "What is this?") + [first.message(), *_messages(b, "And this?")]
    text, reused, lp = _first_logprobs(llm, turn2)
    assert reused > 0
    fresh_text, fresh_reused, fresh_lp = _first_logprobs(qwen_export.load(artifact), turn2)
    assert (text, fresh_reused) == (fresh_text, 0)
    np.testing.assert_allclose(lp, fresh_lp, atol=1e-5)
    swapped = _messages(c, "What is this?") + [first.message(), *_messages(b, "And this?")]
    text, reused, lp = _first_logprobs(llm, swapped)
    start = llm.tokenizer.apply_chat_template_ids(image_sources(_messages(c, "x"))[0]).index(
        llm.multimodal.spec.image_token_id
    )
    assert reused <= start  # nothing from image a's tokens on was reused
    fresh_text, _, fresh_lp = _first_logprobs(qwen_export.load(artifact), swapped)
    assert text == fresh_text
    np.testing.assert_allclose(lp, fresh_lp, atol=1e-5)
    assert not np.allclose(lp, _first_logprobs(qwen_export.load(artifact), turn2)[2], atol=1e-5)


def test_vl_generate_cli_takes_images(vl_artifact, tmp_path) -> None:
    _, artifact = vl_artifact
    path = tmp_path / "cat.png"
    _image(60, 80, seed=4).save(path)
    runner = CliRunner()
    args = ["generate", str(artifact), "Describe this.", "--image", str(path), "--max-new-tokens", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "prompt +" in result.output
    result = runner.invoke(app, [*args, "--raw"])
    assert result.exit_code == 2 and "--image needs the chat template" in result.output
    result = runner.invoke(app, [*args[:3], "--image", str(tmp_path / "missing.png")])
    assert result.exit_code != 0 and "image file not found" in result.output


def test_text_artifact_refuses_images() -> None:
    """What `generate --image` / `chat --image` say for a text artifact (its LLM has no multimodal)."""
    import types

    from qwen_export.cli.generate import user_content
    from qwen_export.errors import OptionError

    text_llm = types.SimpleNamespace(multimodal=None)
    assert user_content(text_llm, "hi", [], "A") == "hi"
    with pytest.raises(OptionError, match="A is not a vision-language artifact: --image needs a Qwen2-VL"):
        user_content(text_llm, "hi", ["cat.png"], "A")


def test_vl_on_tensorrt_graph_matches_transformers(vl_artifact, tmp_path) -> None:
    """`--target tensorrt` of a VL checkpoint: the standard-op decoder (inputs_embeds, M-RoPE
    position_ids [3, B, S], the fixed KV buffers written by TensorScatter) and the float32 tower,
    run by ONNX Runtime (how a TensorRT artifact is verified without a GPU), match transformers
    within 1e-4 over the prompt and 16 decode steps. The TensorRT engine's own VL path is tested
    against the stand-in module in test_tensorrt_engine.py. --vision-weights int8 (ONNX Runtime's
    DynamicQuantizeMatMul) is refused and leaves nothing."""
    ckpt, _ = vl_artifact
    out = tmp_path / "trt"
    result = CliRunner().invoke(
        app, ["export", str(ckpt), "-o", str(out), "--target", "tensorrt", "--max-length", "512"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "inputs_embeds" in manifest["io"]["inputs"] and "input_ids" not in manifest["io"]["inputs"]
    assert manifest["io"]["inputs"]["position_ids"]["shape"][0] == 3
    assert manifest["extra"]["kv_cache"]["layout"] == "fixed"
    shapes = manifest["extra"]["tensorrt"]["profiles"][0]["shapes"]
    assert (
        shapes["inputs_embeds"]["max"][2] == manifest["spec"]["hidden_size"] and shapes["position_ids"]["max"][0] == 3
    )
    assert manifest["extra"]["multimodal"]["max_image_patches"] == 28 * 28 * 1280 // 14**2  # the processor's default
    _match_transformers(ckpt, qwen_export.load(out, engine="onnxruntime"))
    for target in ("tensorrt", "openvino"):
        bad = tmp_path / f"{target}-int8"
        args = ["export", str(ckpt), "-o", str(bad), "--target", target, "--vision-weights", "int8"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and f"--target {target} takes --vision-weights fp32" in result.output
        assert not bad.exists()


@pytest.mark.parametrize("vl_artifact", ["qwen2_5_vl"], indirect=True)
def test_vl_on_openvino(vl_artifact, tmp_path) -> None:
    """`--target openvino` of a VL checkpoint: the stateful IR takes inputs_embeds and M-RoPE
    position_ids, OpenVINO runs the vision tower's ONNX; with precision f32 the same 1e-4 against
    transformers as on ONNX Runtime; by default the tower in bf16 on a CPU with native bf16
    (features within HALF_TOWER_ERROR); the KV cache reused across chat turns (a fresh engine's
    answer), `check` passes with the default settings, and the paged attention is refused with its
    reason."""
    from qwen_export import cpuinfo
    from qwen_export.errors import OptionError
    from qwen_export.export import parity_vl

    pytest.importorskip("openvino")
    ckpt, _ = vl_artifact
    out = tmp_path / "ov"
    result = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out), "--target", "openvino"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "inputs_embeds" in manifest["io"]["inputs"] and "input_ids" not in manifest["io"]["inputs"]
    assert manifest["io"]["inputs"]["position_ids"]["shape"][0] == 3
    llm = qwen_export.load(out, precision="f32")  # the tower in f32 too: exact
    assert type(llm.engine).__name__ == "OpenVINOEngine"  # stateful: the paged rewrite reads input_ids
    assert llm.engine.tower_precision == "f32"
    _match_transformers(ckpt, llm)
    # by default the tower runs in bf16 where the CPU multiplies bf16 in hardware
    default = qwen_export.load(out)
    assert default.engine.tower_precision == ("bf16" if cpuinfo.native_bf16() else "f32")
    from qwen_export.runtime.vision_input import encoder_feeds

    patches = default.multimodal.prepare_images([_image(84, 112, seed=9)])[0]
    feeds, _ = encoder_feeds(patches, default.multimodal.spec.vision)
    exact, fast = llm.engine.encode_image(feeds), default.engine.encode_image(feeds)
    error = np.abs(fast - exact).max() / np.abs(exact).max()
    assert error < parity_vl.HALF_TOWER_ERROR and (error > 0) == cpuinfo.native_bf16(), error
    a, b = _image(84, 112, seed=1), _image(56, 84, seed=2)
    first = llm.chat(_messages(a, "What is this?"), max_tokens=4, temperature=0)
    turn2 = _messages(a, "What is this?") + [first.message(), *_messages(b, "And this?")]
    text, reused, lp = _first_logprobs(llm, turn2)
    fresh_text, _, fresh_lp = _first_logprobs(qwen_export.load(out, precision="f32"), turn2)
    assert reused > 0 and text == fresh_text
    np.testing.assert_allclose(lp, fresh_lp, atol=1e-5)
    args = ["check", str(out), "--reference", str(ckpt), "--max-tokens", "24", "--greedy-tokens", "4", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["passed"]
    with pytest.raises(OptionError, match="runs on the stateful attention"):
        qwen_export.load(out, attention="paged")
    with pytest.raises(OptionError, match="does not batch sequences yet"):
        llm.engine.open_rows(2)


def _prompt_logits(artifact, image) -> np.ndarray:
    """[T, V] logits at every position of an image prompt, fed one token at a time."""
    from qwen_export.export.parity_vl import vision_prompt
    from qwen_export.runtime.loader import open_artifact
    from qwen_export.runtime.perplexity import artifact_logits

    loaded = open_artifact(artifact)
    prompt = vision_prompt(loaded, image, "Describe this picture.", 16)
    return artifact_logits(loaded.engine, prompt.ids).astype(np.float64)


@pytest.mark.parametrize("vl_artifact", ["qwen2_5_vl"], indirect=True)
def test_vl_int4_default_export(vl_artifact, tmp_path) -> None:
    """The default int4 export of a VL checkpoint (GPTQ calibrated on text, where M-RoPE is plain
    RoPE; the embedding table as float16) runs, and its distributions over an image prompt stay
    near the float artifact's. Measured with the tied default (every weight at 4 bits): mean KL
    0.21-0.26 over three image prompts (int4 noise of a 64-wide random model; 0.06-0.08 with 8-bit
    attention and lm_head); another image of the same size gives 0.51 against the float artifact
    even unquantized, 0.77 quantized: misplaced features or positions give more than the bound."""
    ckpt, artifact = vl_artifact
    out = tmp_path / "int4"
    result = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out), "--weights", "int4"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["multimodal"]["embeddings_dtype"] == "float16"
    assert manifest["extra"]["quantization"]["algorithm"] == "gptq"
    assert manifest["extra"]["quantization"]["kept"] == []  # the tied lm_head (a Gemm alone here) too
    image = _image(70, 90, seed=6)
    quantized, reference = _prompt_logits(out, image), _prompt_logits(artifact, image)
    p = np.exp(reference - reference.max(-1, keepdims=True))
    q = np.exp(quantized - quantized.max(-1, keepdims=True))
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    kl = float((p * (np.log(p) - np.log(q))).sum(-1).mean())
    assert kl < 0.4, kl


def test_vl_check_against_transformers(vl_artifact) -> None:
    """`qwen-export check` of a VL artifact: vision features and decoder logits on the built-in
    image and text, against transformers; --image of a text artifact is refused."""
    ckpt, artifact = vl_artifact
    result = CliRunner().invoke(
        app, ["check", str(artifact), "--reference", str(ckpt), "--max-tokens", "24", "--greedy-tokens", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["vision_relative_error"] < 1e-5
    assert report["tokens"] > 24  # the image's tokens and the chat template's come on top of the text
    assert report["max_abs_logit_error"] < 1e-4


def test_int8_saturation_rule() -> None:
    from qwen_export.targets.onnxruntime.dynamic_int8 import saturates

    assert saturates("x86_64", frozenset({"avx2"})) and saturates("x86_64", frozenset({"avx2", "avx512f"}))
    assert saturates("AMD64", frozenset())  # flags unknown: assume the worst
    assert not saturates("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not saturates("x86_64", frozenset({"avx2", "avx_vnni"}))
    assert not saturates("aarch64", frozenset())


@pytest.mark.parametrize("vl_artifact", ["qwen2_5_vl"], indirect=True)
def test_vl_int8_vision_tower(vl_artifact, tmp_path, monkeypatch) -> None:
    """`--vision-weights int8`: the tower's linears become per-column 7-bit weights in
    DynamicQuantizeMatMul (int8 GEMMs, activations quantized at run time), its features stay
    within INT8_TOWER_ERROR of transformers' (measured 0.028 on this random model; 7-bit weights: 0.044), and a bad
    value is one line."""
    import onnx

    from qwen_export.export import parity_vl
    from qwen_export.runtime.loader import open_artifact
    from qwen_export.targets.onnxruntime import dynamic_int8

    ckpt, artifact = vl_artifact
    out = tmp_path / "int8-tower"
    result = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out), "--vision-weights", "int8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["multimodal"]["vision_weights"] == "int8"
    graph = onnx.load(out / "vision.onnx", load_external_data=False).graph
    dynamic = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    # per block: qkv, proj and the three MLP linears; the merger's two
    assert len(dynamic) == 4 * 5 + 2
    assert all(len(n.input) == 5 and n.input[3] == "" for n in dynamic)  # biases folded, no zero point
    codes = {i.name: i for i in graph.initializer}[dynamic[0].input[1]]
    assert codes.data_type == onnx.TensorProto.INT8
    float_linears = [n.input[1] for n in graph.node if n.op_type == "MatMul" and "weight_t" in "".join(n.input)]
    assert float_linears == ["patch_embed.proj.weight_t"]  # reads raw pixels; cheap
    assert not [n for n in graph.node if n.op_type == "Add" and any("bias" in i for i in n.input)]
    # 0.47x here: in a 32-wide tower the float32 patch embedding is a third of the bytes
    assert (out / "vision.onnx.data").stat().st_size < 0.55 * (artifact / "vision.onnx.data").stat().st_size
    loaded = open_artifact(out)
    prompt = parity_vl.vision_prompt(loaded, _image(84, 112, seed=7), "Describe.", 8)
    reference = parity_vl.VisionReference(ckpt, prompt.patches, loaded.engine.multimodal.spec)
    error = parity_vl.vision_error(loaded.engine, reference, prompt)
    print(f"int8 tower: features' error {error:.4f}")
    assert 0 < error < parity_vl.INT8_TOWER_ERROR
    # an x86 CPU without VNNI gets unsigned codes (no int16 saturation): the same features
    features = loaded.engine.multimodal.encoded(loaded.engine.multimodal.prompt_images[0])
    monkeypatch.setattr(dynamic_int8, "saturates", lambda machine, flags: True)
    unsigned = open_artifact(out)
    parity_vl.vision_prompt(unsigned, _image(84, 112, seed=7), "Describe.", 8)
    again = unsigned.engine.multimodal.encoded(unsigned.engine.multimodal.prompt_images[0])
    np.testing.assert_allclose(again, features, rtol=1e-6, atol=1e-7)
    bad = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "bad"), "--vision-weights", "int4"])
    assert bad.exit_code == 2 and "unknown --vision-weights 'int4'; valid values: fp32, int8" in bad.output


def test_vl_served_with_data_urls_and_files_under_the_image_root(vl_artifact, tmp_path) -> None:
    """`qwen-export serve` of a VL artifact: an image sent as a data URL, or named under --image-root,
    gives LLM.chat's answer for that image; a remote URL or a file outside the root is a 400."""
    import base64

    from fastapi.testclient import TestClient

    from qwen_export.serve.app import create_app

    _, artifact = vl_artifact
    root = tmp_path / "images"
    root.mkdir()
    _image(56, 84, seed=5).save(root / "a.png")
    _image(56, 84, seed=6).save(tmp_path / "private.png")
    data_url = "data:image/png;base64," + base64.b64encode((root / "a.png").read_bytes()).decode()

    def ask(url: str) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}],
            }
        ]

    expected = qwen_export.load(artifact).chat(ask(data_url), max_tokens=5, temperature=0).text
    with TestClient(create_app(qwen_export.load(artifact), model_name="vl", image_root=root)) as client:

        def post(url: str):
            return client.post(
                "/v1/chat/completions", json={"model": "vl", "messages": ask(url), "max_tokens": 5, "temperature": 0}
            )

        for url in (data_url, "a.png"):
            reply = post(url)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == expected
        for url, message in (
            (str(tmp_path / "private.png"), "under the server's --image-root"),
            ("https://x/a.png", "does not fetch"),
        ):
            reply = post(url)
            assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
