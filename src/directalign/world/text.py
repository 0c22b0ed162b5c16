"""Word-level tokenizers for the tiny world, built offline from the caption vocabulary.

Both tokenizers are ``transformers.PreTrainedTokenizerFast`` objects backed by a ``tokenizers`` WordLevel model, so
they save to and load from a plain ``tokenizer.json`` with no network. The end-of-text token has id 3, not 2:
transformers' CLIP text model pools at the first ``eos_token_id`` only when that id is not 2 (id 2 selects a legacy
rule that pools at the largest token id, which would pool mid-sentence here).
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from . import dataset as ds

PAD, BOS, UNK, EOS = "<pad>", "<bos>", "<unk>", "<eos>"
SPECIAL = (PAD, BOS, UNK, EOS)
# Words beyond the caption grammar that control phrases and user prompts commonly use in this domain.
EXTRA_WORDS = ("a", "an", "on", "background", "detailed", "plain", "photo", "image", "of", "the", "with", "and")
PUNCTUATION = (".", ",")

GENERATOR_MAX_LENGTH = 16
REWARD_MAX_LENGTH = 20


def vocabulary() -> list[str]:
    words = [*SPECIAL, *PUNCTUATION]
    for w in (*EXTRA_WORDS, *ds.COLORS, *ds.SHAPES, *ds.TEXTURES, *ds.LIGHTINGS):
        if w not in words:
            words.append(w)
    return words


def build_tokenizer(max_length: int, add_bos: bool) -> PreTrainedTokenizerFast:
    """A lower-casing, punctuation-splitting word-level tokenizer that appends the end token (and a BOS if asked)."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = f"{BOS} $A {EOS}" if add_bos else f"$A {EOS}"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


def token_ids() -> dict[str, int]:
    vocab = vocabulary()
    return {"pad": vocab.index(PAD), "bos": vocab.index(BOS), "unk": vocab.index(UNK), "eos": vocab.index(EOS)}
