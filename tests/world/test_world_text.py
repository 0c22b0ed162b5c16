"""Tests of the tiny world's word-level tokenizers."""

from __future__ import annotations

import itertools

import pytest
from transformers import PreTrainedTokenizerFast

from directalign.world import dataset as ds
from directalign.world import text

IDS = text.token_ids()


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos"])
def tok(request):
    return text.build_tokenizer(text.GENERATOR_MAX_LENGTH, add_bos=request.param), request.param


def _tokens(tokenizer, s):
    return tokenizer.convert_ids_to_tokens(tokenizer(s).input_ids)


def test_special_token_ids():
    assert IDS == {"pad": 0, "bos": 1, "unk": 2, "eos": 3}
    # id 2 would make transformers' CLIP text model pool at the largest token id instead of the first EOS
    assert IDS["eos"] == 3 != 2


def test_vocabulary_is_unique_and_complete():
    vocab = text.vocabulary()
    assert len(vocab) == len(set(vocab))
    assert vocab[:4] == list(text.SPECIAL)
    for w in (*ds.COLORS, *ds.SHAPES, *ds.TEXTURES, *ds.LIGHTINGS, *text.EXTRA_WORDS, *text.PUNCTUATION):
        assert w in vocab


def test_tokenizer_special_ids(tok):
    tokenizer, _ = tok
    assert tokenizer.eos_token_id == 3
    assert tokenizer.pad_token_id == 0
    assert tokenizer.bos_token_id == 1
    assert tokenizer.unk_token_id == 2
    assert tokenizer.model_max_length == text.GENERATOR_MAX_LENGTH
    assert tokenizer.convert_tokens_to_ids(text.EOS) == 3


def test_end_token_and_bos_only_when_asked(tok):
    tokenizer, add_bos = tok
    ids = tokenizer("a red circle on a blue background").input_ids
    assert ids[-1] == IDS["eos"]
    assert ids.count(IDS["eos"]) == 1
    if add_bos:
        assert ids[0] == IDS["bos"]
        assert ids.count(IDS["bos"]) == 1
        assert len(ids) == 7 + 2
    else:
        assert IDS["bos"] not in ids
        assert len(ids) == 7 + 1
    body = ids[1:-1] if add_bos else ids[:-1]
    assert tokenizer.convert_ids_to_tokens(body) == "a red circle on a blue background".split()


def test_no_special_tokens_when_disabled(tok):
    tokenizer, _ = tok
    ids = tokenizer("a red circle", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "red", "circle"]


def test_lowercasing(tok):
    tokenizer, _ = tok
    upper = tokenizer("A RED Circle on a Blue BACKGROUND").input_ids
    assert upper == tokenizer("a red circle on a blue background").input_ids
    assert IDS["unk"] not in upper


def test_punctuation_splitting(tok):
    tokenizer, add_bos = tok
    toks = _tokens(tokenizer, "Textured.")
    body = toks[1:-1] if add_bos else toks[:-1]
    assert body == ["textured", "."]
    toks = _tokens(tokenizer, "textured. a red circle on a blue background, flat, dark")
    body = toks[1:-1] if add_bos else toks[:-1]
    assert body == ["textured", ".", "a", "red", "circle", "on", "a", "blue", "background", ",", "flat", ",", "dark"]


def test_unknown_words_map_to_unk(tok):
    tokenizer, add_bos = tok
    ids = tokenizer("a zebra circle").input_ids
    body = ids[1:-1] if add_bos else ids[:-1]
    assert body == [tokenizer.convert_tokens_to_ids("a"), IDS["unk"], tokenizer.convert_tokens_to_ids("circle")]
    assert _tokens(tokenizer, "Orange!")[(1 if add_bos else 0) :] == [text.UNK, text.UNK, text.EOS]


def test_every_caption_tokenizes_without_unk_and_fits():
    gen = text.build_tokenizer(text.GENERATOR_MAX_LENGTH, add_bos=True)
    rew = text.build_tokenizer(text.REWARD_MAX_LENGTH, add_bos=True)
    for (fg, bg, shape), (texture, lighting) in itertools.product(
        ds.all_triples(), itertools.product(ds.TEXTURES, ds.LIGHTINGS)
    ):
        full = ds.caption(ds.Attributes(fg, bg, shape, texture, lighting))
        # SRPO-style control prefix on top of a full caption: the longest prompt the generator sees
        for prompt in (full, f"{texture}. {full}", f"{lighting}. {full}"):
            for tokenizer in (gen, rew):
                ids = tokenizer(prompt).input_ids
                assert IDS["unk"] not in ids, prompt
                assert len(ids) <= tokenizer.model_max_length, prompt
                assert ids[-1] == IDS["eos"]


@pytest.mark.parametrize("max_length", [text.GENERATOR_MAX_LENGTH, text.REWARD_MAX_LENGTH])
def test_padding_to_model_max_length(max_length):
    tokenizer = text.build_tokenizer(max_length, add_bos=True)
    prompts = ["a red circle", "a blue square on a red background, textured, dark"]
    enc = tokenizer(prompts, padding="max_length", truncation=True)
    for prompt, ids, att in zip(prompts, enc.input_ids, enc.attention_mask):
        assert len(ids) == len(att) == max_length
        n = len(tokenizer(prompt).input_ids)
        assert ids[n - 1] == IDS["eos"]
        assert ids[n:] == [IDS["pad"]] * (max_length - n)
        assert att == [1] * n + [0] * (max_length - n)
    # tensors too
    pt = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
    assert tuple(pt.input_ids.shape) == (2, max_length)


def test_truncation_keeps_the_end_token():
    tokenizer = text.build_tokenizer(8, add_bos=True)
    ids = tokenizer("a " * 20, truncation=True).input_ids
    assert len(ids) == 8
    assert ids[0] == IDS["bos"] and ids[-1] == IDS["eos"]


@pytest.mark.parametrize("add_bos", [False, True])
def test_save_and_reload_round_trip(tmp_path, add_bos):
    tokenizer = text.build_tokenizer(text.REWARD_MAX_LENGTH, add_bos=add_bos)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    prompts = [
        "Textured. A RED circle on a blue background, zebra",
        "a white cross on a purple background, flat, bright",
        "dark. a green triangle on a yellow background",
        "",
    ]
    for p in prompts:
        assert reloaded(p).input_ids == tokenizer(p).input_ids, p
    a = tokenizer(prompts, padding="max_length", truncation=True)
    b = reloaded(prompts, padding="max_length", truncation=True)
    assert a.input_ids == b.input_ids and a.attention_mask == b.attention_mask
    assert reloaded.model_max_length == text.REWARD_MAX_LENGTH
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(tokenizer, attr), attr
    assert reloaded.get_vocab() == tokenizer.get_vocab()
