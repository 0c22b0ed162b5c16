"""Qwen-Image-Edit adapters (``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``): an edit is a prompt plus a
source image.

Prompts stay strings everywhere (methods, evaluation, the prompt sampler); the adapter holds a map prompt -> source
image, set with :meth:`QwenImageEditAdapter.set_source_images` (training and evaluation fill it from the prompt
manifests, see :mod:`directalign.source_images`). ``encode_prompts`` returns :class:`EditEmbeds`, which carry per
prompt the two conditionings ``QwenImageEditPipeline.__call__`` builds (diffusers 0.42.1,
src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py):

* the Qwen2.5-VL encoding of the edit template with the source image in it (``pipe.encode_prompt(prompt, image)``,
  the pipeline's own template, processor and drop index), cached per (prompt, image);
* the source image's VAE latents, normalised with the VAE's ``latents_mean`` / ``latents_std`` (posterior mode, as
  ``_encode_vae_image``) and packed 2x2, cached per image.

``velocity`` appends the source tokens to the noisy latent tokens, passes both grids in ``img_shapes`` and keeps the
first ``N`` output tokens, exactly as the pipeline's denoising loop; true CFG (``guidance > 1``) encodes
``negative_prompt`` with the same source image and rescales ``v_cfg`` to the norm of ``v_cond``. So every method
(SRPO, Direct-Align, ReFL, DRaFT, AlignProp, GRPO) runs on edits unchanged.

Sizes follow the pipelines: the source image is resized to a ``condition_area`` (1024 x 1024) at its own aspect
ratio, each side rounded to 32 (:func:`condition_size`, the pipelines' ``calculate_dimensions``); the generated
image has ``model.height x model.width``. ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 / 2511) shows the
Qwen2.5-VL encoder a 384 x 384-area copy and the VAE a 1024 x 1024-area copy of the original, with "Picture 1: " in
the template (pipeline_qwenimage_edit_plus.py ``CONDITION_IMAGE_SIZE`` / ``VAE_IMAGE_SIZE``); one source image per
prompt here (the Plus pipeline's multi-image input is not supported).

A batch may mix source images of different aspect ratios (different token counts): ``velocity`` then runs one
transformer call per condition shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from ..source_images import SourceImageError
from .base import model_identity
from .qwen_image import MaskedPromptEmbeds, QwenImageAdapter


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor. transformers 5 cannot build a ``Qwen2VLProcessor`` when
    torchvision is absent (its video processor class needs torchvision); images only need the image processor
    (the PIL backend) and the tokenizer, so the edit adapters build this one from the model's ``processor/``."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def image_only_processor(path, **kwargs) -> ImageOnlyQwen2VLProcessor:
    """The processor of a Qwen-Image-Edit directory or hub id (its ``processor/`` subfolder; the tokenizer from
    ``tokenizer/`` when ``processor/`` has none)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    local = Path(path).expanduser()
    if local.is_dir() and not (local / "processor").is_dir():
        raise ValueError(f"{local} is missing what an edit pipeline needs: processor (the Qwen2-VL processor "
                         "folder); re-save the model with save_pretrained")
    image_processor = AutoImageProcessor.from_pretrained(path, subfolder="processor", **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="processor", **kwargs)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kwargs)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def condition_size(width: int, height: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of the condition image: ``area`` pixels at the source's aspect ratio, each side rounded to
    ``multiple`` (``calculate_dimensions`` of pipeline_qwenimage_edit.py / _plus.py, diffusers 0.42.1)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(w / multiple) * multiple, round(h / multiple) * multiple


@dataclass
class SourceCondition:
    """One source image as the pipeline conditions on it."""

    latents: torch.Tensor  # (1, N, 4C) packed, normalised VAE latents
    grid: tuple[int, int]  # (h / 2, w / 2): its ``img_shapes`` entry


@dataclass
class EditEmbeds:
    """A batch of edit conditionings: text+image tokens (with padding mask), per row the source image key, its packed
    latents (1, N_i, 4C) and their grid."""

    text: MaskedPromptEmbeds
    keys: list[str]
    latents: list[torch.Tensor]
    grids: list[tuple[int, int]]

    def _rows(self, index) -> list[int]:
        return torch.arange(len(self.keys))[index].reshape(-1).tolist()

    def __getitem__(self, index) -> EditEmbeds:
        rows = self._rows(index)
        text = self.text[torch.tensor(rows, device=self.text.tokens.device)]
        return EditEmbeds(text, [self.keys[i] for i in rows], [self.latents[i] for i in rows],
                          [self.grids[i] for i in rows])

    @staticmethod
    def cat(items: list[EditEmbeds]) -> EditEmbeds:
        return EditEmbeds(MaskedPromptEmbeds.cat([e.text for e in items]), [k for e in items for k in e.keys],
                          [z for e in items for z in e.latents], [g for e in items for g in e.grids])

    def to(self, *args, **kwargs) -> EditEmbeds:
        return EditEmbeds(self.text.to(*args, **kwargs), list(self.keys),
                          [z.to(*args, **kwargs) for z in self.latents], list(self.grids))


def _open_rgb(path):
    from PIL import Image, ImageOps

    from ..data import to_srgb

    with Image.open(path) as im:
        return to_srgb(ImageOps.exif_transpose(im), path).convert("RGB")


class QwenImageEditAdapter(QwenImageAdapter):
    family = "qwen-image-edit"
    pipeline_class = "QwenImageEditPipeline"
    needs_source_images = True
    fsdp_block_names = ("transformer_blocks",)  # QwenImageTransformer2DModel's only block list
    condition_area = 1024 * 1024  # the VAE copy of the source (and, for Edit, the VL copy)
    vl_area: int | None = None  # Plus: the Qwen2.5-VL copy's own area
    vae_from_original = False  # Edit encodes the resized copy; Plus preprocesses the original to the VAE size

    def __init__(self, pipe, max_sequence_length: int | None = None, negative_prompt: str = " "):
        super().__init__(pipe, max_sequence_length, negative_prompt)
        self._source_of: dict[str, str] = {}  # prompt -> image key
        self._images: dict[str, object] = {}  # image key -> path or PIL image
        self._conditions: dict[str, SourceCondition] = {}
        self._edit_text: dict[tuple[str, str], MaskedPromptEmbeds] = {}
        self._load = _open_rgb

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        max_sequence_length: int | None = None, **kwargs):
        from transformers.utils import is_torchvision_available

        if "processor" not in kwargs and not is_torchvision_available():
            kwargs["processor"] = image_only_processor(path)
        return super().from_pretrained(path, dtype=dtype, device=device, max_sequence_length=max_sequence_length,
                                       **kwargs)

    # ---------------------------------------------------------------------------------------------- sources
    def set_source_images(self, sources: dict, load=None) -> None:
        """``{prompt: image path or PIL image}``: the image each prompt edits (added to those already set).
        ``load(path) -> PIL RGB image`` reads paths (default: Pillow, EXIF orientation applied)."""
        if load is not None:
            self._load = load
        for prompt, image in sources.items():
            key = str(Path(image)) if isinstance(image, (str, Path)) else f"<image {id(image)}>"
            self._images[key] = image
            self._source_of[prompt] = key

    def source_key(self, prompt: str) -> str:
        key = self._source_of.get(prompt)
        if key is None:
            raise SourceImageError(f"prompt {prompt!r} has no source image; {self.family} edits an image: give the "
                                   "prompts as a .jsonl or .csv manifest with 'prompt' and 'image' columns")
        return key

    def _source(self, key: str):
        image = self._images[key]
        return self._load(image) if isinstance(image, (str, Path)) else image

    def _vl_image(self, key: str):
        """The copy of the source the Qwen2.5-VL encoder sees (rebuilt when needed: only text encoding uses it)."""
        image = self._source(key)
        area = self.condition_area if self.vl_area is None else self.vl_area
        w, h = condition_size(*image.size, area)
        return self.pipe.image_processor.resize(image, h, w)

    def _condition(self, key: str) -> SourceCondition:
        """The source's packed VAE latents, cached per image on the CPU (a 1024 x 1024 source is 4096 tokens)."""
        cond = self._conditions.get(key)
        if cond is not None:
            return cond
        image = self._source(key)
        proc = self.pipe.image_processor
        w, h = condition_size(*image.size, self.condition_area)
        pixels = proc.preprocess(image if self.vae_from_original else proc.resize(image, h, w), h, w).unsqueeze(2)
        z = self.pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype), generator=None)
        _, c, _, zh, zw = z.shape
        packed = self.pipe._pack_latents(z, 1, c, zh, zw).to(self.dtype).cpu()
        cond = SourceCondition(packed, (zh // 2, zw // 2))
        self._conditions[key] = cond
        return cond

    # ---------------------------------------------------------------------------------------------- text
    def set_prompt_embeds(self, embeds: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{self.family}: the text encoder sees the source image, so prompt embeddings are "
                                  "computed per (prompt, image); set_prompt_embeds is not supported")

    def _text(self, prompt: str, key: str) -> MaskedPromptEmbeds:
        cached = self._edit_text.get((prompt, key))
        if cached is not None:
            return cached
        if self.pipe.text_encoder is None:
            raise RuntimeError(f"no text encoder loaded to encode {prompt!r} with its source image")
        with torch.no_grad():
            tokens, mask = self.pipe.encode_prompt(prompt=[prompt], image=self._vl_image(key),
                                                   device=self.device, max_sequence_length=self.max_sequence_length)
        n = int(mask[0].sum()) if mask is not None else tokens.shape[1]
        t = tokens[:, :n].cpu()  # cached on the CPU: with the image's vision tokens, thousands of tokens each
        out = MaskedPromptEmbeds(t, torch.ones((1, n), dtype=torch.long))
        self._edit_text[(prompt, key)] = out
        return out

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> EditEmbeds:
        """Per prompt: the Qwen2.5-VL encoding of prompt + source image and the source's packed VAE latents."""
        keys = [self.source_key(p) for p in prompts]
        conds = [self._condition(k) for k in keys]
        text = MaskedPromptEmbeds.cat([self._text(p, k) for p, k in zip(prompts, keys)]).to(self.device)
        return EditEmbeds(text, keys, [c.latents.to(self.device) for c in conds], [c.grid for c in conds])

    # ---------------------------------------------------------------------------------------------- model
    def _edit_forward(self, x, sigma, text: MaskedPromptEmbeds, embeds: EditEmbeds, height: int, width: int):
        """The transformer on [noisy tokens, source tokens], output cut to the noisy tokens; one call per condition
        shape in the batch."""
        b = x.shape[0]
        h, w = self.latent_hw(height, width)
        sig = sigma.to(x.dtype).expand(b)
        groups: dict[tuple, list[int]] = {}
        for i, (z, grid) in enumerate(zip(embeds.latents, embeds.grids)):
            groups.setdefault((grid, z.shape[1]), []).append(i)
        parts, order = [], []
        for (grid, _), rows in groups.items():
            idx = None if len(groups) == 1 else torch.tensor(rows, device=x.device)
            xs, ss = (x, sig) if idx is None else (x[idx], sig[idx])
            ts = text if idx is None else text[idx.to(text.tokens.device)]
            mask = ts.mask.to(x.device)
            source = torch.cat([embeds.latents[i] for i in rows]).to(x.device, x.dtype)
            out = self.transformer(
                hidden_states=torch.cat([xs, source], dim=1),
                timestep=ss,
                guidance=None,
                encoder_hidden_states=ts.tokens.to(x.device, x.dtype),
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                img_shapes=[[(1, h // 2, w // 2), (1, *grid)]] * len(rows),
                return_dict=False,
            )[0]
            parts.append(out[:, : x.shape[1]])
            order += rows
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts)[torch.tensor(order, device=x.device).argsort()]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: EditEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        v = self._edit_forward(x, sigma, embeds.text, embeds, height, width)
        if guidance is None or guidance <= 1.0:
            return v
        neg = MaskedPromptEmbeds.cat([self._text(self.negative_prompt, k) for k in embeds.keys]).to(x.device)
        v_neg = self._edit_forward(x, sigma, neg, embeds, height, width)
        comb = v_neg + guidance * (v - v_neg)
        return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def identity(self) -> dict:
        return model_identity(self.family, self.transformer, max_sequence_length=self.max_sequence_length,
                              condition_area=self.condition_area, vl_area=self.vl_area)


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509 / 2511 (``QwenImageEditPlusPipeline``), one source image per prompt."""

    family = "qwen-image-edit-plus"
    pipeline_class = "QwenImageEditPlusPipeline"
    vl_area = 384 * 384  # CONDITION_IMAGE_SIZE
    vae_from_original = True
