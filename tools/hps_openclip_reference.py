"""Golden data for ``tests/test_hps_openclip_reference.py``: a tiny open_clip CLIP (the architecture family of HPSv2's
ViT-H-14) run by open_clip itself, so the repo's open_clip -> transformers conversion can be checked against the real
reference implementation without open_clip or torchvision in the project's environment.

NEEDS open_clip and torchvision, which cannot live beside the project's torch 2.13 (see the README), so it runs in a
separate virtual environment of its own::

    python3 -m venv /tmp/venv-openclip
    /tmp/venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 numpy safetensors
    /tmp/venv-openclip/bin/python tools/hps_openclip_reference.py   # writes tests/data/hps_openclip_reference/

(the committed data was made with open_clip_torch 3.3.0, torch 2.14.1, torchvision 0.29.1, Pillow 13.0; the exact
versions are recorded in ``config.json``). The project itself is not imported: only open_clip, torch, torchvision,
numpy, Pillow and safetensors.

What it writes (about 0.87 MB; float32 tensors, int64 token ids):

* ``HPS_tiny_openclip.pt``: ``{"state_dict": open_clip CLIP state dict}``, the layout of HPSv2's published
  ``HPS_v2.1_compressed.pt`` (plain tensors, loads with ``torch.load(weights_only=True)``). The model is
  ``open_clip.model.CLIP`` with ViT towers as in open_clip's ``ViT-H-14`` config (GELU, not QuickGELU; patch 14; text
  width equal to the embedding dimension, so the text projection is square as in ViT-H-14 and a missing transpose
  would not show up as a shape error) but tiny: 56 px images, 2 layers per tower, 3 vision heads of width 12, 2 text
  heads. Every parameter is seeded random, including LayerNorm weights / biases, attention biases, the class and
  positional embeddings and ``logit_scale``, so no parameter sits at a default that would hide a wrong mapping.
* ``config.json``: the open_clip model config, the word vocabulary and prompts, the images' files and sizes, the
  versions used and how each tensor was made.
* ``images/*.png``: small synthetic 8-bit RGB images (square and not; one upsampled, the others downsampled).
* ``reference.safetensors``:

  - ``text_ids``: open_clip token ids of the prompts (``<bos>`` words ``<eos>``, padded with 0; ``<eos>`` is the
    largest id, as in the CLIP BPE vocabulary, where open_clip's argmax pooling finds it);
  - ``random_pixels``: two random N(0, 1) model inputs;
  - ``image_features`` / ``image_features_normalized``, ``text_features`` / ``text_features_normalized``: open_clip's
    ``encode_image`` / ``encode_text`` (raw and L2-normalised) of the prompts' ids and of the model inputs
    ``pixels = cat(hpsv2_pixels_<name> for each image in config order, random_pixels)``;
  - ``scores``: ``image_features @ text_features.T`` of ``model(pixels, text_ids)`` with ``output_dict=True`` as in
    HPSv2's ``img_score.py``: entry (i, j) is its HPS (the cosine) of input i and prompt j;
  - ``scores_openclip_pixels``: the same for ``openclip_pixels_<name>`` (the images through open_clip 3.x's
    transform, below);
  - ``logit_scale``;
  - ``hpsv2_pixels_<name>``: HPSv2's published ``preprocess_val`` of image ``<name>`` (HPSv2's vendored open_clip:
    ``ToTensor()``, then ``ResizeMaxSize(size, fill=0)`` on the float tensor -- bicubic ``torchvision`` resize of the
    longest side, black padding split ``pad // 2`` before -- then ``Normalize`` with OpenAI CLIP's mean and std).
    open_clip 3.x no longer ships ``ResizeMaxSize``; it is restated below line for line with
    ``torchvision.transforms.functional``. torchvision >= 0.17 antialiases tensor resizes by default (older versions
    did not);
  - ``openclip_pixels_<name>``: open_clip's own ``image_transform(size, is_train=False, resize_mode="longest")``
    (its current equivalent: PIL bicubic resize of the longest side, ``CenterCropOrPad`` with black, ``ToTensor``,
    ``Normalize``), which resamples the 8-bit PIL image.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "hps_openclip_reference"
SEED = 20240607

# open_clip ViT-H-14 (HPSv2): embed 1024; vision 224 px, patch 14, width 1280, head_width 80, 32 layers;
# text ctx 77, vocab 49408, width 1024, 16 heads, 24 layers; GELU. The same family, tiny:
WORDS = ["a", "an", "photo", "of", "red", "green", "blue", "circle", "square", "cat", "dog", "on", "the", "grass",
         "painting", "detailed", "sky", "."]
VOCAB = ["<pad>", "<unk>", *WORDS, "<bos>", "<eos>"]  # <bos> / <eos> the two largest ids, as in CLIP's BPE
CONTEXT = 12
MODEL_CFG = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 56, "patch_size": 14, "width": 36, "head_width": 12, "layers": 2, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": len(VOCAB), "width": 32, "heads": 2, "layers": 2,
                 "mlp_ratio": 4.0},
}
PROMPTS = ["a photo of a red circle on the grass", "a detailed painting of a blue square", "a green dog ."]
IMAGES = {"landscape": (160, 240), "portrait": (260, 140), "small": (30, 45), "square": (64, 64)}  # (H, W)


def tokenize(texts: list[str]) -> torch.Tensor:
    """open_clip's layout: <bos> tokens <eos>, zero padded to the context length."""
    ids = {w: i for i, w in enumerate(VOCAB)}
    out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for row, text in enumerate(texts):
        toks = [ids["<bos>"], *[ids[w] for w in text.lower().split()], ids["<eos>"]]
        assert len(toks) <= CONTEXT, text
        out[row, : len(toks)] = torch.tensor(toks)
    return out


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random and away from its initial value (LayerNorm 1 + 0.2 N, biases 0.1 N, ...)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(1.9)  # open_clip initialises log(1 / 0.07) = 2.659
            elif ".ln" in name or name.startswith("ln") or "ln_" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # biases, class embedding
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) if "class_embedding" not in name
                        else 0.5 * torch.randn(p.shape, generator=gen))
            elif "positional_embedding" in name or "token_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("proj") or name == "text_projection":  # (width, embed_dim) projections
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)
            else:  # linear / conv weights: fan-in scaled, attention logits of order 1 so softmax is not uniform
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(1.2 * torch.randn(p.shape, generator=gen) / fan_in**0.5)


