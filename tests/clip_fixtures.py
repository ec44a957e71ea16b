"""Small image-caption sources and towers for the CLIP-fit tests: coloured shapes captioned by colour and shape, a
tiny random BERT-style text tower with its own WordPiece vocabulary, and timm's tiny test network as image tower."""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
IMAGE_TOWER = "random:test_efficientnet"


def shape_image(colour: str, shape: str, rng: np.random.Generator, transparent: bool = False) -> Image.Image:
    """A 48x48 drawing: one shape of a colour at a random place and size, on white (or on transparency)."""
    im = Image.new("RGBA", (48, 48), (0, 0, 0, 0) if transparent else (255, 255, 255, 255))
    d = ImageDraw.Draw(im)
    x0, y0 = (int(v) for v in rng.integers(2, 14, size=2))
    x1, y1 = (int(v) for v in rng.integers(32, 46, size=2))
    fill = COLOURS[colour] + (255,)
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def write_shapes_source(folder: Path, per_kind: int = 6, heldout_per_kind: int = 2, seed: int = 0) -> list[dict]:
    """folder/<n>.png + folder/captions.jsonl: per colour and shape, per_kind training pairs and
    heldout_per_kind held-out ones (those carry `category`: the colour). Returns the rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for i in range(per_kind + heldout_per_kind):
                name = f"{len(rows):04d}.png"
                (folder / name).write_bytes(png_bytes(shape_image(colour, shape, rng, transparent=i % 2 == 1)))
                row = {"image": name, "caption": f"{colour} {shape}", "split": "train" if i < per_kind else "heldout"}
                if row["split"] == "heldout":
                    row["category"] = colour
                rows.append(row)
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def write_tiny_text_tower(folder: Path, layers: int = 1) -> Path:
    """A random BERT of `layers` layers (width 32) with a WordPiece vocabulary of the shape captions' words, saved as
    a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "drawing", "of", "picture", "clip", "art",
             *COLOURS, *SHAPES]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder
