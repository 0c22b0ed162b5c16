"""A tiny random-weight Z-Image pipeline built offline from the real diffusers / transformers classes.

``ZImagePipeline`` (diffusers 0.42) wires a ``ZImageTransformer2DModel`` (single-stream DiT with noise / context
refiners), a FLUX-style 16-channel ``AutoencoderKL`` (here 4 channels, factor 2), a ``Qwen3Model`` text encoder
(the pipeline reads its second-to-last hidden state) and a Qwen2 tokenizer whose chat template wraps each prompt
(``apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)``). The published checkpoint is
``Tongyi-MAI/Z-Image`` (model_index.json: Qwen3Model + Qwen2Tokenizer + AutoencoderKL + FlowMatchEulerDiscreteScheduler
with ``shift`` 6.0 and no dynamic shifting).

The tokenizer here is the word-level Qwen stand-in of :func:`directalign.adapters.tiny.qwen_tokenizer` with a
ChatML template of the same shape as Qwen3's (``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``;
with ``enable_thinking`` false Qwen3 appends an empty think block, which the pipeline never asks for). It saves to
``tokenizer.json`` plus the chat template, so ``save_pretrained`` gives a directory ``load_adapter`` can load.
"""

from __future__ import annotations

import torch

from .tiny import qwen_tokenizer, qwen_vocabulary

Z_IMAGE_TEXT_WIDTH = 32
Z_IMAGE_CHANNELS = 4
# ChatML as Qwen3's template renders a single user turn plus the generation prompt (written for this word-level
# tokenizer: "\n" is one of its special tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def z_image_tokenizer(max_length: int = 1024):
    """The word-level Qwen tokenizer with a Qwen3-shaped chat template."""
    tok = qwen_tokenizer(max_length)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def z_image_text_encoder():
    """A 2-layer ``Qwen3Model`` (grouped-query attention like Qwen3-4B: 2 query heads, 1 key/value head)."""
    from transformers import Qwen3Config, Qwen3Model

    vocab = qwen_vocabulary()
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=Z_IMAGE_TEXT_WIDTH, intermediate_size=2 * Z_IMAGE_TEXT_WIDTH,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=vocab.index("<|im_start|>"), eos_token_id=vocab.index("<|im_end|>"),
                         pad_token_id=vocab.index("<|endoftext|>"))
    return Qwen3Model(config)


def tiny_z_image_components(seed: int = 0, shift: float = 6.0) -> dict:
    """Z-Image-shaped: a 2-layer ZImageTransformer2DModel with one noise and one context refiner block (width 32,
    2 heads, RoPE axes 4 + 6 + 6), a 4-channel AutoencoderKL (factor 2, scaling / shift factors like the real
    VAE's), a 2-layer Qwen3 text encoder. 16x16 images -> 4x8x8 latents -> 16 image tokens."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=[2], all_f_patch_size=[1], in_channels=Z_IMAGE_CHANNELS, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=Z_IMAGE_TEXT_WIDTH, axes_dims=[4, 6, 6],
        axes_lens=[256, 32, 32])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=Z_IMAGE_CHANNELS, norm_num_groups=8, sample_size=32,
                        mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    return {"scheduler": FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False), "vae": vae,
            "text_encoder": z_image_text_encoder(), "tokenizer": z_image_tokenizer(), "transformer": transformer}


def tiny_z_image_pipeline(seed: int = 0, shift: float = 6.0):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(**tiny_z_image_components(seed, shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe
