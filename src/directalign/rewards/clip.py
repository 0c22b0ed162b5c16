"""CLIP-architecture rewards (PickScore, CLIP score, the tiny world's reward)."""

from __future__ import annotations

# OpenAI CLIP's image normalisation, used by CLIP, PickScore, HPSv2 and the tiny world's reward.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def projected_features(output):
    """Projected embedding from ``CLIPModel.get_{image,text}_features`` across transformers versions.

    transformers < 5 returns the tensor itself; transformers >= 5 returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds the projected embedding.
    """
    if hasattr(output, "pooler_output"):
        return output.pooler_output
    return output
