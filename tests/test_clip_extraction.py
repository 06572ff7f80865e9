"""The CLIP embedding extractor, on a tiny randomly initialised CLIP saved locally (the real one is on the Hub)."""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "extract_clip_embeddings.py"


def test_extracts_one_embedding_per_image_in_path_order(tmp_path):
    spec = importlib.util.spec_from_file_location("extract_clip_embeddings", SCRIPT)
    extractor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extractor)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=24
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for i in range(5):
        folder = tmp_path / "images" / ("sub" if i % 2 else "")
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    out = tmp_path / "emb.npy"
    extractor.main(["--images", str(tmp_path / "images"), "--model", str(tmp_path / "clip"),
                    "--batch-size", "2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    embeddings = np.load(out)
    assert embeddings.shape == (5, 24)
    first = next(extractor.images_from_folder(tmp_path / "images"))
    pixels = CLIPImageProcessor.from_pretrained(tmp_path / "clip")(images=[first], return_tensors="pt")
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels["pixel_values"])
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    np.testing.assert_allclose(embeddings[0], expected[0].numpy(), rtol=1e-4, atol=1e-5)
