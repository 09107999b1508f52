"""Files through the real openai SDK and raw HTTP (contract §2, checklist items 1–3 and 6 at the file level)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from core.db import make_engine
from tests.conftest import ApiServer
from tests.service.conftest import chat_example, chat_file, jsonl, service_settings


def test_upload_from_a_file_handle_raw_bytes_and_with_expiry(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_file(12))
    with path.open("rb") as handle:
        from_handle = client.files.create(file=handle, purpose="fine-tune")
    assert (from_handle.filename, from_handle.bytes, from_handle.purpose) == (
        "train.jsonl",
        len(chat_file(12)),
        "fine-tune",
    )
    assert from_handle.status == "processed" and from_handle.id.startswith("file-")
    assert from_handle.expires_at is None

    raw = client.files.create(file=chat_file(3), purpose="fine-tune")
    assert (raw.filename, raw.bytes, raw.status) == ("upload", len(chat_file(3)), "processed")

    expiring = client.files.create(
        file=chat_file(10), purpose="fine-tune", expires_after={"anchor": "created_at", "seconds": 7200}
    )
    assert expiring.expires_at == expiring.created_at + 7200
    assert client.files.wait_for_processing(expiring.id).status == "processed"


def test_list_pages_with_cursors_in_both_orders(server: ApiServer) -> None:
    with server.client(server.new_key("proj-listing")) as client:
        ids = [client.files.create(file=chat_file(2), purpose="fine-tune").id for _ in range(4)]
        client.files.create(file=b"{}\n", purpose="batch")
        newest_first = list(reversed(ids))

        page = client.files.list(purpose="fine-tune", limit=1)
        assert [f.id for f in page.data] == newest_first[:1]
        assert (page.first_id, page.last_id, page.has_more) == (newest_first[0], newest_first[0], True)
        assert [f.id for f in client.files.list(purpose="fine-tune", limit=1)] == newest_first  # auto-paging
        assert [f.id for f in client.files.list(purpose="fine-tune", limit=3, order="asc")] == ids

        second = client.files.list(purpose="fine-tune", limit=3, after=newest_first[0])
        assert [f.id for f in second.data] == newest_first[1:]
        assert (second.first_id, second.last_id, second.has_more) == (newest_first[1], newest_first[3], False)
        empty = client.files.list(purpose="fine-tune", after=ids[0])
        assert (empty.data, empty.first_id, empty.last_id, empty.has_more) == ([], None, None, False)
        assert len(client.files.list().data) == 5


def test_content_round_trips_bytes_exactly_and_delete_then_404(client) -> None:  # type: ignore[no-untyped-def]
    data = chat_file(10).replace(b"\n", b"\r\n") + '{"prompt": "caf\u00e9 \u2603"}\n'.encode()
    created = client.files.create(file=("odd name \u00e9.jsonl", data), purpose="fine-tune")
    assert client.files.content(created.id).read() == data
    assert client.files.retrieve(created.id).filename == "odd name \u00e9.jsonl"

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(created.id)
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    assert caught.value.body == {
        "message": f"No such File object: {created.id}",
        "type": "invalid_request_error",
        "param": "id",
        "code": None,
    }
    for call in (client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(created.id)


def test_non_utf8_filename_and_curl_style_multipart(server: ApiServer) -> None:
    body = chat_file(10)
    files = {"file": (b"\xffname.jsonl".decode("latin-1"), body, "application/octet-stream")}
    response = httpx.post(
        f"{server.base_url}/files",
        headers={"Authorization": f"Bearer {server.key}"},
        files=files,
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(body) and response.json()["status"] == "processed"


BAD_FILES = [
    (
        jsonl([chat_example(0), chat_example(1), {"messages": [{"role": "bot", "content": "x"}]}]),
        "line 3, messages[0].role",
    ),
    (chat_file(2) + b"not json\n", "line 3: not valid JSON"),
    (chat_file(1) + b'{"messages": "caf\xe9"}\n', "line 2: not valid UTF-8"),
    (
        jsonl([chat_example(0), {"messages": [{"role": "user", "content": "q"}]}]),
        "line 2, messages: the example has no assistant",
    ),
    (
        jsonl(
            [
                {
                    "messages": [
                        {"role": "user", "content": "q", "extra": 1},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ]
        ),
        "line 1, messages[0].extra: unrecognized `extra`",
    ),  # fmt: skip
    (b"\n\n", "The file has no examples."),
    # Once 500s: an unhashable role, nesting deeper than the parser's stack, an integer Python will not convert.
    (jsonl([chat_example(0), {"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}]),
     "line 2, messages[0].role: unrecognized role an array"),
    (jsonl([{"messages": [{"role": {"x": 1}, "content": "q"}, {"role": "assistant", "content": "a"}]}]),
     "line 1, messages[0].role: unrecognized role an object"),
    (chat_file(1) + b"[" * 200000 + b"\n", "line 2: not valid JSON (nested too deeply)"),
    (chat_file(1) + b'{"messages": [{"role": "user", "content": "q", "weight": ' + b"9" * 6000 + b"}]}\n",
     "line 2, messages[0].weight: an integer with more than 4300 digits"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "details"), BAD_FILES)
def test_bad_training_files_end_in_error_naming_line_and_field(client, data: bytes, details: str) -> None:  # type: ignore[no-untyped-def]
    created = client.files.create(file=("bad.jsonl", data), purpose="fine-tune")
    assert created.status == "error"
    assert created.status_details is not None and created.status_details.startswith(details), (
        created.status_details
    )
    assert client.files.retrieve(created.id).status_details == created.status_details
    assert client.files.content(created.id).read() == data  # kept as uploaded


def test_bad_form_fields_are_400_with_param(server: ApiServer, client) -> None:  # type: ignore[no-untyped-def]
    cases = [
        ({"purpose": "fine-tuning"}, "purpose"),
        ({"purpose": "fine-tune", "expires_after[anchor]": "last_access", "expires_after[seconds]": "7200"}, "expires_after.anchor"),
        ({"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": "10"}, "expires_after.seconds"),
    ]  # fmt: skip
    before = len(client.files.list().data)
    for data, param in cases:
        response = httpx.post(
            f"{server.base_url}/files",
            headers={"Authorization": f"Bearer {server.key}"},
            files={"file": ("a.jsonl", chat_file(1))},
            data=data,
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert response.headers["x-request-id"]
    no_file = httpx.post(
        f"{server.base_url}/files",
        headers={"Authorization": f"Bearer {server.key}"},
        data={"purpose": "fine-tune"},
    )
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert len(client.files.list().data) == before
    assert not any(p.name.startswith(".tmp-") for p in (server.settings.artifacts_dir / "files").iterdir())


def test_odd_form_values_are_400_or_cleaned(server: ApiServer, client) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {server.key}"}
    data = {"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": "\u00b2"}
    response = httpx.post(f"{server.base_url}/files", headers=headers, files={"file": ("a", b"x")}, data=data)
    assert response.status_code == 400 and response.json()["error"]["param"] == "expires_after.seconds"
    boundary = "b0"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a\x00b\x01.jsonl"\r\n\r\n{{}}\n\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    response = httpx.post(f"{server.base_url}/files", content=body,
                          headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert response.status_code == 200 and response.json()["filename"] == "ab.jsonl"
    assert client.files.retrieve(response.json()["id"]).filename == "ab.jsonl"


def test_file_used_by_an_unfinished_job_cannot_be_deleted(client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(model="tuneworks/tiny-random-llama", training_file=training_file)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.delete(training_file)
    assert job.id in caught.value.message
    client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(training_file).deleted


def test_oversize_upload_is_413_and_nothing_is_stored(tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    settings = service_settings(tmp_path / "home", redis_url, max_upload_bytes=2000)
    server = ApiServer(settings, tmp_path / "api.log")
    try:
        with server.client() as client:
            with pytest.raises(openai.APIStatusError) as caught:
                client.files.create(file=chat_file(100), purpose="fine-tune")
            assert caught.value.status_code == 413
            assert caught.value.body["code"] == "file_too_large"  # type: ignore[index]
            assert caught.value.request_id
            assert client.files.list().data == []
            small = client.files.create(file=chat_file(20)[:1900], purpose="batch")
            assert small.bytes == 1900
        stored = list((settings.artifacts_dir / "files").iterdir())
        assert [p.name for p in stored] == [small.id]
        engine = make_engine(settings.resolved_database_url)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM file").scalar() == 1
        engine.dispose()
    finally:
        server.stop()


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read the server's memory"
)
def test_large_upload_is_streamed_not_held_in_memory(server: ApiServer, client) -> None:  # type: ignore[no-untyped-def]
    line = json.dumps(chat_example(0)).encode() + b"\n"
    data = line * (32 * 1024 * 1024 // len(line))  # 32 MiB
    before = _memory_kib(server.proc.pid, "VmRSS")
    created = client.files.create(file=("big.jsonl", data), purpose="fine-tune")
    grown_mib = (_memory_kib(server.proc.pid, "VmHWM") - before) / 1024
    assert (created.bytes, created.status) == (len(data), "processed")
    assert grown_mib < 16, f"the API grew by {grown_mib:.0f} MiB while receiving a 32 MiB file"
    assert (server.settings.artifacts_dir / "files" / created.id).stat().st_size == len(data)


def test_idempotency_key_returns_the_first_upload(server: ApiServer) -> None:
    with server.client(server.new_key("proj-idem-files")) as client:
        headers = {"Idempotency-Key": "upload-1"}
        first = client.files.create(file=chat_file(10), purpose="fine-tune", extra_headers=headers)
        retry = client.files.create(file=chat_file(10), purpose="fine-tune", extra_headers=headers)
        other = client.files.create(
            file=chat_file(10), purpose="fine-tune", extra_headers={"Idempotency-Key": "2"}
        )
        assert retry.id == first.id and other.id != first.id
        assert sorted(f.id for f in client.files.list()) == sorted([first.id, other.id])
    with server.client(server.new_key("proj-idem-other")) as stranger:  # keys are per project
        assert (
            stranger.files.create(file=chat_file(10), purpose="fine-tune", extra_headers=headers).id
            != first.id
        )
    stored = {p.name for p in (server.settings.artifacts_dir / "files").iterdir()}
    assert first.id in stored and not any(name.startswith(".tmp-") for name in stored)


def test_idempotency_key_of_a_deleted_file_uploads_anew(server: ApiServer) -> None:
    """The key's file is gone, so a retry would hand back an id nobody can use: it creates a new file instead."""
    with server.client(server.new_key("proj-idem-deleted")) as client:
        headers = {"Idempotency-Key": "upload-then-delete"}
        first = client.files.create(file=chat_file(10), purpose="fine-tune", extra_headers=headers)
        client.files.delete(first.id)
        retry = client.files.create(file=chat_file(10), purpose="fine-tune", extra_headers=headers)
        assert retry.id != first.id and client.files.retrieve(retry.id).status == "processed"
        again = client.files.create(file=chat_file(10), purpose="fine-tune", extra_headers=headers)
        assert again.id == retry.id  # the key now belongs to the new file
        assert [f.id for f in client.files.list()] == [retry.id]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_upload_download_and_model_path(server: ApiServer, tmp_path: Path) -> None:
    path = tmp_path / "mydata.jsonl"
    path.write_bytes(chat_file(10))
    auth = ["-H", f"Authorization: Bearer {server.key}"]
    upload = subprocess.run(
        ["curl", "-sS", f"{server.base_url}/files", *auth, "-F", "purpose=fine-tune", "-F", f"file=@{path}"],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    created = json.loads(upload.stdout)
    assert (created["filename"], created["bytes"], created["status"]) == (
        "mydata.jsonl",
        path.stat().st_size,
        "processed",
    )
    download = subprocess.run(
        ["curl", "-sS", f"{server.base_url}/files/{created['id']}/content", *auth],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert download.stdout == path.read_bytes()
    model = subprocess.run(
        ["curl", "-sS", f"{server.base_url}/models/tuneworks/tiny-random-llama", *auth],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert json.loads(model.stdout)["id"] == "tuneworks/tiny-random-llama"
