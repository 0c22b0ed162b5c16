"""The world build's one overall progress bar (stderr) with an ETA across its stages.

The stages report their own progress as lines on stdout (``[generator] step=1200 loss=...``, every 100 steps; see
:func:`directalign.world.build_common._log`). While the bar is shown, those lines (and the parallel reward process's,
read from a pipe) are printed above the bar as before and move it; nothing a stage computes changes.

The bar counts each stage's steps weighted by the seconds per step the shipped build took
(:data:`SECONDS_PER_STEP`), so that it advances with wall time. The reward stage in its own process runs beside
the generator -> distillation chain: then the bar's span is the longer of the two paths, and its position the
further of the two.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading

# Seconds per step of each stage in the shipped build (assets/tiny-world/build_log.json: 222 s / 1200 VAE steps,
# 4305 s / 6000 generator steps, 656 s / 600 distillation steps, 1328 s / 2500 reward steps on 2 cores).
SECONDS_PER_STEP = {"vae": 0.185, "generator": 0.717, "distill": 1.093, "reward": 0.531}
_STEP_LINE = re.compile(r"^\[(vae|generator|distill|reward)\] step=(\d+)\b")


class BuildProgress:
    """One bar over the stages in ``steps`` ({stage: steps}); ``parallel_reward``: the reward runs beside the
    generator and distillation stages."""

    def __init__(self, steps: dict[str, int], parallel_reward: bool, out=None, enabled: bool = True):
        from ..progress import bar

        self.out = out if out is not None else sys.stdout  # where the stages' lines go
        self.steps = dict(steps)
        self.parallel = parallel_reward and "reward" in steps
        self.done = {s: 0 for s in steps}
        self._lock = threading.Lock()
        self.bar = bar(self._span(self.steps), "world build", enabled, unit="s",
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")

    def _weight(self, counts: dict[str, int], stages) -> float:
        return sum(SECONDS_PER_STEP[s] * counts.get(s, 0) for s in stages)

    def _span(self, counts: dict[str, int]) -> float:
        chain = [s for s in counts if not (self.parallel and s == "reward")]
        serial = self._weight(counts, chain)
        if not self.parallel:
            return serial
        before = self._weight(counts, [s for s in chain if s == "vae"])  # the VAE trains before the reward starts
        return before + max(serial - before, self._weight(counts, ["reward"]))

    def _advance(self, stage: str, done: int) -> None:
        with self._lock:
            self.done[stage] = max(self.done[stage], min(done, self.steps[stage]))
            self.bar.n = min(self._span(self.done), self.bar.total)
            self.bar.set_postfix_str(f"{stage} step {self.done[stage]}/{self.steps[stage]}", refresh=False)
            self.bar.refresh()

    def stage_done(self, stage: str) -> None:
        if stage in self.steps:
            self._advance(stage, self.steps[stage])

    def line(self, text: str) -> None:
        """Print a stage's progress line above the bar, and move the bar to the step it reports."""
        m = _STEP_LINE.match(text)
        if m and m.group(1) in self.steps:
            self._advance(m.group(1), int(m.group(2)) + 1)  # step=k is logged after step k (0-based)
        with self._lock:
            self.bar.write(text, file=self.out)

    def follow(self, stream) -> threading.Thread:
        """Echo (and follow) the lines of ``stream`` (a child process's stdout) in a thread; join it after the
        process ends."""
        def pump():
            for raw in stream:
                self.line(raw.rstrip("\n"))

        t = threading.Thread(target=pump, name="world-build-progress", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.bar.close()


class _LineTap(io.TextIOBase):
    """A stdout stand-in that hands each complete line to ``on_line``."""

    def __init__(self, real, on_line):
        self.real, self.on_line, self.pending = real, on_line, ""

    def write(self, s: str) -> int:
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.on_line(line)
        return len(s)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()


@contextlib.contextmanager
def overall_bar(steps: dict[str, int], parallel_reward: bool, enabled: bool):
    """A :class:`BuildProgress` while the build runs, with stdout's lines going through it (shown above the bar);
    without ``enabled`` nothing changes and it yields None."""
    if not enabled:
        yield None
        return
    real = sys.stdout
    progress = BuildProgress(steps, parallel_reward, real)
    tap = _LineTap(real, progress.line)
    try:
        with contextlib.redirect_stdout(tap):
            yield progress
        if tap.pending:
            progress.line(tap.pending)
    finally:
        progress.close()
