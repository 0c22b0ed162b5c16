"""The shipped prompt sets (general: held-out, general-train: training), how a whole set is ordered, and where the
real-model configs' prompts come from."""

import re
from pathlib import Path

import pytest
from helpers import SRC

from directalign.prompts import PromptError, load_prompts, prompt_set_categories, shipped_prompt_sets

HPD_CATEGORIES = {"anime", "concept art", "painting", "photo"}


def test_general_set_covers_the_hpd_categories():
    cats = prompt_set_categories("general")
    assert set(cats) == HPD_CATEGORIES
    assert all(len(v) >= 45 for v in cats.values())
    everything = load_prompts("general")
    assert len(everything) >= 200
    assert load_prompts("general:all") == everything
    assert len(set(everything)) == len(everything)  # no duplicates
    assert not any(p.startswith("#") for p in everything)


def test_general_categories_by_name():
    photo = load_prompts("general:photo")
    assert photo == prompt_set_categories()["photo"]
    assert all(p in load_prompts("general") for p in photo)
    assert load_prompts("general:concept-art") == load_prompts("general:Concept_Art") == load_prompts(
        "general:concept art")
    with pytest.raises(PromptError, match="general:anime"):
        load_prompts("general:sculpture")


def test_tiny_world_and_file_sources_unchanged(tmp_path):
    assert len(load_prompts("tiny-world:heldout")) == 24
    f = tmp_path / "p.txt"
    f.write_text("# not a comment for plain files\na cat\n")
    assert load_prompts(str(f)) == ["# not a comment for plain files", "a cat"]


# ------------------------------------------------------------------------------------ general-train, interleaving
CONFIGS = SRC / "directalign" / "configs"
REAL_MODEL_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name.startswith(("flux-", "sd35-", "qwen-")))


def _norm(prompt: str) -> str:
    return re.sub(r"\W+", " ", prompt.lower()).strip()


def test_general_train_is_a_training_set_disjoint_from_general():
    assert shipped_prompt_sets() == ["general", "general-train"]
    cats = prompt_set_categories("general-train")
    assert set(cats) == HPD_CATEGORIES
    assert all(len(v) >= 100 for v in cats.values())
    train = load_prompts("general-train")
    assert len(train) == len(set(train)) >= 400
    held_out = {_norm(p) for p in load_prompts("general")}
    assert not [p for p in train if _norm(p) in held_out], "a training prompt is in the held-out set"
    assert load_prompts("general-train:photo") == cats["photo"]
    assert load_prompts("general-train:concept-art") == cats["concept art"]
    with pytest.raises(PromptError, match="general-train:anime"):
        load_prompts("general-train:sculpture")
    with pytest.raises(PromptError, match="shipped sets: general, general-train"):
        prompt_set_categories("nope")


@pytest.mark.parametrize("name", ["general", "general-train"])
def test_a_whole_set_interleaves_its_categories(name):
    """With train.shuffle_prompts=false (the official FLUX configs) a run reads the set in order: every prefix holds
    the four styles equally, not 100 anime prompts first."""
    cats = prompt_set_categories(name)
    which = {p: c for c, ps in cats.items() for p in ps}
    prompts = load_prompts(name)
    assert sorted(prompts) == sorted(which)
    for n in (4, 32, 100):
        counts = {c: sum(which[p] == c for p in prompts[:n]) for c in cats}
        assert max(counts.values()) - min(counts.values()) <= 1, (n, counts)


# ------------------------------------------------------------------------ where the real-model configs' prompts are
def _key_comment(text: str, section: str, key: str) -> tuple[str, str]:
    """(value, comment) of ``section.key`` in a YAML file's text: the comment after the value plus the comment-only
    lines right below it that are indented deeper than the key (the continuation of that comment)."""
    lines = text.splitlines()
    start = lines.index(f"{section}:")
    for i in range(start + 1, len(lines)):
        m = re.match(rf"^(\s+){key}:\s*([^#]*?)\s*(?:#\s?(.*))?$", lines[i])
        if m:
            comment = [m.group(3) or ""]
            for nxt in lines[i + 1:]:
                c = re.match(r"^(\s+)#\s?(.*)$", nxt)
                if not c or len(c.group(1)) <= len(m.group(1)):
                    break
                comment.append(c.group(2))
            return m.group(2).strip("'\""), " ".join(comment)
        if lines[i] and not lines[i].startswith((" ", "#")):
            break
    raise AssertionError(f"no {section}.{key} in the file")


def _shipped_source(value: str) -> bool:
    """True when ``value`` loads with no file at all: a shipped prompt set or a tiny-world split."""
    try:
        load_prompts(value)
    except PromptError:
        return False
    return not Path(value).exists()


@pytest.mark.parametrize("path", REAL_MODEL_CONFIGS, ids=lambda p: p.stem)
def test_real_model_config_prompts_are_shipped_or_say_where_they_come_from(path):
    text = path.read_text(encoding="utf-8")
    for section in ("train", "eval"):
        value, comment = _key_comment(text, section, "prompts")
        assert _shipped_source(value) or re.search(r"https://\S+", comment), (
            f"{path.name}: {section}.prompts={value!r} is no shipped set and its comment names no source")
        assert re.search(r"https://(huggingface\.co/datasets|github\.com)/\S+", comment), (path.name, comment)
        if "family: qwen-image-edit" in text:  # an edit is a prompt plus a source image: the user's manifest
            assert value.endswith((".jsonl", ".csv")), (path.name, value)
            continue
        # as shipped, every text-to-image config runs without a prompt file, and says where the paper's prompts are
        assert _shipped_source(value), f"{path.name}: {section}.prompts={value!r} needs a file"
    if "family: qwen-image-edit" not in text:
        assert _key_comment(text, "train", "prompts")[0] == "general-train"
        assert _key_comment(text, "eval", "prompts")[0] == "general"


@pytest.mark.parametrize("path", [p for p in REAL_MODEL_CONFIGS if "kind: hpsv2" in p.read_text(encoding="utf-8")],
                         ids=lambda p: p.stem)
def test_hps_configs_say_where_the_checkpoint_comes_from(path):
    text = path.read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "HPS_v2.1_compressed.pt" in header and "https://huggingface.co/xswu/HPSv2" in header
