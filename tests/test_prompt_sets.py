import pytest

from directalign.prompts import PromptError, load_prompts, prompt_set_categories

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
