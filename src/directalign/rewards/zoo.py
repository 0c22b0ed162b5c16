"""Every reward ``reward.kind`` names, built from the config (weights from a local path or a hub id, frozen).

================= ============================================================= ======================================
kind              ``reward.path``                                                score
================= ============================================================= ======================================
``tiny-world``    ``tiny-world`` (the shipped reward)                            cos / divisor
``clip``          any transformers CLIPModel (dir or hub id)                     [logit_scale.exp() *] cos / divisor
``pickscore``     ``yuvalkirstain/PickScore_v1`` (tokenizer: ``reward.tokenizer`` logit_scale.exp() * cos / divisor
                  if the model dir has none)                                     (official SRPO: divisor 20)
``hpsv2``         ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt`` (open_clip cos / divisor
                  checkpoint, converted on load) or a converted CLIPModel dir
``aesthetic``     the MLP head ``sac+logos+ava1-l14-linearMSE.pth``; the CLIP   MLP(f_img) / divisor (image-only)
                  ViT-L/14 comes from ``reward.clip_backbone``
``aesthetic-v25`` the MLP head ``aesthetic_predictor_v2_5.pth`` (discus0434's    MLP(f_img) / divisor (image-only)
                  Aesthetic Predictor v2.5); the SigLIP so400m-patch14-384 comes
                  from ``reward.siglip_backbone``
``imagereward``   ``ImageReward.pt`` (tokenizer: ``reward.tokenizer``, default   (r - mean) / std / divisor
                  bert-base-uncased)
``hpsv3``         ``HPSv3.safetensors`` (MizzenAI/HPSv3, a Qwen2-VL-7B reward    mu of the head's (mu, sigma) / divisor
                  model; tokenizer: ``reward.tokenizer``, default
                  Qwen/Qwen2-VL-7B-Instruct)
``mps``           MPS overall checkpoint converted by ``tools/convert_mps.py``  logit_scale.exp() * cos(fused image,
                  (``.safetensors``; tokenizer: ``reward.tokenizer``, default   prompt) / divisor
                  laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
``sum``           ``reward.terms`` (kinds, paths, weights, means, stds)          sum w_i (s_i - mean_i) / std_i
================= ============================================================= ======================================

Image-only rewards (aesthetic, aesthetic-v25) need ``reward.form=absolute``; the SRPO relative forms need a
text-conditioned reward (a sum qualifies when any term is text-conditioned).

Each kind is one loader in :mod:`directalign.rewards.registry` (``LOADERS``), built by its one factory
(:func:`~directalign.rewards.registry.make_reward`; :func:`~directalign.rewards.registry.load_reward` from the
``reward`` config section). ``reward.clamp_resized`` (default true) reaches every kind whose preprocessing resizes:
true clips the resized image to [0, 1] as the published PIL pipelines do, false keeps the bicubic overshoot as the
official SRPO code does (HPSv2's published longest-side + pad resize never clamps).

``hpsv3`` (:mod:`directalign.rewards.hpsv3`) runs the published Qwen2-VL reward model on transformers' own classes,
differentiable in the image (448 x 448 input for square images); ``mps`` (:mod:`directalign.rewards.mps`) is a CLIP
ViT-H/14 whose image tokens attend to the prompt's tokens that match its preference dimensions. Each kind's default
SRPO control words (when ``reward.positive_words`` / ``negative_words`` are unset):
:mod:`directalign.rewards.control_words`.

``aesthetic-v25`` (:mod:`directalign.rewards.aesthetic_v25`) is the SigLIP-based successor of the LAION predictor
(``aesthetic``): same kind of MLP head, trained on a wider range of image domains (illustrations too), scores roughly
1-10 with 5.5+ called great by its authors. Its images are resized to 384 x 384 without a crop (SigLIP's processor).
"""

from __future__ import annotations

# The registry holds the loaders and the factory; this module keeps the names callers and tests import from it.
from .registry import (  # noqa: F401  (re-exported)
    DTYPES,
    LOADERS,
    REWARD_KINDS,
    RewardError,
    RewardOptions,
    build_reward,
    load_reward,
    log,
    make_reward,
    options_from_config,
    reward_from_config,
)
