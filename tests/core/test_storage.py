"""The artifact store on a real folder: atomic files, versioned folders that survive a crash at any step of
`put_dir` (a child process that dies at each step in turn), fences, and the API every process uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.storage import ArtifactStore, FenceLost
from tests.conftest import REPO

KEY = "jobs/ftjob-1/adapter"
OLD = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"old weights" * 100}
NEW = {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": b"new weights" * 200, "sub/x": b"x"}


def folder(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / name
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def contents(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(store: ArtifactStore, key: str) -> list[str]:
    link = store.root / key
    return sorted(
        p.name for p in link.parent.iterdir() if p.name != link.name and not p.name.startswith(".lock-")
    )


def test_files_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    store.write_bytes("files/file-1", b"hello")
    with pytest.raises(RuntimeError), store.writer("files/file-2") as handle:
        handle.write(b"half")
        raise RuntimeError("the upload broke off")
    assert store.exists("files/file-1") and not store.exists("files/file-2")
    assert store.size("files/file-1") == 5 and store.open("files/file-1").read() == b"hello"
    assert [p.name for p in (store.root / "files").iterdir()] == ["file-1"]  # no temporary left
    store.delete("files/file-1")
    store.delete("files/file-1")  # a missing key is fine
    assert not store.exists("files/file-1")


def test_keys_that_are_not_ours_are_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    for key in ["../x", "a/../../x", "/etc/passwd", "a//b", "a b"]:
        with pytest.raises(ValueError):
            store.path(key)


def test_put_dir_replaces_a_folder_and_path_is_the_current_copy(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    first = store.put_dir(KEY, folder(tmp_path, "old", OLD))
    assert contents(first) == OLD and first == store.path(KEY) and first.is_dir() and not first.is_symlink()
    assert store.root in first.parents
    second = store.put_dir(KEY, folder(tmp_path, "new", NEW))
    assert second != first and not first.exists()  # the old copy is gone once the key points at the new one
    assert contents(store.path(KEY)) == NEW and store.exists(KEY)
    assert (store.path(KEY) / "adapter_config.json").read_bytes() == NEW["adapter_config.json"]
    assert store.open(f"{KEY}/sub/x").read() == b"x"  # keys inside a folder resolve through it
    assert len(siblings(store, KEY)) == 1  # one copy: the current one
    store.delete(KEY)
    assert not store.exists(KEY) and siblings(store, KEY) == []


def test_put_dir_over_a_folder_written_before_versions(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    legacy = store.root / KEY
    legacy.parent.mkdir(parents=True)
    os.rename(folder(tmp_path, "old", OLD), legacy)
    assert contents(store.path(KEY)) == OLD
    store.put_dir(KEY, folder(tmp_path, "new", NEW))
    assert (store.root / KEY).is_symlink() and contents(store.path(KEY)) == NEW
    assert len(siblings(store, KEY)) == 1


def test_put_dir_fsyncs_every_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path / "store")
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    copy = store.put_dir(KEY, folder(tmp_path, "new", NEW))
    wanted = {str(copy / name) for name in NEW} | {str(copy), str(copy / "sub"), str(copy.parent)}
    assert wanted <= set(synced)


def test_a_fence_that_fails_keeps_the_old_copy(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    store.put_dir(KEY, folder(tmp_path, "old", OLD))
    with pytest.raises(FenceLost):
        store.put_dir(KEY, folder(tmp_path, "new", NEW), fence=lambda: False)
    with pytest.raises(FenceLost):
        store.write_bytes("files/file-1", b"late", fence=lambda: False)
    assert contents(store.path(KEY)) == OLD and len(siblings(store, KEY)) == 1
    assert not store.exists("files/file-1")
    store.put_dir(KEY, folder(tmp_path, "new", NEW), fence=lambda: True)
    assert contents(store.path(KEY)) == NEW


# A child that replaces KEY with NEW and dies (os._exit: no clean-up runs) at its `crash_at`-th file system step.
CHILD = """
import os, shutil, sys
from pathlib import Path
from core.storage import ArtifactStore

root, source, key, crash_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = 0

def step(function):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == crash_at:
            os._exit(17)
        return function(*args, **kwargs)
    return wrapper

for module, name in [(os, "replace"), (os, "rename"), (os, "symlink"), (os, "fsync"), (os, "unlink"),
                     (os, "rmdir"), (os, "mkdir"), (shutil, "copyfile"), (shutil, "rmtree")]:
    setattr(module, name, step(getattr(module, name)))
ArtifactStore(Path(root)).put_dir(key, Path(source))
"""


@pytest.mark.parametrize("layout", ["versioned", "before-versions"])
def test_put_dir_killed_at_any_step_leaves_a_complete_copy(tmp_path: Path, layout: str) -> None:
    store = ArtifactStore(tmp_path / "store")
    old, new = folder(tmp_path, "old", OLD), folder(tmp_path, "new", NEW)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    crashes = leftovers = 0
    for crash_at in range(1, 200):
        store.delete(KEY)
        if layout == "versioned":
            store.put_dir(KEY, old)
        else:
            (store.root / KEY).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-r", str(old), str(store.root / KEY)], check=True)
        child = subprocess.run([sys.executable, "-c", CHILD, str(store.root), str(new), KEY, str(crash_at)],
                               env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert child.returncode in {0, 17}, child.stderr
        seen = contents(store.path(KEY))
        assert seen in (OLD, NEW), f"killed at step {crash_at}: the key resolves to {sorted(seen)}"
        if child.returncode == 0:
            assert seen == NEW
            break
        crashes += 1
        store.put_dir(KEY, new)  # the next writer cleans up what the dead one left
        leftovers = max(leftovers, len(siblings(store, KEY)) - 1)
    assert crashes >= 8  # every step of the copy, the fsyncs, the switch and the clean-up was interrupted
    assert leftovers == 0
