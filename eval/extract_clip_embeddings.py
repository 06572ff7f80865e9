"""Extract CLIP image embeddings (the paper's CLIP setting) into a .npy file for `sae-lens train --activations`.

Usage:
    python eval/extract_clip_embeddings.py --images DIR --out clip_vitb16.npy
    python eval/extract_clip_embeddings.py --hf-dataset pixparse/cc3m-wds --split train --limit 3000000 --out ...

The embeddings are CLIP's projected image embeddings (d = 512 for ViT-B/16), unnormalised, one row per
image, in file order (sorted paths) or dataset order.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def images_from_folder(folder: Path) -> Iterator[Image.Image]:
    """Every image under `folder`, in sorted path order, as RGB."""
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(path) as image:
            yield image.convert("RGB")


def images_from_dataset(name: str, split: str, column: str) -> Iterator[Image.Image]:
    """The images of a Hugging Face dataset, streamed."""
    from datasets import load_dataset

    for row in load_dataset(name, split=split, streaming=True):
        yield row[column].convert("RGB")


@torch.no_grad()
def embed(
    images: Iterator[Image.Image], model_name: str, batch_size: int, device: str, total: int | None
) -> np.ndarray:
    """CLIP image embeddings of `images` as a float32 (n, d) array."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_name).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(model_name)
    chunks = []
    with tqdm(total=total, desc="Embedding images", unit="img") as bar:
        while batch := list(islice(images, batch_size)):
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
            features = model.get_image_features(pixel_values=pixels)
            if not isinstance(features, torch.Tensor):  # newer transformers return a model output
                features = features.pooler_output
            chunks.append(features.float().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(chunks)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, embed the images and save the .npy file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of images (searched recursively)")
    source.add_argument("--hf-dataset", help="a Hugging Face dataset with an image column, streamed")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="jpg")
    parser.add_argument("--limit", type=int, default=None, help="embed at most this many images")
    parser.add_argument("--model", default="openai/clip-vit-base-patch16", help="a CLIP model id or local folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="the .npy file to write")
    args = parser.parse_args(argv)
    if args.images is not None:
        images = images_from_folder(args.images)
    else:
        images = images_from_dataset(args.hf_dataset, args.split, args.image_column)
    if args.limit is not None:
        images = islice(images, args.limit)
    embeddings = embed(images, args.model, args.batch_size, args.device, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial.npy")
    np.save(tmp, embeddings)
    tmp.rename(args.out)
    print(f"wrote {embeddings.shape[0]} embeddings of width {embeddings.shape[1]} to {args.out}")


if __name__ == "__main__":
    main()
