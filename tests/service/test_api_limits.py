"""What every request must pass before a route reads it (service/middleware.py): the key before the body, body
sizes counted while they arrive, JSON nesting and number length, NUL-free ids, the request rate and the active
jobs quota per project. Raw sockets where the point is what the server does before the body has arrived."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import ApiServer
from tests.service.conftest import chat_file, service_settings

TINY = "tuneworks/tiny-random-llama"
MAX_REQUEST = 8192
MAX_UPLOAD = 20000


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ApiServer]:
    home = tmp_path_factory.mktemp("limited-home")
    settings = service_settings(
        home, redis_url, max_request_bytes=MAX_REQUEST, max_upload_bytes=MAX_UPLOAD, rate_limit_per_minute=60,
        max_active_jobs_per_project=2,
    )  # fmt: skip
    api = ApiServer(settings, home / "api.log")
    yield api
    api.stop()


def raw(port: int, head: str, body: bytes = b"", *, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send a request head and the first part of a body, then read the answer; the rest of the body never comes.

    Returns:
        The status code and the response body.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)  # a timeout here means the server is still waiting for the body
            if not chunk:
                break
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), rest


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_missing_or_bad_key_is_401_before_the_body_is_read(limited: ApiServer) -> None:
    for auth in ("", "Authorization: Bearer sk-tw-wrong\n"):
        head = (
            "POST /v1/fine_tuning/jobs HTTP/1.1\nHost: x\nContent-Type: application/json\n"
            f"{auth}Content-Length: 3000000000\n"
        )
        status, body = raw(limited.port, head, b'{"model": ')
        assert status == 401 and b"invalid_api_key" in body


def test_a_declared_length_over_the_limit_is_413_at_once(limited: ApiServer) -> None:
    auth = f"Authorization: Bearer {limited.key}\n"
    status, body = raw(
        limited.port, f"POST /v1/fine_tuning/jobs HTTP/1.1\nHost: x\n{auth}Content-Length: 9000\n"
    )
    assert status == 413 and b'"code":"request_too_large"' in body
    upload = f"POST /v1/files HTTP/1.1\nHost: x\n{auth}Content-Type: multipart/form-data; boundary=b\n"
    status, body = raw(limited.port, upload + "Content-Length: 3000000000\n", b"--b\r\n")
    assert status == 413 and b"request_too_large" in body


def test_a_chunked_body_is_413_as_soon_as_it_passes_the_limit(limited: ApiServer) -> None:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer {limited.key}\n"
        "Content-Type: application/json\nTransfer-Encoding: chunked\n"
    )
    chunks = b"".join(b"3e8\r\n" + b" " * 1000 + b"\r\n" for _ in range(10))  # 10000 bytes, no final chunk
    status, body = raw(limited.port, head, chunks)
    assert status == 413 and b"8192 bytes" in body


def test_deep_nesting_and_long_numbers_are_400_for_every_json_route(limited: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {limited.key}", "Content-Type": "application/json"}
    for path in ("/fine_tuning/jobs", "/chat/completions", "/completions"):
        for body, code in [
            (b"[" * 2000, "json_too_deep"),
            (b"[" * 1000 + b"]" * 1000, "json_too_deep"),
            (b'{"model": "m", "seed": ' + b"1" * 4400 + b"}", "number_too_long"),
        ]:
            response = httpx.post(f"{limited.base_url}{path}", headers=headers, content=body)
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"]["code"] == code
    nested_in_strings = b'{"model": "' + b"[" * 1000 + b'", "training_file": "file-x"}'
    response = httpx.post(f"{limited.base_url}/fine_tuning/jobs", headers=headers, content=nested_in_strings)
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"  # an unknown model


def test_nul_in_ids_is_400_naming_the_param(limited: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {limited.key}"}
    base = limited.base_url
    cases = [
        ("GET", "/files/file-%00x", None, "file_id"),
        ("DELETE", "/files/file-%00x", None, "file_id"),
        ("GET", "/fine_tuning/jobs/ftjob-%00/events", None, "fine_tuning_job_id"),
        ("GET", "/models/ft:a%00b", None, "model"),
        ("GET", "/files?after=file-%00", None, "after"),
        ("GET", "/fine_tuning/jobs?metadata%5Bk%00%5D=v", None, "metadata"),
        ("POST", "/fine_tuning/jobs", {"model": TINY, "training_file": "file-\x00"}, "training_file"),
        ("POST", "/fine_tuning/jobs", {"model": TINY, "training_file": "f", "metadata": {"k": "\x00"}}, "metadata.k"),
        ("POST", "/chat/completions", {"model": "ft:\x00", "messages": []}, "model"),
    ]  # fmt: skip
    for method, path, body, param in cases:
        response = httpx.request(method, base + path, headers=headers, json=body)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == param, (path, response.text)
    text = httpx.post(
        base + "/fine_tuning/jobs", headers=headers, json={"model": "\\u0000", "training_file": "f"}
    )
    assert text.json()["error"]["param"] == "model" and "not available" in text.json()["error"]["message"]


def test_multipart_parts_are_bounded(limited: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {limited.key}"}
    many = {f"field{i}": "x" for i in range(20)} | {"purpose": "fine-tune"}
    response = httpx.post(
        f"{limited.base_url}/files", headers=headers, data=many, files={"file": ("a", b"x")}
    )
    assert response.status_code == 400 and "parts" in response.json()["error"]["message"]
    boundary = "bnd"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\nX-Long: {"y" * 9000}\r\n\r\n'
        f"fine-tune\r\n--{boundary}--\r\n"
    ).encode()
    response = httpx.post(
        f"{limited.base_url}/files", content=body,
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    with limited.client() as client:  # an upload under FT_MAX_UPLOAD_BYTES still works
        assert client.files.create(file=chat_file(100)[:15000], purpose="batch").bytes == 15000


def test_request_rate_is_429_with_retry_after_that_the_sdk_honours(limited: ApiServer) -> None:
    key = limited.new_key("proj-rate")
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=limited.base_url, headers=headers) as http:
        statuses = [http.get("/models").status_code for _ in range(60)]
        assert statuses == [200] * 60  # a burst of a minute's worth
        refused = http.get("/models")
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 2 and int(refused.headers["retry-after-ms"]) <= 2000
    assert httpx.get(
        f"{limited.base_url}/models", headers={"Authorization": f"Bearer {limited.key}"}
    ).is_success
    with openai.OpenAI(
        base_url=limited.base_url, api_key=key, max_retries=2
    ) as client:  # waits, then succeeds
        started = time.monotonic()
        assert client.models.list().data
        assert time.monotonic() - started >= 0.3
    with limited.client(key) as client, pytest.raises(openai.RateLimitError):  # no retries: the 429 itself
        client.models.list()


def test_active_jobs_per_project_are_capped_with_a_429(limited: ApiServer) -> None:
    with limited.client(limited.new_key("proj-quota")) as client:
        file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
        first = client.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, extra_headers={"Idempotency-Key": "q1"}
        )
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
        with pytest.raises(openai.RateLimitError) as caught:
            client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
        assert caught.value.code == "too_many_active_jobs"  # type: ignore[attr-defined]
        assert caught.value.response.headers["retry-after"] == "5"
        again = client.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, extra_headers={"Idempotency-Key": "q1"}
        )
        assert again.id == first.id  # a retry of a job that exists is not a new job
        client.fine_tuning.jobs.cancel(first.id)
        assert client.fine_tuning.jobs.create(model=TINY, training_file=file_id).status == "validating_files"
