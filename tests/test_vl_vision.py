"""Qwen2-VL / Qwen2.5-VL, the vision side: config parsing, image preprocessing against transformers'
image processor, and the exported vision tower against transformers' on tiny seeded checkpoints."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from qwen_export.errors import ConfigError, OptionError
from qwen_export.runtime import vision_input as vi
from qwen_export.vision import MultimodalSpec, VisionFamily, parse_multimodal, text_config

# the released Qwen2-VL-2B-Instruct config.json (text fields at the top level)
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
# the released Qwen2.5-VL-3B-Instruct config.json
QWEN25_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def test_released_configs_parse() -> None:
    from qwen_export.spec import ModelSpec

    two = parse_multimodal(QWEN2_VL_2B)
    assert two is not None and two.vision.family is VisionFamily.QWEN2_VL
    assert (two.vision.embed_dim, two.vision.mlp_dim, two.vision.hidden_act) == (1280, 5120, "quick_gelu")
    assert two.vision.patch_dim == 3 * 2 * 14 * 14 and two.mrope_section == (16, 24, 24)
    assert not two.vision.windowed and two.image_token_id == 151655
    spec = ModelSpec.from_config(text_config(QWEN2_VL_2B))
    assert (spec.hidden_size, spec.num_hidden_layers, spec.rope_scaling) == (1536, 28, None)
    assert spec.tie_word_embeddings
    three = parse_multimodal(QWEN25_VL_3B)
    assert three is not None and three.vision.windowed and three.vision.fullatt_block_indexes == (7, 15, 23, 31)
    assert (three.vision.embed_dim, three.vision.mlp_dim, three.vision.out_hidden_size) == (1280, 3420, 2048)
    assert [three.vision.is_full_attention(i) for i in (6, 7)] == [False, True]
    assert MultimodalSpec.from_dict(three.to_dict()) == three
    assert parse_multimodal({"architectures": ["Qwen2ForCausalLM"]}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("vision_config"), "vision_config"),
        (lambda c: c["rope_scaling"].pop("mrope_section"), "mrope_section is missing"),
        (lambda c: c["rope_scaling"].update(mrope_section=[16, 24, 25]), "must sum to head_dim/2"),
        (lambda c: c["vision_config"].update(hidden_size=1024), "differs from the text model's hidden_size"),
        (lambda c: c["vision_config"].update(num_heads=7), "must split into 7 heads"),
        (lambda c: c["vision_config"].update(hidden_act="relu6"), "hidden_act='relu6' is not supported"),
    ],
)
def test_bad_vl_configs(change, message) -> None:
    import copy

    config = copy.deepcopy(QWEN2_VL_2B)
    change(config)
    with pytest.raises(ConfigError, match=message):
        parse_multimodal(config)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(448, 448, (448, 448)), (20, 30, (56, 84)), (4000, 3000, (1148, 840)), (100, 70, (112, 56))],
)
def test_smart_resize_matches_transformers(height, width, expected) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ours = vi.smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280)
    assert ours == smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280)
    assert ours == expected


def _image(height: int, width: int, seed: int, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), (x + y) % 256], -1)
    noisy = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([noisy, alpha]), "RGBA")
    elif mode == "P":
        image = image.convert("P")
    return image


@pytest.mark.parametrize(
    ("height", "width", "mode", "settings"),
    [
        (224, 336, "RGB", {}),
        (37, 61, "RGBA", {}),  # upscaled to min_pixels; alpha composited onto white
        (300, 200, "P", {"max_pixels": 28 * 28 * 40}),  # downscaled to max_pixels
        (57, 57, "L", {}),
    ],
)
def test_preprocessing_equals_transformers(height, width, mode, settings) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _image(height, width, seed=height, mode="RGB" if mode == "L" else mode)
    if mode == "L":
        image = image.convert("L")
    reference = Qwen2VLImageProcessorPil(**settings)(images=[image], return_tensors="np")
    ours = vi.preprocess_image(image, vi.ImageProcessing(**settings))
    assert ours.grid_thw == tuple(int(v) for v in reference["image_grid_thw"][0])
    np.testing.assert_array_equal(ours.pixel_values, reference["pixel_values"])


def test_image_sources(tmp_path) -> None:
    image = _image(40, 50, seed=1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    arrays = [np.asarray(vi.load_image(source)) for source in (path, str(path), url, data, image, np.asarray(image))]
    for array in arrays[1:]:
        np.testing.assert_array_equal(array, arrays[0])
    with pytest.raises(OptionError, match="remote images are not fetched"):
        vi.load_image("https://example.com/cat.png")
    with pytest.raises(OptionError, match="image file not found"):
        vi.load_image(tmp_path / "missing.png")
    with pytest.raises(OptionError, match="cannot decode the image"):
        vi.load_image(b"not an image")
    with pytest.raises(OptionError, match="base64 payload is invalid"):
        vi.load_image("data:image/png;base64,@@@")


@pytest.mark.parametrize("grid", [(1, 8, 12), (1, 10, 6), (2, 4, 4)])
def test_window_layout_matches_transformers(grid) -> None:
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    vision = parse_multimodal(QWEN25_VL_3B).vision  # type: ignore[union-attr]
    import dataclasses

    vision = dataclasses.replace(vision, window_size=56)  # 2x2 merged tokens per window
    grid_thw = torch.tensor([grid])
    index, cu = get_vision_window_index(grid_thw, 2, 56, 14)
    order, window_ids = vi.window_layout(grid, vision)
    np.testing.assert_array_equal(order, index.numpy())
    boundaries = np.flatnonzero(np.diff(window_ids)) + 1
    np.testing.assert_array_equal(np.concatenate([[0], boundaries, [window_ids.size]]), cu.numpy())
    np.testing.assert_array_equal(vi.vision_position_ids(grid, 2), get_vision_position_ids(grid_thw, 2).numpy())


def test_window_slots_pad_each_window_and_invert() -> None:
    # windows 0 and 3 hold patches, 1 and 2 none (cut away at an edge): compacted to two windows
    window_ids = np.array([0, 0, 0, 3, 3], dtype=np.int64)
    feeds = vi.window_slots(window_ids, 4)
    np.testing.assert_array_equal(feeds["window_slots"], [[0, 1, 2, 0], [3, 4, 0, 0]])
    np.testing.assert_array_equal(feeds["window_rows"], [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(feeds["window_slots"].reshape(-1)[feeds["window_rows"]], np.arange(5))
    low = np.finfo(np.float32).min
    np.testing.assert_array_equal(feeds["window_mask"], [[0, 0, 0, low], [0, 0, low, low]])
    with pytest.raises(OptionError, match="more than 2 patches"):
        vi.window_slots(window_ids, 2)


# ---------------------------------------------------------------- the exported tower


@pytest.fixture(scope="module")
def vl_export(vl_artifact):
    """(checkpoint, its MultimodalSpec, the artifact's vision.onnx): the session's VL export."""
    from qwen_export.export.checkpoint import Checkpoint

    ckpt, artifact = vl_artifact
    _, multimodal = Checkpoint.open_vl(ckpt)
    return ckpt, multimodal, artifact / "vision.onnx"


def _reference_features(ckpt, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor([grid]))
    return out.pooler_output.numpy()


@pytest.mark.parametrize(("height", "width"), [(112, 168), (150, 230), (56, 420)])
def test_vision_tower_matches_transformers(vl_export, height, width) -> None:
    import onnxruntime as ort

    ckpt, multimodal, model_path = vl_export
    processing = vi.ImageProcessing.for_vision(multimodal.vision, min_pixels=56 * 56)
    patches = vi.preprocess_image(_image(height, width, seed=width), processing)
    feeds, restore = vi.encoder_feeds(patches, multimodal.vision)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    assert "window_ids" not in names
    (features,) = session.run(None, {name: feeds[name] for name in names})
    if restore is not None:
        features = features[restore]
    reference = _reference_features(ckpt, patches.pixel_values, patches.grid_thw)
    assert features.shape == (patches.num_tokens(2), multimodal.vision.out_hidden_size)
    np.testing.assert_allclose(features, reference, atol=1e-4, rtol=0)


def test_mrope_positions_match_transformers(vl_export) -> None:
    import torch
    import transformers

    from qwen_export.runtime.mrope import decode_positions, rope_positions, token_types

    ckpt, multimodal, _ = vl_export
    model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    grids = [(1, 4, 6), (1, 8, 2)]
    pad, start, end = multimodal.image_token_id, multimodal.vision_start_token_id, multimodal.vision_end_token_id
    ids = [9, 10, start] + [pad] * 6 + [end, 11, 12, 13, start] + [pad] * 4 + [end, 14]
    ours, delta = rope_positions(ids, multimodal, grids)
    input_ids = torch.tensor([ids])
    types = torch.from_numpy(token_types(ids, multimodal)).unsqueeze(0).int()
    reference, deltas = model.model.get_rope_index(input_ids, types, image_grid_thw=torch.tensor(grids))
    np.testing.assert_array_equal(ours, reference[:, 0].numpy())
    assert delta == int(deltas[0, 0])
    np.testing.assert_array_equal(decode_positions(len(ids), 2, delta)[0], [len(ids) + delta, len(ids) + delta + 1])
    text_only, zero = rope_positions([1, 2, 3], multimodal)
    np.testing.assert_array_equal(text_only, np.tile(np.arange(3), (3, 1)))
    assert zero == 0


def test_text_spec_refuses_vl_configs_by_name() -> None:
    from qwen_export.spec import ModelSpec

    with pytest.raises(ConfigError, match="vision-language model: `qwen-export export` takes it"):
        ModelSpec.from_config(QWEN25_VL_3B)
