"""The API against its own OpenAPI document, with schemathesis: for every operation but the inference ones (they need
vLLM), requests generated from the schema, valid and not, with a valid key, never get a 5xx, and every response
conforms to what the document declares for it (status code, and the body of that status).

The document is built at collection (schemathesis' lazy pytest loader does not run under pytest 9) by the app
factory, and a test checks that the running `tuneworks api` serves exactly it at `/openapi.json`.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from core.settings import Settings
from service.app import create_app
from tests.conftest import ApiServer
from tests.service.conftest import chat_file, service_settings

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
INFERENCE = r"^/v1/(chat/)?completions$"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ApiServer]:
    home = tmp_path_factory.mktemp("schema-home")
    api = ApiServer(service_settings(home, redis_url), home / "api.log")
    with api.client() as client:  # something to find: a file and a job
        file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
        client.fine_tuning.jobs.create(model="tuneworks/tiny-random-llama", training_file=file_id)
    yield api
    api.stop()


DOCUMENT = create_app(Settings()).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path_regex=INFERENCE)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_and_never_fails(case: schemathesis.Case, fuzzed: ApiServer) -> None:
    root = fuzzed.base_url.removesuffix("/v1")
    case.call_and_validate(base_url=root, headers={"Authorization": f"Bearer {fuzzed.key}"}, checks=CHECKS)


def test_the_running_api_serves_this_document_without_422s(fuzzed: ApiServer) -> None:
    document = httpx.get(fuzzed.base_url.removesuffix("/v1") + "/openapi.json").json()
    assert document == DOCUMENT
    paths = set(document["paths"])
    assert {"/v1/files", "/v1/files/{file_id}", "/v1/fine_tuning/jobs", "/v1/models/{model}"} <= paths
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)  # errors are 400, never 422
