"""Weights in (issue 12): `POST /v1/models/import` against a real `tuneworks api` through the openai SDK. A PEFT
adapter of the tiny model becomes a listed `ft:` model, stored and announced like a trained one (the export
returns its weights); every refused archive is a 400 naming the field, and leaves nothing stored."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
from openai.types import Model
from safetensors.numpy import save_file
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core import queue
from core.base_models import TINY
from core.storage import ArtifactStore
from core.tables import ModelRow
from serving.materialise import materialise
from tests.conftest import ApiServer, tuneworks
from tests.service.adapters import make_adapter, tar_of
from tests.service.conftest import server_with_models
from tests.service.test_api_export import export, unpack


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_dir: Path) -> Iterator[ApiServer]:
    api = server_with_models(
        tmp_path_factory.mktemp("api-home"), redis_url, models_dir, vllm_max_lora_rank=16
    )
    yield api
    api.stop()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter") / "adapter", seed=5)


def upload(client: openai.OpenAI, archive: bytes, *, name: str = "adapter.tar", **fields: str) -> Model:
    return client.post("/models/import", cast_to=Model, body=fields, files=[("file", (name, archive))],
                       options={"headers": {"Content-Type": "multipart/form-data"}})  # fmt: skip


def stored(server: ApiServer, db: Engine) -> tuple[list[str], list[str]]:
    """What imports left: the store's import folders and the imported model rows."""
    root = ArtifactStore(server.settings.artifacts_dir).root / "imports"
    with Session(db) as session:
        rows = session.exec(select(ModelRow.id).where(ModelRow.job_id.startswith("ftimp-"))).all()  # type: ignore[attr-defined]
    return sorted(p.name for p in root.iterdir()) if root.exists() else [], list(rows)


def listen(url: str) -> list[queue.AdapterEvent]:
    heard: list[queue.AdapterEvent] = []

    def run() -> None:
        with redis.Redis.from_url(url) as client, client.pubsub() as pubsub:
            pubsub.subscribe(queue.ADAPTER_CHANNEL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not heard:
                message = pubsub.get_message(timeout=0.5)
                if message and message["type"] == "message":
                    heard.append(queue.AdapterEvent.model_validate_json(message["data"]))

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.3)  # let the subscriber attach
    return heard


def test_import_registers_a_servable_model_and_announces_it(server: ApiServer, client, db: Engine, adapter: Path,
                                                            tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    heard = listen(server.settings.resolved_redis_url)
    model = upload(client, tar_of(adapter, prefix="my-adapter/", gz=True), model=TINY, suffix="imported")
    assert model.id.startswith(f"ft:{TINY}:proj-test:imported:ftimp-") and model.owned_by == "proj-test"
    assert model.id in {m.id for m in client.models.list()}
    for _ in range(40):
        if heard:
            break
        time.sleep(0.5)
    assert heard and (heard[0].event, heard[0].model) == ("ready", model.id)
    with Session(db) as session:
        row = session.exec(select(ModelRow).where(ModelRow.id == model.id)).one()
    folder = ArtifactStore(server.settings.artifacts_dir).path(row.storage_key)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY
    served = materialise(
        settings=server.settings, store=ArtifactStore(server.settings.artifacts_dir), row=row
    )
    assert served.name == row.job_id  # what the serve process hands vLLM, as for a trained adapter
    out = unpack(export(client, model.id, "adapter"), tmp_path)  # weights out = weights in
    assert (out / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_zip_import_takes_the_base_model_from_the_adapter_config(
    client, adapter: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((adapter / "adapter_config.json").read_text())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({**config, "base_model_name_or_path": TINY}))
        archive.write(adapter / "adapter_model.safetensors", "adapter_model.safetensors")
        archive.writestr("README.md", "ignored")
    model = upload(client, buffer.getvalue(), name="adapter.zip")
    assert model.parent == TINY and ":ftimp-" in model.id  # type: ignore[attr-defined]


def _with_config(adapter: Path, tmp_path: Path, **changes: object) -> bytes:
    folder = tmp_path / "changed"
    folder.mkdir()
    config = {**json.loads((adapter / "adapter_config.json").read_text()), **changes}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    return tar_of(folder)


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info in members:
            if info.isreg():
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _wrong_shapes(tmp_path: Path) -> bytes:
    """An adapter whose shapes are another model's (hidden size 32, not 64)."""
    import numpy as np

    folder = tmp_path / "other-model"
    folder.mkdir()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": np.ones((4, 32), np.float32),
               f"{key}.lora_B.weight": np.ones((32, 4), np.float32)}, str(folder / "adapter_model.safetensors"))  # fmt: skip
    return tar_of(folder)


REFUSED = {
    "rank over the server's limit": (lambda a, t: make_archive_rank(t), "file"),
    "unsupported target module": (lambda a, t: _with_config(a, t, target_modules=["lm_head"]), "file"),
    "DoRA": (lambda a, t: _with_config(a, t, use_dora=True), "file"),
    "not LoRA": (lambda a, t: _with_config(a, t, peft_type="IA3"), "file"),
    "pickled weights": (lambda a, t: tar_of(a, extra={"adapter_model.bin": b"\x80\x04pickle"}), "file"),
    "symlink": (lambda a, t: _tar(_member("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd")), "file"),
    "zip symlink": (lambda a, t: _zip_symlink(), "file"),
    "dot-dot path": (lambda a, t: _tar(_member("../adapter_config.json")), "file"),
    "absolute path": (lambda a, t: _tar(_member("/tmp/adapter_config.json")), "file"),
    "no adapter in it": (lambda a, t: _tar(_member("README.md")), "file"),
    "not an archive": (lambda a, t: b"just some text, not a tar", "file"),
    "another model's shapes": (lambda a, t: _wrong_shapes(t), "file"),
}  # fmt: skip


def _zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def make_archive_rank(tmp_path: Path) -> bytes:
    return tar_of(make_adapter(tmp_path / "rank32", rank=32, alpha=32))


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_archives_are_400s_and_store_nothing(server: ApiServer, client, db: Engine, adapter: Path,
                                                     tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    build, param = REFUSED[case]
    before = stored(server, db)
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, build(adapter, tmp_path), model=TINY)
    assert caught.value.param == param, caught.value.message  # type: ignore[attr-defined]
    assert stored(server, db) == before


@pytest.mark.parametrize(("fields", "param"), [({"model": "no/such-model"}, "model"),
                                               ({"model": TINY, "suffix": "bad:suffix"}, "suffix")])  # fmt: skip
def test_bad_fields_are_400s_naming_them(server: ApiServer, client, db: Engine, adapter: Path, fields: dict,
                                         param: str) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    before = stored(server, db)
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, tar_of(adapter), **fields)
    assert caught.value.param == param  # type: ignore[attr-defined]
    assert stored(server, db) == before


def test_missing_file_is_a_400(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/models/import", cast_to=Model, body={"model": TINY}, files=[("other", ("x", b"x"))],
                    options={"headers": {"Content-Type": "multipart/form-data"}})  # fmt: skip
    assert caught.value.param == "file"  # type: ignore[attr-defined]


def test_cli_import_registers_the_model(server: ApiServer, client, adapter: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    archive = tmp_path / "adapter.tar"
    archive.write_bytes(tar_of(adapter))
    name = tuneworks("models", "import", str(archive), "--project", "proj-test", "--model", TINY, "--suffix", "cli",
                     settings=server.settings).stdout.strip()  # fmt: skip
    assert name.startswith(f"ft:{TINY}:proj-test:cli:ftimp-")
    assert client.models.retrieve(name).id == name
