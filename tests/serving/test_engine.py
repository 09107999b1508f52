"""The vLLM command and environment `tuneworks serve` builds (no server started)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from core.base_models import BaseModel
from core.settings import SMOLLM2, Settings
from serving.engine import VllmServer


def server(home: Path, **settings: object) -> VllmServer:
    model = BaseModel(SMOLLM2, "path", home / "models" / "smollm2")
    return VllmServer(settings=Settings(home=home, base_models=SMOLLM2, **settings), model=model)


def test_vllm_sockets_fit_in_a_unix_socket_path_under_a_deep_home(tmp_path: Path) -> None:
    """vLLM binds `ipc://$TMPDIR/<uuid>`; a socket path holds 107 bytes, so a deep FT_HOME gets a short TMPDIR."""
    short = Path(tempfile.mkdtemp(prefix="tw-"))
    try:
        shallow = server(short / "h")
        assert Path(shallow.environment()["TMPDIR"]) == shallow.settings.home_dir / "tmp"
    finally:
        shutil.rmtree(short)
    deep = server(tmp_path / ("d" * 60) / "home")
    tmp = Path(deep.environment()["TMPDIR"])
    assert len(f"ipc://{tmp}/00000000-0000-0000-0000-000000000000") <= 107
    assert tmp.is_dir() and (tmp.stat().st_mode & 0o777) == 0o700
    assert deep.environment()["TMPDIR"] == str(tmp)  # the same folder across restarts
    asyncio.run(deep.stop())
    assert not tmp.exists()


def test_the_key_reaches_vllm_in_its_environment_not_its_command_line(tmp_path: Path) -> None:
    keyed = server(tmp_path / "h", vllm_api_key="k-123")
    assert keyed.environment()["VLLM_API_KEY"] == "k-123"
    assert "k-123" not in " ".join(keyed.command())
    assert "VLLM_API_KEY" not in server(tmp_path / "h2").environment()
