"""Stopping a run cleanly on SIGINT / SIGTERM: finish the step, write a checkpoint, stop."""

from __future__ import annotations

import signal
import threading


class StoppedBySignal(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a checkpoint of the last finished step was written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written; "
                         "continue with --resume")
        self.signum, self.step = signum, step


class StopFlag:
    """First SIGINT/SIGTERM: finish the current step, write a checkpoint and stop. A second one stops at once (the
    previous complete checkpoint stays; a partial one is never loaded)."""

    def __init__(self):
        self.signal = None
        self._previous: dict = {}

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def install(self) -> "StopFlag":
        """Handle SIGINT and SIGTERM (only the main thread may install handlers; elsewhere signals keep theirs)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
