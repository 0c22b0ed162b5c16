"""Tiny random-weight FLUX.2 pipelines (``Flux2Pipeline``: FLUX.2-dev; ``Flux2KleinPipeline``: FLUX.2-klein), built
offline from the real diffusers / transformers classes, for tests and smoke runs.

Shapes follow the published models at toy width: ``Flux2Transformer2DModel`` with double- and single-stream blocks
(guidance embedding for dev, none for klein), ``AutoencoderKLFlux2`` (factor 2 here, 4 latent channels, 2x2 patchified
to 16 and normalised by its batch-norm running statistics, set here to non-trivial values), a Mistral3 text encoder
(dev) or a Qwen3 causal LM (klein). The text encoders have as many layers as the pipelines'
default ``text_encoder_out_layers`` need ((10, 20, 30) and (9, 18, 27)), so the adapters run with the pipelines'
defaults. Schedulers are dynamic-shift (``use_dynamic_shifting``, exponential time shift) as the published ones.

Tokenizers are word-level ``PreTrainedTokenizerFast`` objects over the tiny world's words plus the chat-template
special tokens, with small Jinja chat templates written for this module that render the same message structure as the
real ones (system + user for Mistral, user + empty thinking block for Qwen3). They save and load with
``save_pretrained``.
"""

from __future__ import annotations

import torch

from ..world import text as world_text

TEXT_WIDTH = 16
JOINT_DIM = 3 * TEXT_WIDTH  # the pipelines stack three hidden-state layers along the channels
DEV_TOKENS = 48  # > the system message (about 30 word tokens) + a prompt: the pipeline truncates on the right
KLEIN_TOKENS = 32

MISTRAL_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
                   "[/SYSTEM_PROMPT]", "[INST]", "[/INST]")
QWEN3_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>")

# Minimal templates for the message lists the pipelines pass (Flux2Pipeline: content as a list of text parts;
# Flux2KleinPipeline: content as a string, add_generation_prompt=True, enable_thinking=False).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT] {{ text }} [/SYSTEM_PROMPT]"
    "{% else %}[INST] {{ text }} [/INST]{% endif %}{% endfor %}")
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% if enable_thinking is defined and not enable_thinking %}"
    "<think> </think> {% endif %}{% endif %}")


def _word_tokenizer(special: tuple[str, ...], pad: str, unk: str, max_length: int, template: str, **tokens):
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*special]
    for w in world_text.vocabulary()[len(world_text.SPECIAL):]:
        if w not in words:
            words.append(w)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, model_max_length=max_length,
                                  **tokens)
    out.chat_template = template
    return out


def mistral_tokenizer(max_length: int = 512):
    """A word-level Mistral-style tokenizer with a chat template. The published pipeline tokenizes with a Pixtral
    processor, whose text-only ``apply_chat_template`` renders the template and tokenizes exactly as a tokenizer does;
    the processor class itself needs torchvision, which this project does not depend on."""
    return _word_tokenizer(MISTRAL_SPECIAL, "<pad>", "<unk>", max_length, MISTRAL_TEMPLATE, bos_token="<s>",
                           eos_token="</s>")


def qwen3_tokenizer(max_length: int = 512):
    """A word-level stand-in for the Qwen3 tokenizer ``Flux2KleinPipeline`` uses, with a Qwen3-shaped chat template."""
    return _word_tokenizer(QWEN3_SPECIAL, "<|endoftext|>", "<unk>", max_length, QWEN3_TEMPLATE,
                           eos_token="<|im_end|>")


def _text_config(vocab_size: int, layers: int, pad: int) -> dict:
    return {"vocab_size": vocab_size, "hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": TEXT_WIDTH // 2, "max_position_embeddings": 256, "pad_token_id": pad}


def mistral3_text_encoder(tok):
    """Mistral3ForConditionalGeneration (Pixtral vision tower unused for text) with 31 text layers."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(_text_config(len(tok), 31, tok.pad_token_id), model_type="mistral", sliding_window=None,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = Mistral3Config(
        text_config=text,
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 16, "image_size": 16, "patch_size": 4, "num_channels": 3, "head_dim": 8},
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1, vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(config)


def qwen3_text_encoder(tokenizer):
    """Qwen3ForCausalLM with 28 layers (Flux2KleinPipeline reads hidden states 9, 18 and 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**_text_config(len(tokenizer), 28, tokenizer.pad_token_id),
                         eos_token_id=tokenizer.eos_token_id)
    return Qwen3ForCausalLM(config)


def _vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                             layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                             use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():  # the published VAE ships fitted statistics; zeros and ones would hide a normalisation bug
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae.eval()


def _transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def tiny_flux2_pipeline(seed: int = 0):
    """FLUX.2-dev-shaped ``Flux2Pipeline``: 16x16 images -> 8x8x4 latents -> 16 packed tokens of 16 channels."""
    from diffusers import Flux2Pipeline

    torch.manual_seed(seed)
    tokenizer = mistral_tokenizer()
    pipe = Flux2Pipeline(scheduler=_scheduler(), vae=_vae(), text_encoder=mistral3_text_encoder(tokenizer),
                         tokenizer=tokenizer, transformer=_transformer(guidance_embeds=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """FLUX.2-klein-base-shaped ``Flux2KleinPipeline`` (no guidance embedding, true CFG unless ``is_distilled``)."""
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = qwen3_tokenizer()
    pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=_vae(), text_encoder=qwen3_text_encoder(tokenizer),
                              tokenizer=tokenizer, transformer=_transformer(guidance_embeds=False),
                              is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe
