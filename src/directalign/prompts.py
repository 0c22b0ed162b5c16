"""Prompt sources: the tiny world's splits and user files (.txt one per line, .jsonl with "prompt", .csv)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

MAX_PROMPT_FILE_BYTES = 50 * 1024 * 1024
MAX_PROMPT_CHARS = 2000


class PromptError(ValueError):
    """A prompt source that cannot be used; the message names the file and the fix."""


def load_prompts(source: str) -> list[str]:
    """``tiny-world:train`` | ``tiny-world:heldout`` | a path to a .txt, .jsonl or .csv file."""
    if source.startswith("tiny-world:"):
        from .world import dataset as ds

        split = source.split(":", 1)[1]
        if split == "train":
            return ds.train_prompts()
        if split == "heldout":
            return ds.heldout_prompts()
        raise PromptError(f"unknown tiny-world prompt split {split!r}; use tiny-world:train or tiny-world:heldout")
    path = Path(source)
    if not path.is_file():
        raise PromptError(f"prompt file {source!r} does not exist; give a .txt, .jsonl or .csv file")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise PromptError(f"prompt file {source!r} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MB; split it")
    try:
        text = path.read_bytes().decode("utf-8")
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
        rows = list(csv.DictReader(io.StringIO(text)))
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
