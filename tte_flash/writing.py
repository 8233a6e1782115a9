"""Guarded writes into an output folder: one writer at a time, whole files only, contents checked on read.

Used by the shard writer (:func:`tte_flash.encoding.encode_to_shards`) and the MMEB-V2 runner
(:func:`tte_flash.mmeb.run_benchmark`).

* :func:`folder_lock`: an exclusive lock on an output folder for as long as a run writes it. The lock is an OS
  lock (``filelock``: ``flock`` on Linux), so it goes away when its process ends, ``kill -9`` included: a
  lock file left behind never blocks. The holder's pid, host, start time and command are written beside the
  lock (``<lock>.owner``) so that a second writer's error names them. Shard folders are also written by
  the parts of a split run (``part=(i, n)``, one process per device): each part holds its own lock
  (``.writer-part-i-of-n.lock``) and parts of one split run side by side; every other combination
  (two whole runs, a whole run and a part, parts of two different splits, an ``overwrite``) is refused; a
  writer that clears the folder (``overwrite``) holds it whole.
* :func:`atomic_write_bytes`: the bytes go to ``.<name>.tmp-<pid>`` in the same folder, are fsynced and renamed
  over the final name; on any failure (a full disk included) the temporary file is removed and the error
  names the file.
* :func:`sha256_bytes`: the content hash that shard records, score files and caches carry.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

LOCK = ".writer.lock"  # a whole-folder writer's lock (and every writer's, briefly, to check the others)
PART_LOCK = ".writer-part-{}-of-{}.lock"  # one part of a split run
_PART_RE = re.compile(r"^\.writer-part-(\d+)-of-(\d+)\.lock$")
# How long a writer waits for a lock held *briefly* (a part checking the folder or recording its manifest
# takes milliseconds); a lock held for a whole run is refused at once.
LOCK_WAIT = 10.0
_POLL = 0.05


class FolderLockedError(ValueError):
    """Another process is writing the output folder. A ``ValueError`` so that command lines print it as a
    usage error (``tte-flash encode: error: ...``), never as a stack trace."""


def is_writer_file(name: str) -> bool:
    """A file this module leaves in a folder: a lock, its owner record, or a temporary file."""
    return name.startswith(".writer") or ".tmp-" in name


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    """The SHA-256 of an object's canonical JSON (keys sorted, after a JSON round trip, so a dict read back
    from a file hashes as the dict that was written)."""
    canonical = json.loads(json.dumps(obj))
    return sha256_bytes(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())


# ---------------------------------------------------------------------------------- whole files only

def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[object], None]) -> None:
    """Write ``data`` (bytes, or a function writing into a binary file handle) to ``path`` whole or not at
    all: a temporary name, fsync, rename. The temporary file never survives a failure (``OSError`` naming
    ``path``, e.g. a full disk; or an interrupt)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and str(path) not in str(err):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err  # same subclass
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of writers that died (``kill -9``) in ``folder``; call it only while no
    other writer can be active there (a whole-folder lock held). Returns what was removed."""
    stale = [p for p in folder.iterdir() if ".tmp-" in p.name and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------------- one writer at a time

def _owner_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def _holder(lock_path: Path) -> str:
    try:
        owner = json.loads(_owner_path(lock_path).read_text())
        text = f"pid {owner['pid']} on host {owner['host']} (since {owner['since']}"
        return text + (f", {owner['command']})" if owner.get("command") else ")")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


def _try_lock(lock_path: Path):
    """The acquired lock, or None when another holder has it (never waits)."""
    from filelock import FileLock, Timeout  # a dependency of huggingface_hub; imported here, where it is used
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _command() -> str | None:
    """This process's command line, short (``python -m tte_flash encode ...`` for a module run)."""
    if not sys.argv or not sys.argv[0]:
        return None
    program = Path(sys.argv[0])
    name = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    return " ".join([name, *sys.argv[1:]])[:300]


def _record_owner(lock_path: Path, hold: str):
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "hold": hold,
             "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": _command()}
    atomic_write_bytes(_owner_path(lock_path), json.dumps(owner).encode())


def _release(lock, lock_path: Path):
    _owner_path(lock_path).unlink(missing_ok=True)
    lock.release()


