"""Tiny random-weight pipelines of every supported family, built offline from the real diffusers / transformers
classes (the way diffusers tests its pipelines), for tests and smoke runs.

Tokenizers are word-level ``PreTrainedTokenizerFast`` objects built from a fixed vocabulary (the tiny world's
caption words plus the Qwen-Image prompt template), so nothing is downloaded. They save to and load from
``tokenizer.json``; ``save_pretrained`` on a pipeline gives a directory ``load_adapter`` can load.
"""

from __future__ import annotations

import torch

from ..world import text as world_text

# -------------------------------------------------------------------------------------------- Stable Diffusion 3
SD3_CLIP_WIDTH = 32
SD3_T5_WIDTH = 64  # >= 2 * SD3_CLIP_WIDTH: the pipeline pads the concatenated CLIP embeddings to the T5 width
SD3_TOKENS = 16


def _clip_text_config(hidden: int):
    from transformers import CLIPTextConfig

    ids = world_text.token_ids()
    return CLIPTextConfig(vocab_size=len(world_text.vocabulary()), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=SD3_TOKENS,
                          projection_dim=hidden, hidden_act="gelu", bos_token_id=ids["bos"],
                          eos_token_id=ids["eos"], pad_token_id=ids["pad"])


def _t5_config(width: int):
    from transformers import T5Config

    ids = world_text.token_ids()
    return T5Config(vocab_size=len(world_text.vocabulary()), d_model=width, d_kv=16, d_ff=width, num_layers=1,
                    num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=ids["pad"],
                    eos_token_id=ids["eos"], decoder_start_token_id=ids["pad"])


def tiny_sd3_components(seed: int = 0, shift: float = 3.0) -> dict:
    """An SD3.5-medium-shaped stack: MMDiT with RMS qk-norm and one dual-attention layer, a 16-channel VAE
    (factor 2), two CLIP text encoders with projection and a T5 encoder. 32x32 images -> 16x16x16 latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=SD3_T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=2 * SD3_CLIP_WIDTH, pos_embed_max_size=16, qk_norm="rms_norm",
        dual_attention_layers=(0,))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035)
    return dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(SD3_CLIP_WIDTH)),
        tokenizer=world_text.build_tokenizer(SD3_TOKENS, add_bos=True),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(SD3_CLIP_WIDTH)),
        tokenizer_2=world_text.build_tokenizer(SD3_TOKENS, add_bos=True),
        text_encoder_3=T5EncoderModel(_t5_config(SD3_T5_WIDTH)),
        tokenizer_3=world_text.build_tokenizer(SD3_TOKENS, add_bos=False),
    )


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------- Qwen-Image
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "\n")
QWEN_UNK = "<unk>"
# Words of QwenImagePipeline.prompt_template_encode: with "\n" as a token its system prefix is 34 tokens, the
# pipeline's prompt_template_encode_start_idx, exactly as with the real Qwen2 tokenizer.
QWEN_TEMPLATE_WORDS = ("system", "describe", "the", "image", "by", "detailing", "color", ",", "shape", "size",
                       "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and",
                       "background", ":", "user", "assistant", ".")
QWEN_TEXT_WIDTH = 32


def qwen_vocabulary() -> list[str]:
    vocab = [*QWEN_SPECIAL, QWEN_UNK]
    for w in (*QWEN_TEMPLATE_WORDS, *world_text.vocabulary()[len(world_text.SPECIAL):]):
        if w not in vocab:
            vocab.append(w)
    return vocab


def qwen_tokenizer(max_length: int = 1024):
    """A word-level stand-in for Qwen2Tokenizer: chat-template special tokens, newline as a token, lower-cased."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(qwen_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=QWEN_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in QWEN_SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=QWEN_UNK, model_max_length=max_length)


def qwen_text_encoder_config():
    from transformers import Qwen2_5_VLConfig

    vocab = qwen_vocabulary()
    n = len(vocab)
    head_dim = QWEN_TEXT_WIDTH // 2
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n + 4, hidden_size=QWEN_TEXT_WIDTH, intermediate_size=2 * QWEN_TEXT_WIDTH,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
                         bos_token_id=vocab.index("<|im_start|>"), eos_token_id=vocab.index("<|im_end|>"),
                         pad_token_id=vocab.index("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                           out_hidden_size=QWEN_TEXT_WIDTH, fullatt_block_indexes=[0], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=28),
        vision_start_token_id=n, vision_end_token_id=n + 1, image_token_id=n + 2, video_token_id=n + 3)


def tiny_qwen_image_components(seed: int = 0, shift: float = 1.0) -> dict:
    """Qwen-Image-shaped: QwenImageTransformer2DModel, AutoencoderKLQwenImage (z_dim 4, factor 2, per-channel
    latent mean / std), a 2-layer Qwen2.5-VL text encoder. 16x16 images -> 8x8x4 latents -> 16 packed tokens."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    z = 4
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=z, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z, out_channels=z, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=QWEN_TEXT_WIDTH, axes_dims_rope=(8, 4, 4))
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(qwen_text_encoder_config()),
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
    )


def tiny_qwen_image_pipeline(seed: int = 0, shift: float = 1.0):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**tiny_qwen_image_components(seed, shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe
