"""The tiny world's model shapes: real diffusers / transformers classes in small configurations.

The generator is a FLUX.1-dev-shaped stack (``FluxTransformer2DModel`` with a guidance embedding, ``AutoencoderKL``,
a CLIP text model for the pooled embedding and a T5 encoder for the token sequence). The VAE downsamples by 2, so a
32x32 image gives a 16x16x4 latent and, after FLUX's 2x2 packing, 64 image tokens of 16 channels.
The reward is a ``CLIPModel`` whose vision tower sees 4x4-pixel patches of the 32x32 image.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from . import dataset as ds
from . import text

LATENT_CHANNELS = 4
TEXT_WIDTH = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=16,
    sample_size=ds.RESOLUTION,
    mid_block_add_attention=False,
)

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=LATENT_CHANNELS * 4,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=TEXT_WIDTH,
    pooled_projection_dim=TEXT_WIDTH,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)

# Static shift 3 as in the official SRPO training scripts; FluxPipeline passes `mu`, which a static scheduler ignores.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def _ids() -> dict[str, int]:
    return text.token_ids()


def clip_text_config() -> CLIPTextConfig:
    ids = _ids()
    return CLIPTextConfig(
        vocab_size=len(text.vocabulary()),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=text.GENERATOR_MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


def t5_config() -> T5Config:
    ids = _ids()
    return T5Config(
        vocab_size=len(text.vocabulary()),
        d_model=TEXT_WIDTH,
        d_kv=16,
        d_ff=2 * TEXT_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        decoder_start_token_id=ids["pad"],
    )


def reward_config() -> CLIPConfig:
    ids = _ids()
    text_cfg = dict(
        vocab_size=len(text.vocabulary()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=text.REWARD_MAX_LENGTH,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    vision_cfg = dict(
        hidden_size=128,  # shape perception needed the width: at 64 wide / 3 layers held-out retrieval was 0.7
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=ds.RESOLUTION,
        patch_size=4,
    )
    return CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=64, logit_scale_init_value=2.6592)


def new_generator_components() -> dict:
    """Freshly initialised components (use torch.manual_seed before calling for reproducibility)."""
    return dict(
        vae=AutoencoderKL(**VAE_CONFIG),
        transformer=FluxTransformer2DModel(**TRANSFORMER_CONFIG),
        text_encoder=CLIPTextModel(clip_text_config()),
        text_encoder_2=T5EncoderModel(t5_config()),
        tokenizer=text.build_tokenizer(text.GENERATOR_MAX_LENGTH, add_bos=True),
        tokenizer_2=text.build_tokenizer(text.GENERATOR_MAX_LENGTH, add_bos=False),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def new_reward() -> tuple[CLIPModel, object]:
    return CLIPModel(reward_config()), text.build_tokenizer(text.REWARD_MAX_LENGTH, add_bos=True)
