"""Prompt sources: the tiny world's splits, the shipped general set and user files (.txt, .jsonl, .csv).

* ``tiny-world:train`` / ``tiny-world:heldout``: the tiny world's caption splits (the held-out split is the default
  evaluation set);
* the shipped sets in ``directalign/prompt_sets/<name>.txt``, prompts written for this project over the four styles
  of HPDv2 (``anime``, ``concept-art``, ``painting``, ``photo``; Wu et al., arXiv 2306.09341): ``general-train``
  (400, the training set of the real-model configs) and ``general`` (212, their held-out evaluation set; no prompt
  of it is in ``general-train``). ``<name>`` / ``<name>:all`` is the whole set with the categories interleaved
  (anime, concept art, painting, photo, anime, ...), so that any prefix is balanced, as a run with
  ``train.shuffle_prompts=false`` reads it; ``<name>:<category>`` is one category;
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


def shipped_prompt_sets() -> list[str]:
    """The names of the prompt sets shipped in ``directalign/prompt_sets`` (``general``, ``general-train``)."""
    from importlib import resources

    folder = resources.files("directalign") / "prompt_sets"
    return sorted(f.name[:-4] for f in folder.iterdir() if f.name.endswith(".txt"))


def prompt_set_categories(name: str = "general") -> dict[str, list[str]]:
    """``{category: prompts}`` of a shipped prompt set, in file order."""
    from importlib import resources

    path = resources.files("directalign") / "prompt_sets" / f"{name}.txt"
    if not path.is_file():
        raise PromptError(f"unknown prompt set {name!r}; shipped sets: {', '.join(shipped_prompt_sets())}")
    out: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("## "):
            current = line[3:].strip()
            out.setdefault(current, [])
        elif line and not line.startswith("#"):
            if current is None:
                raise PromptError(f"prompt set {name!r}: a prompt precedes the first '## category' line")
            out[current].append(line)
    return out


def _slug(text: str) -> str:
    return text.strip().lower().replace("_", "-").replace(" ", "-")


def _shipped(source: str) -> list[str]:
    name, _, which = source.partition(":")
    cats = prompt_set_categories(name)
    if which in ("", "all"):  # round robin over the categories: every prefix is balanced
        columns = list(cats.values())
        return [c[i] for i in range(max(map(len, columns), default=0)) for c in columns if i < len(c)]
    by_slug = {_slug(c): c for c in cats}
    if _slug(which) not in by_slug:
        raise PromptError(f"unknown {name} prompt category {which!r}; use {name}:all or one of "
                          + ", ".join(f"{name}:{s}" for s in by_slug))
    return list(cats[by_slug[_slug(which)]])


def load_prompts(source: str) -> list[str]:
    """``tiny-world:train`` | ``tiny-world:heldout`` | ``<shipped set>[:all|:<category>]`` (``general``,
    ``general-train``) | a .txt, .jsonl or .csv path."""
    name = source.partition(":")[0]
    if name in shipped_prompt_sets() and (source == name or not Path(source).exists()):
        return _shipped(source)
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
