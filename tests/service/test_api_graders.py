"""`/v1/fine_tuning/alpha/graders/run` and `/validate` through the real openai SDK against a real `tuneworks api`:
rewards and OpenAI's response shape, 400s naming the field, python graders off by default and sandboxed when on.
(A model judge needs vLLM: tests/serving/test_graders_judge.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import ApiServer
from tests.service.conftest import service_settings

STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
                "reference": "{{ item.answer }}", "operation": "ilike"}  # fmt: skip
MULTI = {
    "type": "multi",
    "name": "user_fields",
    "graders": {
        "name": {"name": "name_grader", "type": "text_similarity", "input": "{{sample.output_json.name}}",
                 "reference": "{{item.name}}", "evaluation_metric": "fuzzy_match"},
        "email": {"name": "email_grader", "type": "string_check", "input": "{{sample.output_json.email}}",
                  "reference": "{{item.email}}", "operation": "eq"},
    },
    "calculate_output": "(name + email) / 2",
}  # fmt: skip
PYTHON = {"type": "python", "name": "py",
          "source": "def grade(sample, item):\n    return 1.0 if item['answer'] in sample['output_text'] else 0.0"}  # fmt: skip


@pytest.fixture(scope="module")
def python_server(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ApiServer]:
    """An API with FT_PYTHON_GRADERS=1."""
    home = tmp_path_factory.mktemp("api-python-graders")
    settings = service_settings(home, redis_url, python_graders=True, python_grader_timeout_seconds=5)
    api = ApiServer(settings, home / "api.log")
    yield api
    api.stop()


def bad_request(call) -> openai.BadRequestError:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as raised:
        call()
    return raised.value


def test_run_string_check(client: openai.OpenAI) -> None:
    graders = client.fine_tuning.alpha.graders
    hit = graders.run(grader=STRING_CHECK, model_sample="It is PARIS", item={"answer": "paris"})
    assert hit.reward == 1.0
    assert hit.metadata.name == "exact" and hit.metadata.type == "string_check"
    assert hit.metadata.errors.formula_parse_error is False and hit.metadata.execution_time >= 0
    assert hit.sub_rewards == {} and hit.api_model_grader_token_usage_per_model == {}
    assert graders.run(grader=STRING_CHECK, model_sample="Rome", item={"answer": "paris"}).reward == 0.0


def test_run_multi_openai_guide_example(client: openai.OpenAI) -> None:
    item = {"name": "John Doe", "email": "john.doe@example.com"}
    result = client.fine_tuning.alpha.graders.run(
        grader=MULTI, model_sample='{"name": "John Doe", "email": "jd@example.com"}', item=item
    )
    assert result.reward == 0.5 and result.sub_rewards == {"name": 1.0, "email": 0.0}
    assert result.metadata.type == "multi"


@pytest.mark.parametrize("metric", ["bleu", "gleu", "rouge_l", "fuzzy_match"])
def test_run_text_similarity(client: openai.OpenAI, metric: str) -> None:
    grader = {"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
              "reference": "{{ item.reference }}", "evaluation_metric": metric}  # fmt: skip
    same = client.fine_tuning.alpha.graders.run(
        grader=grader, model_sample="the cat sat", item={"reference": "the cat sat"}
    )
    assert same.reward == pytest.approx(1.0)


def test_validate_returns_the_grader(client: openai.OpenAI) -> None:
    validated = client.fine_tuning.alpha.graders.validate(grader=MULTI)
    assert validated.grader is not None and validated.grader.type == "multi"
    assert client.fine_tuning.alpha.graders.validate(grader=STRING_CHECK).grader.name == "exact"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("grader", "param", "words"),
    [
        ({**STRING_CHECK, "operation": "regex"}, "grader.operation", "eq"),
        ({**STRING_CHECK, "type": "label_model"}, "grader.type", "multi"),
        ({**MULTI, "calculate_output": "__import__('os').system('x')"}, "grader.calculate_output", "min, max"),
        ({**MULTI, "calculate_output": "name + phone"}, "grader.calculate_output", "phone"),
        ({"type": "text_similarity", "name": "s", "input": "a", "reference": "b", "evaluation_metric": "meteor"},
         "grader.evaluation_metric", "WordNet"),
        ({"type": "text_similarity", "name": "s", "input": "a", "reference": "b", "evaluation_metric": "cosine"},
         "grader.evaluation_metric", "embedding"),
        (PYTHON, "grader.type", "FT_PYTHON_GRADERS=1"),
        ({"type": "score_model", "name": "j", "model": "no-such-model", "input": [{"role": "user", "content": "x"}]},
         "grader.model", "no-such-model"),
    ],
)  # fmt: skip
def test_bad_graders_are_400s_naming_the_field(
    client: openai.OpenAI, grader: dict, param: str, words: str
) -> None:
    graders = client.fine_tuning.alpha.graders
    for call in (
        lambda: graders.run(grader=grader, model_sample="x", item={}),
        lambda: graders.validate(grader=grader),
    ):  # type: ignore[arg-type]
        error = bad_request(call)
        assert error.body["param"] == param and words in error.body["message"], error.body  # type: ignore[index]


def test_missing_template_field_is_a_400_naming_it(client: openai.OpenAI) -> None:
    error = bad_request(
        lambda: client.fine_tuning.alpha.graders.run(grader=STRING_CHECK, model_sample="x", item={"other": 1})
    )
    assert error.body["param"] == "item.answer" and "item.answer" in error.body["message"]  # type: ignore[index]


def test_bad_request_bodies(server: ApiServer) -> None:
    import httpx

    url = f"{server.base_url}/fine_tuning/alpha/graders/run"
    headers = {"authorization": f"Bearer {server.key}"}
    for body, param in [({"model_sample": "x"}, "grader"), ({"grader": STRING_CHECK}, "model_sample"),
                        ({"grader": "x", "model_sample": "x"}, "grader"),
                        ({"grader": STRING_CHECK, "model_sample": 3}, "model_sample")]:  # fmt: skip
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_python_grader_when_enabled(python_server: ApiServer) -> None:
    with python_server.client() as client:
        graders = client.fine_tuning.alpha.graders
        assert graders.validate(grader=PYTHON).grader.type == "python"  # type: ignore[union-attr]
        assert graders.run(grader=PYTHON, model_sample="It is paris", item={"answer": "paris"}).reward == 1.0
        broken = graders.run(grader={**PYTHON, "source": "def grade(sample, item):\n    return item['nope']"},
                             model_sample="x", item={"answer": "paris"})  # fmt: skip
        assert broken.reward == 0.0 and broken.metadata.errors.python_grader_runtime_error
        assert "KeyError" in (broken.metadata.errors.python_grader_runtime_error_details or "")


def test_python_grader_cannot_read_the_artifact_store(python_server: ApiServer) -> None:
    store = Path(python_server.settings.artifacts_dir)
    source = f"import os\ndef grade(sample, item):\n    os.listdir({str(store)!r})\n    return 1"
    with python_server.client() as client:
        result = client.fine_tuning.alpha.graders.run(
            grader={**PYTHON, "source": source}, model_sample="x", item={}
        )
    assert result.reward == 0.0 and "not allowed" in (
        result.metadata.errors.python_grader_runtime_error_details or ""
    )
