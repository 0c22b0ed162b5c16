"""SRPO's default control words per reward kind: what ``reward.positive_words`` / ``reward.negative_words`` are when
the configuration does not set them.

SRPO (arXiv 2509.06942) prepends a control word to the reward's text (``"<word>. <prompt>"``) and contrasts a
positive and a negative phrase; a word only steers when the reward model's text side responds to it, so the useful
words depend on the reward. Only one list was ever tuned: the official code's, for HPSv2.1 (its README: "Current
control words are designed for HPS-v2.1 ... If using PickScore as reward model, redesign control words"). The other
entries below are reasoned starting points, not tuned by experiment; each says why.

=================== ================================================ ===============================================
kind                positive / negative                              where from
=================== ================================================ ===============================================
``tiny-world``      textured / flat                                  the shipped tiny world's reward is trained to
                                                                     read its texture attribute with these words
``hpsv2``           Natural-lighting, Detail, Detailed, Real /       official SRPO code (Tencent-Hunyuan/SRPO@81e5898
                    Concept art, Painting, Anime, Flat, Oil          ``fastvideo/SRPO.py``), tuned for HPSv2.1
``pickscore``,      the hpsv2 lists                                  same text tower family as HPSv2.1 (OpenCLIP
``clip``                                                             ViT-H/14 fine-tunes; any CLIP for ``clip``): the
                                                                     only tuned list is the nearest starting point
``imagereward``     the hpsv2 lists                                  plain English words its BLIP text encoder reads;
                                                                     no list was published for it
``hpsv3``           Realistic photo, Natural lighting, Highly        a VLM reads the word inside its instruction,
                    detailed, Sharp focus / Concept art, Painting,   whose Text Alignment part checks "Style
                    Anime, Flat illustration, Oil painting           Relevance" of the prompt's stated style: the
                                                                     official realism-vs-painted axes, written as the
                                                                     whole phrases a language model reads (the
                                                                     hyphen and single tokens suit CLIP's 77 tokens)
``mps``             Natural lighting, Clarity, Detailed texture,     MPS masks out prompt tokens unlike its condition
                    Realistic style / Painting style, Anime style,   words (light, color, clarity, tone, style,
                    Flat color, Oil painting tone                    texture, ...), so a word steers only when it
                                                                     names one of them: the official axes, each
                                                                     paired with the condition word it targets
``aesthetic``,      the hpsv2 lists (unused)                         image-only: the relative forms are refused, the
``aesthetic-v25``                                                    words never reach the score
``sum``             the first text-conditioned term's entry          the term whose text a control word changes
=================== ================================================ ===============================================

This module imports nothing, so the configuration can read it.
"""

from __future__ import annotations

OFFICIAL_POSITIVE = ("Natural-lighting", "Detail", "Detailed", "Real")
OFFICIAL_NEGATIVE = ("Concept art", "Painting", "Anime", "Flat", "Oil")
IMAGE_ONLY = ("aesthetic", "aesthetic-v25")

DEFAULT_CONTROL_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tiny-world": (("textured",), ("flat",)),
    "hpsv2": (OFFICIAL_POSITIVE, OFFICIAL_NEGATIVE),
    "pickscore": (OFFICIAL_POSITIVE, OFFICIAL_NEGATIVE),
    "clip": (OFFICIAL_POSITIVE, OFFICIAL_NEGATIVE),
    "imagereward": (OFFICIAL_POSITIVE, OFFICIAL_NEGATIVE),
    "hpsv3": (("Realistic photo", "Natural lighting", "Highly detailed", "Sharp focus"),
              ("Concept art", "Painting", "Anime", "Flat illustration", "Oil painting")),
    "mps": (("Natural lighting", "Clarity", "Detailed texture", "Realistic style"),
            ("Painting style", "Anime style", "Flat color", "Oil painting tone")),
    "aesthetic": (OFFICIAL_POSITIVE, OFFICIAL_NEGATIVE),
    "aesthetic-v25": (OFFICIAL_POSITIVE, OFFICIAL_NEGATIVE),
}


def default_control_words(kind: str, term_kinds: list[str] | tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(positive, negative) control words for ``reward.kind`` (``sum``: of its first text-conditioned term in
    ``term_kinds``); a kind without an entry gets the official HPSv2.1 lists."""
    if kind == "sum":
        kind = next((k for k in term_kinds if k not in IMAGE_ONLY), "hpsv2")
    positive, negative = DEFAULT_CONTROL_WORDS.get(kind, (OFFICIAL_POSITIVE, OFFICIAL_NEGATIVE))
    return list(positive), list(negative)
