"""Tiny random-weight Wan 2.1 / 2.2 text-to-video pipelines, built offline from the real diffusers / transformers
classes (``WanPipeline``: ``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel``), for tests and
smoke runs.

Like diffusers' own tiny Wan pipeline tests (huggingface/diffusers@62f3428 ``tests/pipelines/wan/test_wan_22.py``,
``test_wan.py``: a 2-layer transformer with 2 heads of 12), but the VAE downsamples by 2 in space and 2 in time (so a
video has ``2k + 1`` frames, where the published VAE's ``4k + 1``): 16x16 frames give 8x8x4 latents and 16 tokens per
latent frame. The tokenizer is the word-level one of the tiny world (no download); a saved pipeline
loads back with ``WanPipeline.from_pretrained`` and with ``load_adapter``.

Wan 2.2 is two transformers of the same shape and a ``boundary_ratio``: ``transformer`` (the high-noise expert)
serves timesteps ``t >= boundary_ratio * 1000``, ``transformer_2`` (low noise) the rest.
"""

from __future__ import annotations

import torch

from ..world import text as world_text

WAN_TEXT_WIDTH = 32
WAN_TOKENS = 16  # the tokenizer's model_max_length (the adapter's default max_sequence_length for these pipelines)
WAN_Z = 4  # latent channels
WAN_BOUNDARY = 0.6  # Wan 2.2's boundary_ratio here (the published A14B uses 0.875)


def _umt5_config():
    from transformers import UMT5Config

    ids = world_text.token_ids()
    return UMT5Config(vocab_size=len(world_text.vocabulary()), d_model=WAN_TEXT_WIDTH, d_kv=16,
                      d_ff=WAN_TEXT_WIDTH, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=ids["pad"], eos_token_id=ids["eos"], decoder_start_token_id=ids["pad"])


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=WAN_Z, out_channels=WAN_Z, text_dim=WAN_TEXT_WIDTH, freq_dim=32,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def tiny_wan_components(seed: int = 0, shift: float = 3.0, two_experts: bool = False,
                        boundary_ratio: float = WAN_BOUNDARY) -> dict:
    """The components of a tiny ``WanPipeline``: Wan 2.1 (one transformer) or, with ``two_experts``, Wan 2.2
    (``transformer`` + ``transformer_2`` with different random weights, and ``boundary_ratio``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=WAN_Z, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
                           scale_factor_temporal=2, scale_factor_spatial=2)
    parts = {
        "vae": vae,
        "text_encoder": UMT5EncoderModel(_umt5_config()),
        "tokenizer": world_text.build_tokenizer(WAN_TOKENS, add_bos=False),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift),
        "transformer": _transformer(),
        "transformer_2": None,
        "boundary_ratio": None,
    }
    if two_experts:
        parts.update(transformer_2=_transformer(), boundary_ratio=boundary_ratio)
    return parts


def tiny_wan_pipeline(seed: int = 0, shift: float = 3.0, two_experts: bool = False,
                      boundary_ratio: float = WAN_BOUNDARY):
    """A tiny ``WanPipeline`` (Wan 2.1 shape; Wan 2.2 with ``two_experts``)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(**tiny_wan_components(seed, shift, two_experts, boundary_ratio))
    pipe.set_progress_bar_config(disable=True)
    return pipe
