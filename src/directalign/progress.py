"""Progress bars with an ETA for long work (evaluation, sampling, the tiny world's tools), on stderr.

Every bar is a ``tqdm`` bar (https://tqdm.github.io/docs/tqdm/) that writes to stderr, so stdout keeps only results,
and that ends its line when it closes, also when an exception leaves the ``with`` block: an error message printed
afterwards (``directalign: error: ...``) starts a line of its own. ``enabled=False`` (``run.progress=false`` or
``--no-progress``) shows nothing.
"""

from __future__ import annotations

import sys


def bar(total: float | None, desc: str, enabled: bool = True, unit: str = "it", **kwargs):
    """A tqdm bar on stderr (``leave=True``: closing it always ends its line); use it as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=True,
                dynamic_ncols=True, **kwargs)


def add_progress_flag(parser) -> None:
    """``--no-progress`` on an argparse parser (dest ``no_progress``)."""
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars (on stderr)")
