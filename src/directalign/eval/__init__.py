"""Evaluating generators: held-out evaluation during training, and the ``sample | eval | compare`` commands' work.

* :mod:`.heldout` -- the run's training reward on held-out prompts and fixed seeds (``evaluate``, ``best_of_n``),
  the numbers ``summary.json`` reports;
* :mod:`.models` -- what a ``--model`` spec names (:class:`~.models.ModelRef`) and loading it (LoRA / transformer);
* :mod:`.settings` -- the one config every model of a command is generated and scored with;
* :mod:`.scoring` -- the ``--rewards`` specs, absolute and relative scores;
* :mod:`.images` -- image folders with ``manifest.jsonl`` (written by ``sample``, scored by ``eval --images``);
* :mod:`.evaluate` -- one model's full evaluation (scores, indicators, judge rates, baseline deltas);
* :mod:`.stats` -- means and Student-t intervals; :mod:`.output` -- strict JSON, CSV and output directories;
* :mod:`.compare` -- the side-by-side table of several models.

The commands themselves (argument parsing, printing) are in :mod:`directalign.cli.eval`.
"""

from __future__ import annotations

from ..errors import UserError


class EvalError(UserError, ValueError):
    """A user error in sample / eval / compare / report; the message says what to fix."""
