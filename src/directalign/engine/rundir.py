"""The run directory: what ``--resume`` / ``--overwrite`` may do to it, and the lock a live run holds on it.

Two data-loss bugs shaped this module:

* ``--overwrite`` used to ``rmtree`` whatever ``run.output_dir`` named, so ``run.output_dir=. --overwrite`` emptied
  the current directory and a folder holding several runs vanished. Now ``--overwrite`` replaces only a directory
  that is recognisably a directalign run: it carries the :data:`MARKER` file written when the run directory was
  created, or (for runs made before the marker existed) a run's own files, ``config.yaml`` next to
  ``metrics.jsonl`` or ``checkpoints/``. Even then it never removes the current directory or a parent of it, the
  home directory, a filesystem root, or a directory holding other runs.
* Two ``train`` processes into one ``run.output_dir`` both reported success while the second replaced the first's
  results. A run now holds :class:`RunDirLock` for its lifetime: an OS ``flock`` on :data:`LOCK_FILE` inside the run
  directory. The kernel drops it when the process dies however it dies, so a SIGKILLed run leaves no stale lock;
  the holder's PID is written into the file only so the refusal can name it.

Replacing a run keeps the directory itself and its lock file and deletes everything else. Deleting and recreating
the directory would give the lock file a new inode: a process that opened the old one would "hold" a lock nobody
else can see, and the window between deleting and re-locking would let a second run in. Keeping the inode, the
lock is held without a gap from the check to the end of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError

try:  # POSIX; Windows has no flock, it locks a byte range with msvcrt instead (same lifetime semantics)
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None
    import msvcrt

MARKER = ".directalign-run"
LOCK_FILE = ".directalign-lock"
# Files the module itself writes: a directory holding only these has no results in it (a run that died before it
# wrote anything), so it counts as empty, as a brand-new directory would.
_OWN_FILES = frozenset({MARKER, LOCK_FILE})
_ACQUIRE_PATIENCE = 0.5  # seconds: rides out the instant another process's check_run_dir probes the lock
_WIN_LOCK_OFFSET = 1 << 16  # Windows locks this byte, past the PID text, so the PID stays readable


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as the flags ask; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- the lock
def _try_lock(fd: int, shared: bool = False) -> bool:
    """One non-blocking attempt; True when the lock was taken."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        else:  # pragma: no cover
            os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:  # pragma: no cover
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read_holder(path: Path) -> str:
    """'PID 123' (plus the host when it is another machine's) from a held lock file, for the refusal message.
    The holder writes its PID just after it locks, so an empty file gets a few short retries."""
    for _ in range(10):
        try:
            info = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "pid" in info:
            host = info.get("host")
            on = f" on host {host}" if host and host != socket.gethostname() else ""
            return f"PID {info['pid']}{on}"
        time.sleep(0.02)
    return "PID unknown"


def _in_use(run_dir: Path, holder: str) -> RunDirError:
    return RunDirError(f"run directory {str(run_dir)!r} is in use by another directalign process ({holder}); wait "
                       "for it to finish or stop it, or set run.output_dir to another folder")


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds the lock of ``run_dir`` ('PID 123'), or None when nobody does. Touches nothing: the lock file is
    opened read-only and a shared lock is tried and dropped at once."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file (never locked) or unreadable (the writability check reports that)
    try:
        if _try_lock(fd, shared=True):
            _unlock(fd)
            return None
        return _read_holder(path)
    finally:
        os.close(fd)


class RunDirLock:
    """An exclusive, process-lifetime lock on a run directory.

    ``with RunDirLock(d):`` or ``lock.acquire()`` ... ``lock.release()``. Acquiring creates the directory if needed
    and raises :class:`RunDirError` naming the holder's PID when another process (or another lock object in this
    one) holds it. Acquiring a lock this object already holds is a no-op. The lock lasts until :meth:`release` or
    the end of the process, deliberately not until the object is garbage-collected: a dropped reference must not
    quietly let a second run into the directory.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(self.run_dir, e) from None
        deadline = time.monotonic() + _ACQUIRE_PATIENCE
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _unwritable(self.run_dir, e) from None
            if _try_lock(fd):
                # the file may have been deleted (say, by hand) between open and lock: then the lock guards an inode
                # nobody else will open, so start over on the file that is there now
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except OSError:
                    same = False
                if same:
                    break
                _unlock(fd)
            os.close(fd)
            if time.monotonic() > deadline:
                raise _in_use(self.run_dir, _read_holder(self.path))
            time.sleep(0.05)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": datetime.now(timezone.utc).isoformat()}).encode())
        except OSError:
            pass  # the lock is what matters; the PID only improves the message
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock. The file stays (deleting it would split the lock across two inodes); its PID is cleared."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        try:
            _unlock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------ recognition
def _is_legacy_run(d: Path) -> bool:
    return (d / "config.yaml").is_file() and ((d / "metrics.jsonl").is_file() or (d / "checkpoints").is_dir())


def is_run_dir(d: str | Path) -> bool:
    """A directalign run directory: the marker, or a pre-marker run's own files."""
    d = Path(d)
    return (d / MARKER).is_file() or _is_legacy_run(d)


def _has_content(d: Path) -> bool:
    return d.is_dir() and any(p.name not in _OWN_FILES for p in d.iterdir())


def _nested_runs(root: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` runs inside ``root`` (relative paths); symlinks are not followed."""
    found: list[str] = []
    for current, dirs, files in os.walk(root, followlinks=False):
        if Path(current) != root and (MARKER in files or ("config.yaml" in files and
                                                          ("metrics.jsonl" in files or "checkpoints" in dirs))):
            found.append(str(Path(current).relative_to(root)))
            if len(found) >= limit:
                break
            dirs[:] = []  # one is enough per branch
    return found


def _protected(real: Path) -> str | None:
    """Why ``real`` (resolved) must never be deleted, or None."""
    if real.parent == real:
        return "a filesystem root"
    try:
        if real == Path.home().resolve():
            return "your home directory"
    except (RuntimeError, KeyError, OSError):
        pass
    cwd = Path.cwd().resolve()
    if real == cwd:
        return "the current directory"
    if real in cwd.parents:
        return "a parent of the current directory"
    return None


def _check_replaceable(run_dir: Path) -> None:
    """The --overwrite refusals: protected places, folders that are not a run, and runs holding other runs."""
    real = run_dir.resolve()
    why = _protected(real)
    if why:
        raise RunDirError(f"--overwrite refuses to delete {str(run_dir)!r}: it is {why}; set run.output_dir to the "
                          "run's own folder")
    if not is_run_dir(real):
        raise RunDirError(f"--overwrite refuses to delete {str(run_dir)!r}: it is not a directalign run directory "
                          f"(no {MARKER} marker, no config.yaml with metrics.jsonl or checkpoints/); set "
                          "run.output_dir to a new folder, or delete this one yourself")
    nested = _nested_runs(real)
    if nested:
        raise RunDirError(f"--overwrite refuses to delete {str(run_dir)!r}: it holds other runs "
                          f"({', '.join(nested)}); set run.output_dir to the run's own folder")


def _check(run_dir: Path, resume: bool, overwrite: bool, held: bool) -> bool:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.output_dir {str(run_dir)!r} is a file; choose a directory path")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass --resume to continue the run in "
                          f"{str(run_dir)!r} or --overwrite to replace it")
    if not held:
        holder = lock_holder(run_dir)
        if holder is not None:
            raise _in_use(run_dir, holder)
    exists = _has_content(run_dir)
    if resume and not exists:
        raise RunDirError(f"--resume: run directory {str(run_dir)!r} does not exist or is empty; "
                          "start without --resume")
    if exists and not overwrite and not resume:
        raise RunDirError(f"run directory {str(run_dir)!r} already exists; pass --resume to continue it, "
                          "--overwrite to replace it, or set run.output_dir")
    if exists and overwrite:
        _check_replaceable(run_dir)
    return exists


def check_run_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> bool:
    """Refuse a run-directory situation the flags do not allow, without touching anything; returns whether the
    directory exists with content (the marker and lock file alone do not count). Meant to run before any model
    loads so a clash costs no loading time; :func:`prepare_run_dir` checks again under the lock."""
    return _check(Path(output_dir), resume, overwrite, held=False)


# ---------------------------------------------------------------------------------------------------- preparing
def _unwritable(run_dir: Path, e: OSError) -> RunDirError:
    return RunDirError(f"cannot write to run directory {str(run_dir)!r} ({e.strerror or e}); choose a writable "
                       "run.output_dir")


def _write_marker(run_dir: Path) -> None:
    from .. import __version__

    (run_dir / MARKER).write_text(json.dumps({"directalign": __version__,
                                              "created": datetime.now(timezone.utc).isoformat()}) + "\n")


def _empty_keeping_lock(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but the lock file (see the module docstring for why not the directory)."""
    for entry in os.scandir(run_dir):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def prepare_run_dir(output_dir: str | Path, resume: bool, overwrite: bool,
                    lock: RunDirLock | None = None) -> Path:
    """Create the run directory (or replace it with ``overwrite``, or reuse it with ``resume``), write the marker
    and check it is writable; returns ``Path(output_dir)``.

    Everything happens under the directory's lock and the checks run again once it is held, so a run started
    between :func:`check_run_dir` and now is not deleted. Pass the ``lock`` the run will hold (``RunDirLock(d)``,
    held or not): it is left held on return, with no gap in which another process could take the directory. Without
    one, a lock is taken for the replacement only and dropped on return.
    """
    run_dir = Path(output_dir)
    _check(run_dir, resume, overwrite, held=False)  # refuse early, before the lock creates anything
    own = lock if lock is not None else RunDirLock(run_dir)
    if own.run_dir.resolve() != run_dir.resolve():
        raise ValueError(f"prepare_run_dir: lock is for {own.run_dir}, not {run_dir}")
    was_held = own.held
    own.acquire()
    try:
        exists = _check(run_dir, resume, overwrite, held=True)
        try:
            if resume:
                if not (run_dir / MARKER).is_file() and _is_legacy_run(run_dir):
                    _write_marker(run_dir)  # a pre-marker run adopts the marker; a foreign folder does not get one
                return run_dir
            if exists:
                _empty_keeping_lock(run_dir)
            _write_marker(run_dir)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise _unwritable(run_dir, e) from None
        return run_dir
    except BaseException:
        if not was_held:
            own.release()
        raise
    finally:
        if lock is None:
            own.release()
