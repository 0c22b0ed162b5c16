"""One call of each model part with the shapes a training step uses, for meta-device FLOP and memory accounting.

* :data:`TRANSFORMER_PROBES` maps a transformer class (its config's ``_class_name``) to a function building the
  forward's inputs exactly as the family's adapter does (``adapters/flux.py``, ``sd3.py``, ``qwen_image.py``,
  ``flux2.py``, ``z_image.py``, ``wan.py``), so a
  new family whose transformer reuses a known class (Qwen-Image-Edit, FLUX.1 variants) needs nothing here; a new
  class needs one probe.
* :data:`FAMILY_PROBES` holds the families whose adapter calls a known class with other inputs (Qwen-Image-Edit
  appends the source image's tokens).
* :func:`decode` runs the VAE decoder as the adapters do (``AutoencoderKL``: 4-D latents; the causal video VAEs of
  Qwen-Image / Wan, whose config has ``temperal_downsample``: 5-D latents, one frame for an image, every latent
  frame of a video, as ``WanAdapter.decode`` decodes the whole clip; a video's frames come back flattened to
  (rows * frames, 3, H, W), the batch the video reward scores: ``rewards/video.flatten_frames``).
* :func:`reward_forward` runs a CLIP-architecture reward's image side as :mod:`directalign.rewards.clip` does
  (resize to the vision tower's size, normalise, project, cosine against a cached text embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shapes:
    """Sizes of one transformer call: ``rows`` images of ``height`` x ``width`` with ``text_tokens`` text tokens;
    ``latent_hw`` is the VAE latent's size (H / VAE factor); ``frames`` the latent frames of a video model (Wan:
    ``(frames - 1) / temporal factor + 1``; 1 for images)."""

    rows: int
    height: int
    width: int
    latent_hw: tuple[int, int]
    text_tokens: int
    frames: int = 1


def _full(shape, like: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    return torch.full(shape, value, device=like.device, dtype=like.dtype)


def _flux(transformer, s: Shapes, dtype: torch.dtype, device) -> torch.Tensor:
    c = transformer.config
    h, w = s.latent_hw
    tokens = (h // 2) * (w // 2)
    x = torch.zeros(s.rows, tokens, c.in_channels, device=device, dtype=dtype)
    g = torch.ones(s.rows, device=device) if c.guidance_embeds else None
    return transformer(hidden_states=x, timestep=_full((s.rows,), x, 0.5), guidance=g,
                       pooled_projections=_full((s.rows, c.pooled_projection_dim), x),
                       encoder_hidden_states=_full((s.rows, s.text_tokens, c.joint_attention_dim), x),
                       txt_ids=_full((s.text_tokens, 3), x), img_ids=_full((tokens, 3), x), return_dict=False)[0]


def _sd3(transformer, s: Shapes, dtype: torch.dtype, device) -> torch.Tensor:
    c = transformer.config
    h, w = s.latent_hw
    x = torch.zeros(s.rows, c.in_channels, h, w, device=device, dtype=dtype)
    return transformer(hidden_states=x, timestep=_full((s.rows,), x, 500.0),
                       encoder_hidden_states=_full((s.rows, s.text_tokens, c.joint_attention_dim), x),
                       pooled_projections=_full((s.rows, c.pooled_projection_dim), x), return_dict=False)[0]


def _qwen_image(transformer, s: Shapes, dtype: torch.dtype, device) -> torch.Tensor:
    c = transformer.config
    h, w = s.latent_hw
    x = torch.zeros(s.rows, (h // 2) * (w // 2), c.in_channels, device=device, dtype=dtype)
    return transformer(hidden_states=x, timestep=_full((s.rows,), x, 0.5), guidance=None,
                       encoder_hidden_states=_full((s.rows, s.text_tokens, c.joint_attention_dim), x),
                       encoder_hidden_states_mask=None, img_shapes=[[(1, h // 2, w // 2)]] * s.rows,
                       return_dict=False)[0]


def _qwen_image_edit(transformer, s: Shapes, dtype: torch.dtype, device, condition_area: int = 1024 * 1024):
    """QwenImageEditAdapter._edit_forward: the noisy tokens followed by the source image's tokens (the source resized
    to ``condition_area`` pixels at the output's aspect ratio, multiples of 32), output cut to the noisy tokens."""
    c = transformer.config
    h, w = s.latent_hw
    src_w = max(32, round((condition_area * w / h) ** 0.5 / 32) * 32)
    src_h = max(32, round(condition_area / src_w / 32) * 32)
    grid = (src_h // 16, src_w // 16)
    tokens = (h // 2) * (w // 2)
    x = torch.zeros(s.rows, tokens + grid[0] * grid[1], c.in_channels, device=device, dtype=dtype)
    out = transformer(hidden_states=x, timestep=_full((s.rows,), x, 0.5), guidance=None,
                      encoder_hidden_states=_full((s.rows, s.text_tokens, c.joint_attention_dim), x),
                      encoder_hidden_states_mask=None, img_shapes=[[(1, h // 2, w // 2), (1, *grid)]] * s.rows,
                      return_dict=False)[0]
    return out[:, :tokens]


def _flux2(transformer, s: Shapes, dtype: torch.dtype, device) -> torch.Tensor:
    """Flux2Adapter._forward: packed tokens (B, (h/2)(w/2), 4C), 4-axis position ids without a batch axis
    (``adapters/flux2.image_ids`` / ``text_ids``), the guidance scale only where the model embeds it (FLUX.2-dev;
    klein runs true CFG instead)."""
    c = transformer.config
    h, w = s.latent_hw
    tokens = (h // 2) * (w // 2)
    x = torch.zeros(s.rows, tokens, c.in_channels, device=device, dtype=dtype)
    g = torch.full((s.rows,), 4.0, device=device) if c.guidance_embeds else None
    return transformer(hidden_states=x, timestep=_full((s.rows,), x, 0.5), guidance=g,
                       encoder_hidden_states=_full((s.rows, s.text_tokens, c.joint_attention_dim), x),
                       txt_ids=torch.zeros(s.text_tokens, 4, device=device, dtype=torch.long),
                       img_ids=torch.zeros(tokens, 4, device=device, dtype=torch.long), return_dict=False)[0]


def _z_image(transformer, s: Shapes, dtype: torch.dtype, device) -> torch.Tensor:
    """ZImageAdapter._forward: one (C, 1, h, w) latent and one (tokens, cap_feat_dim) caption per row (lists),
    the outputs stacked back to (B, C, h, w). ``text_tokens`` is an upper bound here: the adapter drops the padding."""
    c = transformer.config
    h, w = s.latent_hw
    x = torch.zeros(s.rows, c.in_channels, 1, h, w, device=device, dtype=dtype)
    caps = [torch.zeros(s.text_tokens, c.cap_feat_dim, device=device, dtype=dtype) for _ in range(s.rows)]
    out = transformer(list(x.unbind(0)), _full((s.rows,), x, 0.5), caps, return_dict=False)[0]
    return torch.stack(list(out)).squeeze(2)


def _wan(transformer, s: Shapes, dtype: torch.dtype, device) -> torch.Tensor:
    """WanAdapter._forward: 5-D latents (B, C, frames, h, w) (the transformer patchifies them itself), timestep
    ``sigma * 1000``, UMT5 tokens. Returns every latent frame (B, C, frames, h, w): the graph decodes the whole clip
    and scores each frame."""
    c = transformer.config
    h, w = s.latent_hw
    x = torch.zeros(s.rows, c.in_channels, s.frames, h, w, device=device, dtype=dtype)
    out = transformer(hidden_states=x, timestep=_full((s.rows,), x, 500.0),
                      encoder_hidden_states=_full((s.rows, s.text_tokens, c.text_dim), x), return_dict=False)[0]
    return out


# A family whose adapter calls a known transformer class differently (model.family -> probe): checked first.
FAMILY_PROBES = {"qwen-image-edit": _qwen_image_edit, "qwen-image-edit-plus": _qwen_image_edit}

TRANSFORMER_PROBES = {
    "FluxTransformer2DModel": _flux,
    "SD3Transformer2DModel": _sd3,
    "QwenImageTransformer2DModel": _qwen_image,
    "Flux2Transformer2DModel": _flux2,
    "ZImageTransformer2DModel": _z_image,
    "WanTransformer3DModel": _wan,
}


def latent_frames(frames: int, vae_config: dict) -> int:
    """Latent frames of ``frames`` video frames for a causal video VAE (``temperal_downsample``: the temporal
    factor is 2 per True level, 4 for Wan's ``[False, True, True]``); 1 for image VAEs or ``frames <= 1``."""
    levels = vae_config.get("temperal_downsample") or []
    factor = 2 ** sum(bool(v) for v in levels)
    return 1 if frames <= 1 or not levels else (frames - 1) // factor + 1


def text_tokens(family: str, max_sequence_length: int, tokenizer_lengths: dict[str, int]) -> int:
    """Text tokens of one transformer call, as the family's adapter builds them (``tokenizer_lengths``: the
    ``model_max_length`` of each tokenizer folder the model directory has).

    flux: T5 tokens padded to ``max_sequence_length`` (0: the T5 tokenizer's length, capped at 512);
    sd3: the CLIP tokenizer's length (77) plus T5 padded to ``max_sequence_length`` (0: 256, the pipeline's default);
    qwen-image and others: ``max_sequence_length`` (0: 512), an upper bound (the pipeline drops the padding, and a
    typical prompt has well under 100 tokens)."""
    if family == "flux":
        return max_sequence_length or min(512, tokenizer_lengths.get("tokenizer_2", 512))
    if family == "sd3":
        return tokenizer_lengths.get("tokenizer", 77) + (max_sequence_length or 256)
    return max_sequence_length or 512


def is_video_vae(vae_config: dict) -> bool:
    return "temperal_downsample" in vae_config


def latent_channels(vae_config: dict) -> int:
    return int(vae_config.get("latent_channels") or vae_config.get("z_dim") or 16)


def decode(vae, latents_hw: tuple[int, int], rows: int, dtype: torch.dtype, device, checkpointed: bool = False,
           latents: torch.Tensor | None = None, frames: int = 1) -> torch.Tensor:
    """Images (rows, 3, H, W) from the VAE decoder, as the adapters call it (differentiable in ``latents``); for
    5-D latents (rows, C, frames, h, w) of a video VAE (or ``frames > 1``), every decoded frame, flattened to
    (rows * video frames, 3, H, W)."""
    cfg = dict(vae.config)
    h, w = latents_hw
    video = is_video_vae(cfg)
    if latents is None:
        shape = (rows, latent_channels(cfg), frames, h, w) if video and frames > 1 else (rows, latent_channels(cfg),
                                                                                         h, w)
        latents = torch.zeros(shape, device=device, dtype=dtype)

    def run(z):
        if video and z.dim() == 5:  # WanAdapter.decode: the whole clip, (B, 3, F, H, W) -> (B * F, 3, H, W)
            out = vae.decode(z, return_dict=False)[0]
            return out.permute(0, 2, 1, 3, 4).reshape(-1, *out.shape[1:2], *out.shape[3:])
        if video:
            return vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0]
        return vae.decode(z, return_dict=False)[0]

    if checkpointed and not getattr(vae, "_supports_gradient_checkpointing", False):
        from torch.utils.checkpoint import checkpoint

        image = checkpoint(run, latents, use_reentrant=False)  # QwenImageAdapter.enable_vae_checkpointing
    else:
        image = run(latents)
    return (image / 2 + 0.5).clamp(0, 1)


def reward_forward(model, images: torch.Tensor) -> torch.Tensor:
    """A CLIP reward's score of ``images`` (B, 3, H, W) in [0, 1] against one cached text embedding."""
    vc = model.config.vision_config
    size = vc.image_size
    dtype = next(model.parameters()).dtype
    x = F.interpolate(images.to(dtype), size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.4815, 0.4578, 0.4082], device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758], device=x.device, dtype=dtype).view(1, 3, 1, 1)
    feats = model.get_image_features(pixel_values=(x - mean) / std)
    feats = getattr(feats, "pooler_output", feats)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    text = torch.zeros(1, feats.shape[-1], device=feats.device, dtype=feats.dtype)
    return (feats * text).sum(-1)
