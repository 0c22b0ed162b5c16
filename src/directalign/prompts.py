"""Prompt sources: the tiny world's splits, the shipped general set and user files (.txt, .jsonl, .csv).

* ``tiny-world:train`` / ``tiny-world:heldout``: the tiny world's caption splits (the held-out split is the default
  evaluation set);
* ``general`` / ``general:all`` / ``general:<category>``: prompts written for this project over the HPDv2 categories
  (``anime``, ``concept-art``, ``painting``, ``photo``), shipped in ``directalign/prompt_sets/general.txt``;
* a path to a ``.txt`` (one prompt per line), ``.jsonl`` (``{"prompt": ...}`` per line) or ``.csv`` file (a
  ``prompt`` column).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from .errors import UserError

MAX_PROMPT_FILE_BYTES = 50 * 1024 * 1024
MAX_PROMPT_CHARS = 2000


class PromptError(UserError, ValueError):
    """A prompt source that cannot be used; the message names the file and the fix."""


def prompt_set_categories(name: str = "general") -> dict[str, list[str]]:
    """``{category: prompts}`` of a shipped prompt set, in file order."""
    from importlib import resources

    path = resources.files("directalign") / "prompt_sets" / f"{name}.txt"
    if not path.is_file():
        raise PromptError(f"unknown prompt set {name!r}; shipped sets: general")
    out: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = []
        elif line and not line.startswith("#"):
            if current is None:
                raise PromptError(f"prompt set {name!r}: a prompt precedes the first '## category' line")
            out[current].append(line)
    return out


def _slug(text: str) -> str:
    return text.strip().lower().replace("_", "-").replace(" ", "-")


def _general(source: str) -> list[str]:
    name, _, which = source.partition(":")
    cats = prompt_set_categories(name)
    if which in ("", "all"):
        return [p for prompts in cats.values() for p in prompts]
    by_slug = {_slug(c): c for c in cats}
    if _slug(which) not in by_slug:
        raise PromptError(f"unknown {name} prompt category {which!r}; use {name}:all or one of "
                          + ", ".join(f"{name}:{s}" for s in by_slug))
    return list(cats[by_slug[_slug(which)]])


def load_prompts(source: str) -> list[str]:
    """``tiny-world:train`` | ``tiny-world:heldout`` | ``general[:all|:<category>]`` | a .txt, .jsonl or .csv path."""
    if source == "general" or (source.startswith("general:") and not Path(source).exists()):
        return _general(source)
    if source.startswith("tiny-world:"):
        from .world import dataset as ds

        split = source.split(":", 1)[1]
        if split == "train":
            return ds.train_prompts()
        if split == "heldout":
            return ds.heldout_prompts()
        raise PromptError(f"unknown tiny-world prompt split {split!r}; use tiny-world:train or tiny-world:heldout")
    path = Path(source)
    if path.is_dir():
        raise PromptError(f"prompt file {source!r} is a directory; give a .txt, .jsonl or .csv file")
    if not path.is_file():
        raise PromptError(f"prompt file {source!r} does not exist; give a .txt, .jsonl or .csv file")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise PromptError(f"prompt file {source!r} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MB; split it")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is dropped
    except UnicodeDecodeError:
        raise PromptError(f"prompt file {source!r} is not UTF-8 text; re-save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise PromptError(f"{source}:{i} is not valid JSON; each line needs {{\"prompt\": ...}}") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise PromptError(f"{source}:{i} has no string field \"prompt\"")
            prompts.append(item["prompt"])
    elif suffix == ".csv":
        try:
            rows = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as e:
            raise PromptError(f"{source} is not a readable CSV file ({e}); save it as plain comma-separated text")
        if not rows or "prompt" not in rows[0]:
            raise PromptError(f"{source} needs a header row with a 'prompt' column")
        prompts = [row["prompt"] for row in rows]
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise PromptError(f"prompt file {source!r} holds no prompts; put one prompt per line")
    too_long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if too_long:
        raise PromptError(f"prompt {too_long[0] + 1} in {source!r} is longer than {MAX_PROMPT_CHARS} characters; "
                          "shorten it")
    return prompts
