"""Metrics as JSON lines (always), TensorBoard scalars and Weights & Biases (both optional, off by default).

* ``metrics.jsonl``: one record per logged training step (loss, reward, gradient norm, the method's own metrics);
* ``heldout.jsonl``: one record per held-out sample grid taken during training (``run.sample_every``): the step,
  the mean held-out reward of the grid and the grid's path under the run directory;
* ``run.tensorboard=true``: the same numbers as TensorBoard scalars under ``RUN_DIR/tensorboard``;
* ``run.wandb=true``: the same numbers (and the held-out grids as images) in a Weights & Biases run of project
  ``run.wandb_project``. ``wandb`` is imported only then; ``wandb.init`` reads its usual environment variables
  (``WANDB_MODE=offline`` or ``disabled``, ``WANDB_ENTITY``, ``WANDB_DIR``, ...), see
  https://docs.wandb.ai/guides/track/environment-variables. A resumed run continues the same W&B run (its id is kept
  in ``RUN_DIR/wandb-run-id``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

from .errors import UserError

METRICS_FILE = "metrics.jsonl"
HELDOUT_FILE = "heldout.jsonl"
WANDB_ID_FILE = "wandb-run-id"


class LoggingError(UserError, RuntimeError):
    """An optional logger cannot start; the message says what to install or set."""


def import_wandb():
    """The ``wandb`` module, or a one-line :class:`LoggingError` saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise LoggingError("run.wandb=true needs the wandb package: pip install wandb (or set run.wandb=false)") \
            from None
    return wandb


def check_loggers(run_cfg) -> None:
    """Fail fast (before any model loads) when an optional logger the run asks for is not installed, or (W&B
    online) has no credentials."""
    if getattr(run_cfg, "wandb", False):
        check_wandb_login(import_wandb())


def check_wandb_login(wandb) -> None:
    """A one-line :class:`LoggingError` when W&B would log online without an API key (``WANDB_API_KEY``, a
    settings file or ``~/.netrc``): without this, ``wandb.init`` fails (or prompts) only after the model loaded.
    Asks ``wandb.login(prompt=False, verify=False)``, which reads the key without a prompt or the network
    (https://docs.wandb.ai/ref/python/functions/login); a wandb too old for ``prompt=`` is left to ``wandb.init``."""
    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun", "disabled"):
        return
    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except TypeError:  # no prompt= before wandb added it: it would prompt, so leave the check to wandb.init
        return
    except Exception as e:  # wandb's own error types (a bad settings file, a bad host)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoggingError(f"run.wandb=true: wandb.login failed ({first}); run `wandb login`, or set "
                           "WANDB_MODE=offline to log locally, or set run.wandb=false") from None
    if logged_in is False:
        raise LoggingError("run.wandb=true: no W&B API key (WANDB_API_KEY, ~/.netrc); run `wandb login`, or set "
                           "WANDB_MODE=offline to log locally, or set run.wandb=false")


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = False, append: bool = False, resume_step: int | None = None,
                 wandb_project: str | None = None, wandb_config: dict | None = None):
        """``resume_step``: drop records past the checkpoint a run resumes from (a killed run may have logged steps
        it never checkpointed; they are replayed and logged again). ``wandb_project``: log to Weights & Biases too,
        with ``wandb_config`` (the run's resolved config) as the W&B run's config."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.heldout_path = self.run_dir / HELDOUT_FILE
        self._wandb = self._wandb_run = None
        if wandb_project:  # first: a W&B failure leaves the run's files as they were
            self._wandb, self._wandb_run = _start_wandb(self.run_dir, wandb_project, wandb_config or {}, append)
        if append and resume_step is not None:
            for path in (self.path, self.heldout_path):
                _drop_after(path, resume_step)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")
        if not append and self.heldout_path.is_file():
            self.heldout_path.unlink()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an optional extra
                raise RuntimeError("run.tensorboard=true needs `pip install directalign[tensorboard]`") from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl``; a non-finite number (a skipped step's NaN loss) is written as
        ``null``, since JSON has no NaN or Infinity (RFC 8259, section 6) and strict parsers reject them."""
        safe = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(safe, allow_nan=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
        if self._wandb_run is not None:
            self._wandb_run.log(_scalars(record), step=int(record["step"]))

    def write_heldout(self, record: dict, image: Path | None = None) -> None:
        """Append a held-out record (``step``, ``reward``, ...) to ``heldout.jsonl``; send the reward (and the grid
        ``image``) to TensorBoard / W&B as ``heldout/reward`` (``heldout/samples``)."""
        safe = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.heldout_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(safe) + "\n")
        step, reward = int(record["step"]), record.get("reward")
        if self._tb is not None:
            if isinstance(reward, float):
                self._tb.add_scalar("heldout/reward", reward, step)
            if image is not None:
                import numpy as np
                from PIL import Image

                self._tb.add_image("heldout/samples", np.asarray(Image.open(image).convert("RGB")), step,
                                   dataformats="HWC")
        if self._wandb_run is not None:
            data = {"heldout/reward": reward} if isinstance(reward, float) and math.isfinite(reward) else {}
            if image is not None:
                data["heldout/samples"] = self._wandb.Image(str(image), caption=f"step {step}")
            self._wandb_run.log(data, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _scalars(record: dict) -> dict:
    """The finite numbers of a record, without the step (W&B gets the step as its own argument)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and (isinstance(v, bool) or math.isfinite(v))}


def _start_wandb(run_dir: Path, project: str, config: dict, append: bool):
    """``wandb.init`` for this run: a new W&B run, or (resuming) the one whose id ``wandb-run-id`` holds."""
    wandb = import_wandb()
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if append and id_file.is_file() else ""
    run_id = run_id or secrets.token_hex(8)
    try:
        # no mode= here: wandb reads WANDB_MODE (online / offline / disabled) itself
        run = wandb.init(project=project, name=run_dir.resolve().name, dir=str(run_dir), config=config, id=run_id,
                         resume="allow")
    except Exception as e:  # wandb raises its own error types (no login, no network, bad project) and OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoggingError(f"run.wandb=true: wandb.init failed ({first}); run `wandb login`, or set "
                           "WANDB_MODE=offline to log locally, or set run.wandb=false") from None
    id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb, run


def _drop_after(path: Path, step: int) -> None:
    """Keep only the records of ``path`` up to ``step`` (atomically)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and _step_of(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from a kill: dropped


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist); a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_heldout(run_dir: Path) -> list[dict]:
    """The held-out records of ``heldout.jsonl`` in step order."""
    return sorted(read_jsonl(Path(run_dir) / HELDOUT_FILE), key=lambda r: r.get("step", 0))
