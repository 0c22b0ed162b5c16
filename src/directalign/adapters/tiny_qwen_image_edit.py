"""A tiny random-weight ``QwenImageEditPipeline`` (and ``QwenImageEditPlusPipeline``), built offline from the real
diffusers / transformers classes, for tests and smoke runs.

It reuses the tiny Qwen-Image stack of :mod:`directalign.adapters.tiny` (transformer, VAE, 2-layer Qwen2.5-VL whose
vision tower has 14-pixel patches merged 2x2) and adds what editing needs: a tokenizer that knows the vision tokens
(``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>`` at the ids the text encoder's config
gives them) and a Qwen2-VL processor whose image processor keeps the condition image small (784 to 3136 pixels, i.e.
one to four merged vision tokens).

The word-level tokenizer splits the edit template's system prompt into a different number of tokens than Qwen2's
BPE does; both the pipeline and the adapter drop the pipeline's own ``prompt_template_encode_start_idx`` tokens, so
they see the same sequence either way.

The pipelines size the condition image to a 1024 x 1024 area (``calculate_dimensions(1024 * 1024, ratio)``); with
the tiny VAE (factor 2) that would be 65,536 latent tokens, so tests shrink the area on both sides (the pipeline
module's ``calculate_dimensions`` and the adapter's ``condition_area``).
"""

from __future__ import annotations

from .qwen_image_edit import ImageOnlyQwen2VLProcessor
from .tiny import QWEN_SPECIAL, QWEN_UNK, qwen_vocabulary, tiny_qwen_image_components

# In the order of the ids qwen_text_encoder_config() gives them: vision_start = n, vision_end = n + 1, image = n + 2,
# video = n + 3, with n = len(qwen_vocabulary()).
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TINY_VL_MIN_PIXELS = 28 * 28  # one merged 2x2 block of 14-pixel patches
TINY_VL_MAX_PIXELS = 56 * 56


def qwen_vl_tokenizer(max_length: int = 1024):
    """The tiny Qwen tokenizer (:func:`directalign.adapters.tiny.qwen_tokenizer`) plus the four vision tokens."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*qwen_vocabulary(), *QWEN_VISION_TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=QWEN_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True)
                            for s in (*QWEN_SPECIAL, *QWEN_VISION_TOKENS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=QWEN_UNK, model_max_length=max_length)


def tiny_qwen_vl_processor(tokenizer=None):
    """A Qwen2-VL processor (PIL image backend, no video processor: see :class:`ImageOnlyQwen2VLProcessor`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": TINY_VL_MIN_PIXELS,
                                                     "longest_edge": TINY_VL_MAX_PIXELS})
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer or qwen_vl_tokenizer())


def tiny_qwen_image_edit_components(seed: int = 0, shift: float = 1.0) -> dict:
    """The tiny Qwen-Image components with the vision-aware tokenizer and a processor (same seed, same weights)."""
    components = tiny_qwen_image_components(seed, shift)
    components["tokenizer"] = qwen_vl_tokenizer()
    components["processor"] = tiny_qwen_vl_processor(components["tokenizer"])
    return components


def tiny_qwen_image_edit_pipeline(seed: int = 0, shift: float = 1.0, plus: bool = False):
    """A tiny ``QwenImageEditPipeline`` (``plus=True``: ``QwenImageEditPlusPipeline``) with random weights."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(**tiny_qwen_image_edit_components(seed, shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe
