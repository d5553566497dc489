"""A `vlmeff eval` run folder: locked while in use, and resumed only with the settings it was started with.

Lock. `RunFolder` takes an exclusive `fcntl.flock` on ``<folder>/.vlmeff.lock`` (non-blocking) before anything is
written, and holds it until the run ends. The kernel drops the lock with the process, so a run killed with SIGKILL
leaves no stale lock (the file may stay; it is ignored). A second process gets `RunFolderBusyError` naming the
folder and the PID written in the lock file. The lock file is removed when the run ends; since another process may
have opened it just before, a process that got the lock checks that the path still names the file it locked, and
retries otherwise (the usual flock-and-unlink protocol).

Settings. Every run records in run.json, under "settings", what decides its answers (model, data, splits, limit,
parser, dtype, max new tokens, decoding, seed, batch size: `vlmeff.eval.runner.eval_settings`). A resume whose
settings differ raises `ResumeMismatchError` naming each differing setting with its recorded and its new value,
before anything is written; the lock is released and the folder left as it was.

run.json is written atomically (temporary file + os.replace), so a killed process never leaves it torn.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

LOCK_NAME = ".vlmeff.lock"
RUN_JSON = "run.json"


class RunFolderError(Exception):
    """A run folder that cannot be used as asked (the message names the folder and what to do)."""

    exit_code = 2


class RunFolderBusyError(RunFolderError):
    """Another process holds the run folder's lock."""

    exit_code = 1


class ResumeMismatchError(RunFolderError):
    """--resume with settings that differ from the ones recorded in run.json."""


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name: recorded -> new"`` for every setting whose value differs (a setting only one side has counts)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "<not recorded>"), current.get(key, "<not given>")
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            out.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` through a temporary file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunFolder:
    """The lock and the recorded settings of one run folder; use as a context manager (`open` ... `close`)."""

    def __init__(self, path: str | os.PathLike, *, resume: bool, settings: dict[str, Any]):
        self.path = Path(path)
        self.resume = resume
        self.settings = settings
        self._fd: int | None = None
        self._created = False  # this process made the folder: removed again if the run leaves it empty

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    def __enter__(self) -> RunFolder:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def contents(self) -> list[Path]:
        """What the folder holds besides the lock file."""
        try:
            return [p for p in self.path.iterdir() if p.name != LOCK_NAME]
        except OSError as e:
            raise RunFolderError(f"--output {self.path}: cannot list the folder ({e.strerror})") from None

    def open(self) -> None:
        """Lock the folder (a folder in use is refused first, whatever else is wrong), then refuse a non-empty folder
        without --resume and, on --resume, settings that differ; on any refusal nothing is left behind."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--output {self.path} is a file, not a folder; give a folder for the run")
        created = self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
        except BaseException as e:
            self._remove_if_created(created)
            if isinstance(e, OSError):
                raise RunFolderError(f"--output {self.path}: cannot write in this folder ({e.strerror})") from None
            raise
        try:
            if self.contents() and not self.resume:
                raise FileExistsError(f"output folder {self.path} is not empty: pass --resume to continue it, or a "
                                      "new --output")
            if self.resume:
                self._check_settings()
        except BaseException:
            self.close()
            raise

    def _remove_if_created(self, created: bool) -> None:
        if created:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                who = f"PID {holder}" if holder.isdigit() else "another process"
                raise RunFolderBusyError(f"run folder {self.path} is in use by {who} (a vlmeff run holds its lock); "
                                         "wait for it to end, or give another --output") from None
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one

    def _check_settings(self) -> None:
        run_json = self.path / RUN_JSON
        if not run_json.is_file():
            return  # nothing recorded: a run stopped before its first question, or not a vlmeff run folder
        try:
            recorded = json.loads(run_json.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResumeMismatchError(f"{run_json} cannot be read ({e}); the settings of the run cannot be checked: "
                                      "restore the file, or start a new --output") from None
        if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
            print(f"vlmeff: warning: {run_json} records no settings (an older vlmeff wrote it); resuming without "
                  "checking that they match", file=sys.stderr)
            return
        diffs = settings_differences(recorded["settings"], self.settings)
        if diffs:
            raise ResumeMismatchError(f"--resume with settings that differ from the run in {self.path}: "
                                      f"{'; '.join(diffs)}. Rerun with the recorded settings, or give a new --output")

    def write_run_json(self, env: dict[str, Any]) -> None:
        """run.json = `env` plus the settings (atomically); only while the lock is held."""
        if self._fd is None:
            raise RuntimeError(f"run folder {self.path} is not locked by this process")
        write_json_atomic(self.path / RUN_JSON, {**env, "settings": self.settings})

    def close(self) -> None:
        """Remove the lock file and release the lock (removal first: whoever opens the file later sees it gone); a
        folder this run created and left empty (it failed before writing anything) is removed too."""
        if self._fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created and not self.contents():
            self._remove_if_created(True)