def _acquire(folder: Path, lock_path: Path, hold: str, wait: float):
    """Take ``lock_path``, waiting up to ``wait`` seconds while its holder holds it briefly; refused at once
    when the holder holds it for a whole run (its owner record says so)."""
    deadline = time.monotonic() + wait
    while True:
        lock = _try_lock(lock_path)
        if lock is not None:
            _record_owner(lock_path, hold)
            return lock
        brief = _owner_hold(lock_path) in ("brief", None)
        if not brief or time.monotonic() > deadline:
            raise FolderLockedError(f"{folder} is being written by {_holder(lock_path)}; wait until it ends or "
                                    "choose another output folder (the lock goes away when that process ends)")
        time.sleep(_POLL)


def _owner_hold(lock_path: Path) -> str | None:
    """How the holder holds the lock (``run`` or ``brief``) as its record says; None when there is no record
    or it is a dead process's (killed before it could remove it)."""
    try:
        owner = json.loads(_owner_path(lock_path).read_text())
        if owner["host"] == socket.gethostname():
            os.kill(owner["pid"], 0)  # ProcessLookupError: the record outlived its process
        return owner.get("hold")
    except PermissionError:  # alive, another user's
        return owner.get("hold")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def _held_parts(folder: Path, part: tuple[int, int], everything: bool) -> list[tuple[Path, tuple[int, int]]]:
    """The part locks in ``folder`` held by other processes whose shards may overlap ours."""
    worker, workers = part
    held = []
    for path in sorted(folder.iterdir()):
        match = _PART_RE.match(path.name)
        if not match:
            continue
        other = (int(match.group(1)), int(match.group(2)))
        if other == part:
            continue  # our own (held by us)
        disjoint = not everything and workers > 1 and other[1] == workers and other[0] != worker
        if disjoint:
            continue
        probe = _try_lock(path)
        if probe is None:
            held.append((path, other))
        else:
            probe.release()
    return held


class FolderLock:
    """What :func:`folder_lock` yields: :meth:`briefly` holds the whole-folder lock for a short step (a part
    recording its results in a shared manifest); a whole-folder writer holds it already."""

    def __init__(self, folder: Path, whole_lock=None):
        self.folder, self._whole = folder, whole_lock

    @property
    def whole(self) -> bool:
        """True when this writer holds the whole folder (no other writer can be active until it ends)."""
        return self._whole is not None

    @contextlib.contextmanager
    def briefly(self) -> Iterator[None]:
        if self._whole is not None:
            yield
            return
        path = self.folder / LOCK
        lock = _acquire(self.folder, path, "brief", LOCK_WAIT)
        try:
            yield
        finally:
            _release(lock, path)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, part: tuple[int, int] = (0, 1), overwrite: bool = False) \
        -> Iterator[FolderLock]:
    """Hold ``folder`` (which must exist) exclusively while the body writes it; :class:`FolderLockedError`
    naming the holder (pid, host, command) when another writer holds it.

    ``part=(i, n)`` with ``n > 1``: one part of a split run; parts ``j != i`` of the same split ``n`` may run
    at the same time (they write other shards), any other writer not. ``overwrite``: this writer clears
    the folder, so no other writer at all may be active. The body runs its setup steps (reading and
    writing a manifest) under :meth:`FolderLock.briefly`."""
    folder = Path(folder)
    worker, workers = part
    everything = workers == 1 or overwrite
    own = None
    if workers > 1:  # our part's lock first, then the others checked under the folder lock (so two writers
        own_path = folder / PART_LOCK.format(worker, workers)  # starting together cannot both pass)
        own = _acquire(folder, own_path, "run", LOCK_WAIT)
    try:
        whole_path = folder / LOCK
        whole = _acquire(folder, whole_path, "run" if everything else "brief", LOCK_WAIT)
        try:
            held = _held_parts(folder, part, everything)
            if held:
                path, (i, n) = held[0]
                what = "clears the folder" if overwrite else "writes every shard" if workers == 1 else \
                    f"is part {worker}/{workers}"
                raise FolderLockedError(f"{folder} is being written by part {i}/{n} of another run, {_holder(path)}; "
                                        f"this run {what} and would mix with it: wait until it ends or choose "
                                        "another output folder")
        except BaseException:
            _release(whole, whole_path)
            raise
        if not everything:  # a part: the folder lock was for the check only
            _release(whole, whole_path)
            whole = None
        try:
            yield FolderLock(folder, whole)
        finally:
            if whole is not None:
                _release(whole, whole_path)
    finally:
        if own is not None:
            _release(own, own_path)


def remove_lock_files(folder: Path) -> None:
    """Remove the lock and owner files this module left in ``folder`` (after every lock there was released,
    e.g. to remove a folder this run created and wrote nothing into)."""
    for path in folder.iterdir():
        if path.name.startswith(".writer") and path.is_file():
            path.unlink(missing_ok=True)
