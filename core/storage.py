"""The artifact store: uploaded files, adapters, checkpoints and result files, addressed by key.

Keys are relative POSIX paths that we build ourselves (`files/<file id>`, `jobs/<job id>/adapter`); user input
never becomes a key. The local implementation writes under one root folder (a shared volume in Kubernetes).

Crash safety, so that at every instant a key resolves to a complete old or new copy:
- a file (`writer`, `write_bytes`) is written under a temporary name, fsynced, renamed onto the key, and the
  folder fsynced;
- a folder (`put_dir`) is never changed in place: each copy is written, fsynced, into a hidden version folder
  `.v-<random>-<name>` beside the key, and the key itself is a symlink that one `os.replace` switches to the
  new copy. Old copies are deleted after the switch (and leftovers of a crashed writer by the next one).
  `path()` resolves the link, so readers get the current copy's folder and keep it while they read it.

Writers that may have lost the right to write (a worker whose lease was taken) pass a `fence`: it is called
under the key's lock right before the switch, and a False answer refuses the write with `FenceLost`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO

from core.locks import file_lock

_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
# Siblings of a folder key `<name>`: its versions and the temporary links of a switch.
_SIBLING = re.compile(r"^\.(?:v|tmp)-[0-9a-f]{32}-(?P<name>.+)$")
_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically
_AT_FDCWD = -100

Fence = Callable[[], bool]


class FenceLost(Exception):
    """A fenced write was refused: the writer no longer holds the right to write this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"write of {key} refused: the writer lost its fence (lease)")
        self.key = key


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The local path of `key` (for a folder: its current complete copy).

        Raises:
            ValueError: the key is not one of ours, or it escapes the store.
        """
        path = self._location(key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return path

    @contextmanager
    def writer(self, key: str, *, fence: Fence | None = None) -> Iterator[BinaryIO]:
        """Write file `key` atomically: it appears only when the block ends without an exception.

        Raises:
            FenceLost: `fence` answered False when the file was about to replace the key.
        """
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            with self._lock(target) if fence else nullcontext():
                if fence is not None and not fence():
                    raise FenceLost(key)
                os.replace(tmp, target)
            _fsync(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_bytes(self, key: str, data: bytes, *, fence: Fence | None = None) -> None:
        with self.writer(key, fence=fence) as handle:
            handle.write(data)

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def delete(self, key: str) -> None:
        """Remove `key` (a file or a folder with all its copies); a missing key is fine."""
        link = self._location(key)
        if link.is_symlink():
            with self._lock(link):
                link.unlink(missing_ok=True)
                _fsync(link.parent)
                _prune(link, keep=None)
        elif link.is_dir():
            shutil.rmtree(link, ignore_errors=True)
        else:
            link.unlink(missing_ok=True)

    def put_dir(self, key: str, source: Path, *, fence: Fence | None = None) -> Path:
        """Copy folder `source` to `key`, replacing what was there; crash-safe (see the module docstring).

        Args:
            key: the folder's key.
            source: a local folder.
            fence: called under the key's lock before the switch; False refuses the write.

        Returns:
            The local path of the new copy (what `path(key)` now returns).

        Raises:
            FenceLost: `fence` answered False; the key still resolves to its old copy.
        """
        link = self._location(key)
        link.parent.mkdir(parents=True, exist_ok=True)
        version = link.with_name(f".v-{uuid.uuid4().hex}-{link.name}")
        # One writer per key at a time: a writer's clean-up must not take a copy that another is still writing.
        with self._lock(link):
            try:
                shutil.copytree(source, version)
                _fsync_tree(version)
                _fsync(link.parent)
                if fence is not None and not fence():
                    raise FenceLost(key)
            except BaseException:
                shutil.rmtree(version, ignore_errors=True)
                raise
            _switch(link, version)
            _fsync(link.parent)
            _prune(link, keep=version.name)
        return self.path(key)

    def _location(self, key: str) -> Path:
        """`key` under the root, unresolved (a folder key is the link itself)."""
        if not _KEY.match(key) or any(part in {".", ".."} for part in key.split("/")):
            raise ValueError(f"invalid artifact key: {key!r}")
        return self.root.joinpath(*key.split("/"))

    def _lock(self, location: Path) -> AbstractContextManager[None]:
        return file_lock(location.with_name(f".lock-{location.name}"))


def _switch(link: Path, version: Path) -> None:
    """Point `link` at `version` in one atomic step (a folder of the layout before versions is swapped out)."""
    temporary = link.with_name(f".tmp-{uuid.uuid4().hex}-{link.name}")
    os.symlink(version.name, temporary)  # relative: the store may be mounted elsewhere
    if link.is_dir() and not link.is_symlink():
        _exchange(temporary, link)
        shutil.rmtree(temporary, ignore_errors=True)  # now the old folder
    else:
        os.replace(temporary, link)


def _exchange(first: Path, second: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE). Where the filesystem cannot (NFS), three renames
    leave the key missing for a moment: only once per folder written before versions existed."""
    call = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if call is not None:
        status = call(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        if status == 0:
            return
        if ctypes.get_errno() not in {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(second))
    away = second.with_name(f".v-{uuid.uuid4().hex}-{second.name}")
    os.replace(second, away)
    os.replace(first, second)
    os.replace(away, first)


def _prune(link: Path, *, keep: str | None) -> None:
    """Delete the copies and temporary links of folder key `link` except `keep`."""
    for child in link.parent.iterdir():
        match = _SIBLING.match(child.name)
        if match is None or match["name"] != link.name or child.name == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for directory, _subdirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
