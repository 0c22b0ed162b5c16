"""Aesthetic Predictor v2.5 (discus0434/aesthetic-predictor-v2-5): an MLP on SigLIP image embeddings, image-only
(``text_conditioned = False``; SRPO's relative forms do not apply, use ``reward.form=absolute``).

    score = MLP(f_img / |f_img|),   f_img = SigLIP so400m-patch14-384 pooled image embedding (1152-d)

``f_img`` is ``SiglipVisionModel``'s ``pooler_output``: the vision tower's multi-head attention pooling head over the
post-layernorm patch tokens (there is no projection in SigLIP's vision tower). It is L2-normalised before the head.

The head is the published ``aesthetic_predictor_v2_5.pth``: ``Linear(1152, 1024) - Dropout(0.5) - Linear(1024, 128) -
Dropout(0.5) - Linear(128, 64) - Dropout(0.5) - Linear(64, 16) - Dropout(0.2) - Linear(16, 1)``, no activations.
The file is a plain state dict (bfloat16 tensors, 2.6 MB) of the upstream head module, whose Sequential is named
``scoring_head``; this module keeps that name, so the key mapping is one to one:

    upstream file key                    here (:class:`AestheticV25Head`)    shape (SigLIP width d = 1152)
    ``scoring_head.0.{weight,bias}``     ``scoring_head.0`` Linear(d, 1024)   (1024, d), (1024,)
    ``scoring_head.2.{weight,bias}``     ``scoring_head.2`` Linear(1024, 128) (128, 1024), (128,)
    ``scoring_head.4.{weight,bias}``     ``scoring_head.4`` Linear(128, 64)   (64, 128), (64,)
    ``scoring_head.6.{weight,bias}``     ``scoring_head.6`` Linear(64, 16)    (16, 64), (16,)
    ``scoring_head.8.{weight,bias}``     ``scoring_head.8`` Linear(16, 1)     (1, 16), (1,)

(odd indices are the dropouts, inactive here: the reward is frozen in eval mode). The upstream model nests the head
under ``layers`` (``layers.scoring_head.*``) in its own module tree; that prefix is accepted and stripped. The file
is read with ``torch.load(weights_only=True)`` (no pickled code) or from a ``.safetensors`` with the same keys, and
converted to the reward's dtype. Scores are roughly 1-10; upstream calls 5.5+ a great aesthetic score.

The backbone is ``google/siglip-so400m-patch14-384`` (transformers format; a full ``SiglipModel`` checkpoint, of
which only the vision tower is loaded, or a ``SiglipVisionModel``). Preprocessing is that checkpoint's
``SiglipImageProcessor``: both sides resized to 384 (bicubic, aspect ratio not kept, no crop), rescaled by 1/255,
normalised with mean = std = 0.5 (:func:`directalign.rewards.preprocess.resize_square`).

Weights it expects: ``reward.path`` = the head (``aesthetic_predictor_v2_5.pth`` from the aesthetic-predictor-v2-5
repository's ``models/`` directory, or a ``.safetensors`` with the same keys), ``reward.siglip_backbone`` = the SigLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .loading import check_model_type
from .preprocess import SIGLIP_MEAN, SIGLIP_STD, published_preprocess

SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
LINEAR_INDICES = (0, 2, 4, 6, 8)
WIDTHS = (1024, 128, 64, 16, 1)  # output width of each Linear; the first takes the SigLIP width
HEAD_KEYS = tuple(f"scoring_head.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias"))
UPSTREAM_PREFIX = "layers."  # the head's place in the upstream model (AestheticPredictorV2_5Model.layers)
SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")


class AestheticV25Head(nn.Module):
    """The published head, layer for layer (keys ``scoring_head.0/2/4/6/8``)."""

    def __init__(self, input_size: int = 1152):
        super().__init__()
        self.input_size = input_size
        self.scoring_head = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.5),
            nn.Linear(1024, 128), nn.Dropout(0.5),
            nn.Linear(128, 64), nn.Dropout(0.5),
            nn.Linear(64, 16), nn.Dropout(0.2),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scoring_head(x)


def expected_shapes(input_size: int) -> dict[str, tuple[int, ...]]:
    shapes, width = {}, input_size
    for i, out in zip(LINEAR_INDICES, WIDTHS):
        shapes[f"scoring_head.{i}.weight"], shapes[f"scoring_head.{i}.bias"] = (out, width), (out,)
        width = out
    return shapes


def load_head(path: str | Path, input_size: int | None = None) -> AestheticV25Head:
    """The head from ``path``; ``input_size``: the backbone's width the head must take (None: read from the file).
    A missing file raises ``FileNotFoundError``; an unreadable one, other keys or other shapes ``ValueError``."""
    from .aesthetic import load_state_dict_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; reward.path must be the Aesthetic Predictor v2.5 head "
                                "(aesthetic_predictor_v2_5.pth)")
    sd = load_state_dict_file(path)  # WeightsFileError (one line) for pickled code, a corrupt or truncated file
    if sd and all(k.startswith(UPSTREAM_PREFIX) for k in sd):
        sd = {k[len(UPSTREAM_PREFIX):]: v for k, v in sd.items()}
    missing = [k for k in HEAD_KEYS if k not in sd]
    extra = sorted(set(sd) - set(HEAD_KEYS))
    if missing or extra:
        raise ValueError(f"{path} is not an Aesthetic Predictor v2.5 head: missing {missing[:2]}, unexpected "
                         f"{extra[:2]} (expected scoring_head.0/2/4/6/8 weights and biases)")
    width = input_size if input_size is not None else sd["scoring_head.0.weight"].shape[-1]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {shape})" for k, shape in expected_shapes(width).items()
             if tuple(sd[k].shape) != shape]
    if wrong:
        raise ValueError(f"{path} has Aesthetic Predictor v2.5 head weights of the wrong shape: {wrong[0]}"
                         + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else "")
                         + f"; the head must take the {width}-d SigLIP embedding")
    head = AestheticV25Head(width)
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    return head


def check_siglip_dir(path: str | Path) -> None:
    """For a local path: it exists and its config.json declares a SigLIP model (cheap, before any weights load)."""
    text = str(path)
    p = Path(text).expanduser()
    if not (text.startswith((".", "/", "~")) or p.exists()):
        return  # a hub id: checked after loading
    check_model_type(p, SIGLIP_MODEL_TYPES, f"a SigLIP model such as {SIGLIP_SO400M}")


class AestheticV25Reward(Reward):
    """``vision``: a ``SiglipVisionModel`` with its pooling head; ``head``: :class:`AestheticV25Head`."""

    text_conditioned = False

    def __init__(self, vision, head: AestheticV25Head, *, divisor: float = 1.0, image_size: int | None = None,
                 name: str = "aesthetic-v25", clamp_resized: bool = True):
        super().__init__()
        if not getattr(vision.config, "vision_use_head", True):
            raise ValueError("the SigLIP backbone has no attention pooling head (vision_use_head=False), so it has "
                             "no pooled embedding for the Aesthetic Predictor v2.5 head")
        if head.input_size != vision.config.hidden_size:
            raise ValueError(f"the Aesthetic Predictor v2.5 head takes {head.input_size}-d embeddings but the SigLIP "
                             f"backbone gives {vision.config.hidden_size}-d ones")
        self.vision = vision
        self.head = head
        self.divisor = divisor
        self.image_size = image_size or vision.config.image_size
        self.name = name
        self.clamp_resized = clamp_resized  # False: keep the resize's bicubic overshoot
        self.freeze()

    @classmethod
    def from_pretrained(cls, head_path: str | Path, siglip_path: str | Path = SIGLIP_SO400M, dtype=torch.float32,
                        **kwargs) -> "AestheticV25Reward":
        from transformers import SiglipVisionModel

        from .loading import hf_dtype, load_checked

        head = load_head(head_path).to(dtype)  # first: a bad head file fails before the large backbone loads
        check_siglip_dir(siglip_path)
        vision = load_checked(SiglipVisionModel, siglip_path, **hf_dtype(dtype))
        return cls(vision, head, **kwargs)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.head.parameters()).dtype
        return published_preprocess(images.to(dtype), self.image_size, "squash", SIGLIP_MEAN, SIGLIP_STD,
                                    clamp=self.clamp_resized)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values=self.pixel_values(images)).pooler_output
        return F.normalize(pooled, dim=-1)

    def score_texts(self, image_state: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The aesthetic score of each image (B,); the texts are ignored (image-only reward)."""
        return self.head(image_state).squeeze(-1) / self.divisor