def synthetic_image(h: int, w: int, rng: np.random.Generator):
    """An 8-bit RGB image with smooth gradients, hard-edged shapes, a checker texture and mild noise."""
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = y / max(h - 1, 1), x / max(w - 1, 1)
    c0, c1, c2 = rng.uniform(0, 1, size=(3, 3))
    img = c0 * (1 - x)[..., None] + c1 * x[..., None] * (1 - y)[..., None] + c2 * (x * y)[..., None]
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    disk = ((y - cy) * h) ** 2 + ((x - cx) * w) ** 2 < (r * min(h, w)) ** 2
    img[disk] = rng.uniform(0, 1, size=3)
    top, left = int(0.1 * h), int(0.55 * w)
    cell = max(2, min(h, w) // 12)
    yy, xx = np.mgrid[0 : h - top, 0 : w - left]
    checker = ((yy // cell + xx // cell) % 2).astype(bool) & (yy < 0.35 * h) & (xx < 0.35 * w)
    img[top:, left:][checker] = [1.0, 1.0, 1.0]
    img[top:, left:][~checker & (yy < 0.35 * h) & (xx < 0.35 * w)] = [0.0, 0.0, 0.0]
    img = img + rng.normal(0, 0.015, size=img.shape)
    return Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8), "RGB")


def hpsv2_preprocess_val(size: int):
    """HPSv2's ``preprocess_val`` (``hpsv2/src/open_clip/transform.py``, ``image_transform(..., is_train=False,
    resize_longest_max=True)``): RGB, ToTensor, ResizeMaxSize(size, fill=0) on the float tensor, Normalize."""
    import torchvision.transforms.functional as TF
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import Compose, InterpolationMode, Normalize, ToTensor

    def resize_max_size(img: torch.Tensor) -> torch.Tensor:  # HPSv2's ResizeMaxSize.forward, tensor branch
        height, width = img.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h = size - new_size[0]
            pad_w = size - new_size[1]
            img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return img

    return Compose([lambda im: im.convert("RGB"), ToTensor(), resize_max_size,
                    Normalize(mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    import open_clip
    import PIL
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = open_clip.model.CLIP(**MODEL_CFG, output_dict=True)
    randomise(model, gen)
    model.eval()
    size = MODEL_CFG["vision_cfg"]["image_size"]

    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    hps_tf = hpsv2_preprocess_val(size)
    oc_tf = open_clip.image_transform(size, is_train=False, resize_mode="longest")
    tensors: dict[str, torch.Tensor] = {}
    hps_pixels = []
    for name, (h, w) in IMAGES.items():
        img = synthetic_image(h, w, rng)
        img.save(out / "images" / f"{name}.png")
        tensors[f"hpsv2_pixels_{name}"] = hps_tf(img)
        tensors[f"openclip_pixels_{name}"] = oc_tf(img)
        hps_pixels.append(tensors[f"hpsv2_pixels_{name}"])
    tensors["random_pixels"] = torch.randn(2, 3, size, size, generator=gen)
    pixels = torch.cat([torch.stack(hps_pixels), tensors["random_pixels"]])
    text_ids = tokenize(PROMPTS)

    with torch.no_grad():
        img_f = model.encode_image(pixels)
        txt_f = model.encode_text(text_ids)
        outputs = model(pixels, text_ids)  # HPSv2's img_score.py: model(image, text) with output_dict=True
        scores = outputs["image_features"] @ outputs["text_features"].T
        oc_pixels = torch.stack([tensors[f"openclip_pixels_{name}"] for name in IMAGES])
        scores_oc = model.encode_image(oc_pixels, normalize=True) @ outputs["text_features"].T
    tensors.update({
        "text_ids": text_ids, "image_features": img_f,
        "image_features_normalized": outputs["image_features"], "text_features": txt_f,
        "text_features_normalized": outputs["text_features"], "scores": scores,
        "scores_openclip_pixels": scores_oc, "logit_scale": model.logit_scale.detach().clone(),
    })
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference.safetensors"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, out / "HPS_tiny_openclip.pt")

    config = {
        "generated_by": "tools/hps_openclip_reference.py",
        "versions": {"open_clip_torch": open_clip.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "Pillow": PIL.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "seed": SEED,
        "model": "open_clip.model.CLIP(**model_cfg) (ViT vision tower, transformer text tower, nn.GELU)",
        "model_cfg": MODEL_CFG,
        "vision_heads": MODEL_CFG["vision_cfg"]["width"] // MODEL_CFG["vision_cfg"]["head_width"],
        "text_heads": MODEL_CFG["text_cfg"]["heads"],
        "vocab": VOCAB,
        "prompts": PROMPTS,
        "images": {name: {"file": f"images/{name}.png", "height": h, "width": w} for name, (h, w) in IMAGES.items()},
        "pixels_rows": [*[f"hpsv2_pixels_{n}" for n in IMAGES], "random_pixels[0]", "random_pixels[1]"],
        "hpsv2_pixels": "HPSv2 preprocess_val: ToTensor, ResizeMaxSize(size, fill=0) (torchvision bicubic resize of "
                        "the float tensor, antialias=True by default in torchvision >= 0.17), Normalize(OpenAI CLIP)",
        "openclip_pixels": f"open_clip.image_transform({size}, is_train=False, resize_mode='longest') on the PIL image",
        "scores": "image_features @ text_features.T of model(pixels, text_ids) with output_dict=True (cosine)",
        "scores_openclip_pixels": "the same cosine for the openclip_pixels_<name> inputs, images in config order",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
