"""Keys and tenancy (checklist item 14): missing, wrong and revoked keys are 401; another project's files, jobs
and models are 404; OpenAI-Organization / OpenAI-Project headers are accepted; errors carry `x-request-id`."""

from __future__ import annotations

import subprocess
import time

import httpx
import openai
import pytest
from sqlmodel import Session, select

from core.tables import ApiKey, JobRow, ModelRow
from tests.conftest import ApiServer, tuneworks
from tests.service.conftest import chat_file

TINY = "tuneworks/tiny-random-llama"


def test_missing_or_wrong_key_is_401_with_envelope(server: ApiServer) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-tw-wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.get(f"{server.base_url}/files", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.headers["x-request-id"].startswith("req_")
    with server.client("sk-tw-wrong") as client, pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.request_id


def refused_within(client, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    """True when the revoked key is refused within `seconds` (the API trusts a checked key that long)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.files.list()
        except openai.AuthenticationError:
            return True
        time.sleep(0.1)
    return False


def test_keys_cli_prints_one_line_hashes_and_revokes(server: ApiServer, db) -> None:  # type: ignore[no-untyped-def]
    created = tuneworks("keys", "create", "--project", "proj-revoke", settings=server.settings)
    key = created.stdout.strip()
    assert created.stdout == key + "\n" and key.startswith("sk-tw-") and len(key) > 30
    with Session(db) as session:
        rows = session.exec(select(ApiKey)).all()
        assert all(key not in (row.key_hash, row.prefix) for row in rows)
    with server.client(key) as client:
        assert client.files.list().data == []
        assert tuneworks("keys", "revoke", key, settings=server.settings).returncode == 0
        assert refused_within(client, server.settings.auth_cache_seconds + 1.5)
    again = server.settings
    with pytest.raises(subprocess.CalledProcessError) as failed:
        tuneworks("keys", "revoke", key, settings=again)
    assert failed.value.returncode == 1
    with pytest.raises(subprocess.CalledProcessError) as bad_name:
        tuneworks("keys", "create", "--project", "no spaces/allowed", settings=again)
    assert "invalid project name" in bad_name.value.stderr


def test_keys_list_shows_no_secret_and_revoke_by_id(server: ApiServer) -> None:
    key = tuneworks("keys", "create", "--project", "proj-by-id", settings=server.settings).stdout.strip()
    other = tuneworks("keys", "create", "--project", "proj-by-id-2", settings=server.settings).stdout.strip()
    listed = tuneworks("keys", "list", "--project", "proj-by-id", settings=server.settings).stdout
    lines = [line.split("\t") for line in listed.splitlines()]
    assert lines[0] == ["id", "project", "prefix", "created", "revoked"] and len(lines) == 2
    key_id, project, prefix, created, revoked = lines[1]
    assert key_id.startswith("key_") and project == "proj-by-id" and key.startswith(prefix)
    assert created.endswith("Z") and revoked == "-"
    everything = tuneworks("keys", "list", settings=server.settings).stdout
    assert key not in everything and other not in everything and "proj-by-id-2" in everything
    with server.client(key) as client:
        assert client.files.list().object == "list"
        assert tuneworks("keys", "revoke", "--id", key_id, settings=server.settings).returncode == 0
        assert refused_within(client, server.settings.auth_cache_seconds + 1.5)
    after = tuneworks("keys", "list", "--project", "proj-by-id", settings=server.settings).stdout
    assert after.splitlines()[1].split("\t")[4].endswith("Z")
    with pytest.raises(subprocess.CalledProcessError) as again:
        tuneworks("keys", "revoke", "--id", key_id, settings=server.settings)
    assert again.value.returncode == 1
    with server.client(other) as client:
        assert client.files.list().object == "list"


def test_other_projects_objects_are_404(server: ApiServer, db) -> None:  # type: ignore[no-untyped-def]
    with server.client() as owner, server.client(server.new_key("proj-other")) as other:
        file_id = owner.files.create(file=chat_file(), purpose="fine-tune").id
        job = owner.fine_tuning.jobs.create(model=TINY, training_file=file_id)
        with Session(db) as session:
            project_id = session.exec(select(JobRow.project_id).where(JobRow.id == job.id)).one()
            session.add(ModelRow(id=f"ft:{TINY}:proj-test::{job.id[6:]}", project_id=project_id, job_id=job.id,
                                 base_model=TINY, storage_key=f"jobs/{job.id}/adapter"))  # fmt: skip
            session.commit()
        model = f"ft:{TINY}:proj-test::{job.id[6:]}"
        for call, arg in [
            (other.files.retrieve, file_id), (other.files.content, file_id), (other.files.delete, file_id),
            (other.fine_tuning.jobs.retrieve, job.id), (other.fine_tuning.jobs.cancel, job.id),
            (other.fine_tuning.jobs.pause, job.id), (other.fine_tuning.jobs.list_events, job.id),
            (other.fine_tuning.jobs.checkpoints.list, job.id), (other.models.retrieve, model), (other.models.delete, model),
        ]:  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                call(arg)
        with pytest.raises(openai.BadRequestError) as caught:
            other.fine_tuning.jobs.create(model=TINY, training_file=file_id)
        assert caught.value.param == "training_file"  # type: ignore[attr-defined]
        assert other.files.list().data == [] and other.fine_tuning.jobs.list().data == []
        assert model not in {m.id for m in other.models.list()}
        assert owner.fine_tuning.jobs.retrieve(job.id).status == "validating_files"
        assert owner.models.retrieve(model).id == model


def test_organization_and_project_headers_are_accepted(server: ApiServer) -> None:
    with server.client(organization="org-anything", project="proj_anything") as client:
        assert client.files.list(extra_headers={"OpenAI-Beta": "x"}).object == "list"


def test_request_id_is_echoed_or_made(server: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {server.key}", "x-request-id": "my-trace-123"}
    assert httpx.get(f"{server.base_url}/files", headers=headers).headers["x-request-id"] == "my-trace-123"
    with server.client() as client:
        raw = client.files.with_raw_response.list()
        assert raw.request_id and raw.request_id.startswith("req_")
        assert raw.parse()._request_id == raw.request_id
    unknown = httpx.post(f"{server.base_url}/nothing-here", headers=headers)
    assert unknown.status_code == 404 and unknown.headers["x-request-id"] == "my-trace-123"
    assert unknown.json()["error"]["type"] == "invalid_request_error"
    wrong_method = httpx.put(f"{server.base_url}/files", headers=headers)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    bad_json = httpx.post(f"{server.base_url}/fine_tuning/jobs", headers=headers, content=b"{nope")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["param"] is None


def test_empty_body_posts_with_json_content_type(server: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    with server.client() as client:
        file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    response = httpx.post(f"{server.base_url}/fine_tuning/jobs/{job.id}/cancel", headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    deleted = httpx.delete(f"{server.base_url}/files/{file_id}", headers=headers)
    assert deleted.status_code == 200 and deleted.json() == {"id": file_id, "object": "file", "deleted": True}
