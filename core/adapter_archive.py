"""Unpacking an uploaded adapter archive (tar, tar.gz/bz2/xz or zip) safely, before any of it is trusted.

Only two files are taken out, `adapter_config.json` and `adapter_model.safetensors`, from the archive's root or
from one folder; everything else (a README, tokenizer files) is ignored. The archive is refused when a member
has an absolute path or a `..` part, is a link or a device, repeats a name, when the members announce more than
`max_bytes` in all or there are more than `MAX_MEMBERS` of them, or when it holds pickled weights (`.bin`, `.pt`,
...: safetensors only).
"""

from __future__ import annotations

import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from core.lora_adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError

MAX_MEMBERS = 256
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
_WANTED = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass(frozen=True)
class _Entry:
    name: str  # the member's path in the archive, normalised
    size: int
    kind: str  # "file" | "dir" | "other"


def unpack(archive: Path, dest: Path, *, max_bytes: int) -> Path:
    """Check `archive` and write its adapter's two files into `dest` (an existing empty folder).

    Returns:
        `dest`.

    Raises:
        AdapterError: not an archive, an unsafe member, pickled weights, too large, or no adapter in it.
    """
    with _opened(archive) as (entries, read):
        names = _check(entries, max_bytes=max_bytes)
        for wanted in _WANTED:
            try:
                with read(names[wanted]) as source, (dest / wanted).open("wb") as target:
                    _copy(source, target, limit=max_bytes)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
                raise AdapterError(f"the archive is damaged: {exc}") from None
    return dest


@contextmanager
def _opened(archive: Path) -> Iterator[tuple[list[_Entry], Any]]:
    """The archive's members and a function that opens one by its normalised name."""
    if zipfile.is_zipfile(archive):
        try:
            bundle = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as exc:
            raise AdapterError(f"the zip archive is damaged: {exc}") from None
        with bundle:
            infos = bundle.infolist()
            names = {_normal(info.filename): info for info in infos}
            yield [_zip_entry(info) for info in infos], lambda name: bundle.open(names[name])
        return
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115  closed by the `with` below
    except (tarfile.TarError, EOFError, OSError):
        raise AdapterError("the file is not a tar or zip archive of a PEFT adapter folder") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise AdapterError(f"the tar archive is damaged: {exc}") from None
        by_name = {_normal(m.name): m for m in members}
        yield [_tar_entry(m) for m in members], lambda name: _tar_file(tar, by_name[name])


@contextmanager
def _tar_file(bundle: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[IO[bytes]]:
    handle = bundle.extractfile(member)
    assert handle is not None  # a regular file, checked before
    with handle:
        yield handle


def _zip_entry(info: zipfile.ZipInfo) -> _Entry:
    mode = info.external_attr >> 16
    if info.is_dir():
        kind = "dir"
    elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # no type bits: a file (as `writestr` stores it)
        kind = "other"  # a symlink (or a device) stored with its Unix mode
    else:
        kind = "file"
    return _Entry(info.filename, info.file_size, kind)


def _tar_entry(member: tarfile.TarInfo) -> _Entry:
    kind = "file" if member.isreg() else "dir" if member.isdir() else "other"
    return _Entry(member.name, member.size, kind)


def _normal(name: str) -> str:
    return str(PurePosixPath(name.removeprefix("./"))) if name not in (".", "./") else "."


def _check(entries: list[_Entry], *, max_bytes: int) -> dict[str, str]:
    """The archive names of the config and the weights, after every member passed the checks."""
    if len(entries) > MAX_MEMBERS:
        raise AdapterError(f"the archive has more than {MAX_MEMBERS} members")
    seen: set[str] = set()
    total = 0
    for entry in entries:
        _check_path(entry)
        name = _normal(entry.name)
        if name in seen and entry.kind != "dir":
            raise AdapterError(f"the archive holds {entry.name!r} twice")
        seen.add(name)
        total += entry.size
        if total > max_bytes:
            raise AdapterError(f"the archive unpacks to more than {max_bytes} bytes")
    files = [_normal(e.name) for e in entries if e.kind == "file"]
    pickled = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise AdapterError(
            f"pickled files are not accepted ({pickled[0]}): save the adapter with safetensors"
        )
    configs = [name for name in files if PurePosixPath(name).name == CONFIG_FILE]
    if len(configs) != 1:
        raise AdapterError(f"not a PEFT adapter: the archive must hold exactly one {CONFIG_FILE}")
    folder = PurePosixPath(configs[0]).parent
    if len(folder.parts) > 1:
        raise AdapterError(f"{CONFIG_FILE} must be at the archive's root or in one folder")
    weights = str(folder / WEIGHTS_FILE)
    if weights not in files:
        raise AdapterError(f"not a PEFT adapter: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    return {CONFIG_FILE: configs[0], WEIGHTS_FILE: weights}


def _check_path(entry: _Entry) -> None:
    name = entry.name
    if entry.kind == "other":
        raise AdapterError(
            f"the archive member {name!r} is a link or a special file: only files are accepted"
        )
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name or "\0" in name:
        raise AdapterError(f"the archive member {name!r} has an absolute or non-POSIX path")
    if ".." in PurePosixPath(name).parts:
        raise AdapterError(f"the archive member {name!r} has a `..` in its path")


def _copy(source: IO[bytes], target: IO[bytes], *, limit: int) -> None:
    written = 0
    while chunk := source.read(1024 * 1024):
        written += len(chunk)
        if written > limit:
            raise AdapterError(f"the archive unpacks to more than {limit} bytes")
        target.write(chunk)
