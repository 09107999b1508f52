"""Weights out (issue 12): `GET /v1/models/{model}/export?format=adapter|merged` against a real `tuneworks api`,
called through the openai SDK, on a PEFT adapter of the tiny model; and `tuneworks models export`.

The merged model is checked against PEFT itself: loaded by `AutoModelForCausalLM.from_pretrained`, its logits
equal those of the base model with the adapter applied (to bf16 precision), and its weights are PEFT's own
`merge_and_unload()` weights to one bf16 rounding step.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import openai
import pytest
from sqlalchemy.engine import Engine

from core.base_models import TINY
from core.storage import ArtifactStore
from tests.conftest import ApiServer, tuneworks
from tests.service.adapters import config_of, make_adapter, register_model, tiny_path
from tests.service.conftest import server_with_models


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_dir: Path) -> Iterator[ApiServer]:
    """The API with the prepared base models in its FT_HOME (the export reads the base weights)."""
    api = server_with_models(tmp_path_factory.mktemp("api-home"), redis_url, models_dir)
    yield api
    api.stop()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter") / "adapter", seed=3)


@pytest.fixture(scope="module")
def model(server: ApiServer, db: Engine, adapter: Path) -> str:
    return register_model(db, ArtifactStore(server.settings.artifacts_dir), adapter)


def export(client: openai.OpenAI, model: str, fmt: str) -> httpx.Response:
    return client.get(f"/models/{quote(model, safe='')}/export", cast_to=httpx.Response,
                      options={"params": {"format": fmt}})  # fmt: skip


def unpack(response: httpx.Response, into: Path) -> Path:
    assert response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(into, filter="data")
    return into


def test_adapter_export_is_the_peft_adapter_with_the_tokenizer(client, model: str, adapter: Path,
                                                               tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = unpack(export(client, model, "adapter"), tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    assert config_of(out)["base_model_name_or_path"] == TINY
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.bfloat16), out
    )
    assert peft.peft_config["default"].r == 8  # type: ignore[attr-defined]


def test_merged_export_loads_and_equals_base_plus_adapter(client, model: str, adapter: Path,
                                                          tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = unpack(export(client, model, "merged"), tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.bfloat16)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.bfloat16), adapter
    )
    ids = torch.tensor([[1, 17, 256, 1024, 4096, 9, 33, 700]])
    with torch.no_grad():
        want, got, before = peft(ids).logits.float(), merged(ids).logits.float(), base(ids).logits.float()
    assert (want - before).abs().max() > 0.1  # the adapter changes the answer ...
    assert torch.allclose(got, want, atol=2e-2, rtol=0)  # ... and the merged model gives the adapted one
    reference = peft.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor.float(), reference[name].float(), rtol=2**-7, atol=0), name


def test_export_answers_only_the_models_project(server: ApiServer, client, db: Engine, adapter: Path,
                                                model: str) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    other = server.client(server.new_key("proj-other"))
    with pytest.raises(openai.NotFoundError) as caught:
        export(other, model, "adapter")
    assert caught.value.code == "model_not_found"  # type: ignore[attr-defined]
    doomed = register_model(db, ArtifactStore(server.settings.artifacts_dir), adapter, suffix="doomed")
    assert export(client, doomed, "adapter").status_code == 200
    client.models.delete(doomed)
    with pytest.raises(openai.NotFoundError):
        export(client, doomed, "merged")
    with pytest.raises(openai.NotFoundError):
        export(client, "ft:unknown:model", "adapter")


@pytest.mark.parametrize(
    ("target", "fmt", "param"), [("model", "gguf", "format"), (TINY, "adapter", "model")]
)
def test_bad_export_requests_are_400s_naming_the_field(client, model: str, target: str, fmt: str,
                                                       param: str) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        export(client, model if target == "model" else target, fmt)
    assert caught.value.param == param  # type: ignore[attr-defined]


def test_cli_export_writes_what_the_api_streams(server: ApiServer, client, model: str,
                                                tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    streamed = unpack(export(client, model, "merged"), tmp_path / "api")
    written = tmp_path / "cli"
    tuneworks("models", "export", model, "--format", "merged", "-o", str(written), settings=server.settings)
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in streamed.iterdir())
    for path in streamed.iterdir():
        assert (written / path.name).read_bytes() == path.read_bytes(), path.name
