"""score_model and label_model graders: what the judge is asked (templated messages, sampling parameters, a JSON
schema) and how its answer becomes a reward. The judge here is a plain function that answers what the test says
(the real judge, a vLLM model behind the gateway, is tested in tests/serving/test_graders_judge.py)."""

from __future__ import annotations

import pytest

from core.graders import (
    GradeContext,
    GraderError,
    JudgeReply,
    JudgeRequest,
    JudgeUnavailable,
    check_runnable,
    grade,
    judge_models,
    parse_grader,
)


class ScriptedJudge:
    """Answers each request with the next scripted text, and keeps the requests."""

    def __init__(self, *answers: str | None) -> None:
        self.answers = list(answers)
        self.requests: list[JudgeRequest] = []

    def __call__(self, request: JudgeRequest) -> JudgeReply:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if answer == "DOWN":
            raise JudgeUnavailable("judge: connection refused")
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        return JudgeReply(text=answer, usage=usage)


SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": "judge-model",
    "input": [
        {"role": "system", "content": "Score from 0 to 10."},
        {"role": "user", "content": [{"type": "input_text", "text": "Answer: {{ sample.output_text }}; "},
                                     {"type": "input_text", "text": "gold: {{ item.answer }}"}]},
    ],
    "range": [0, 10],
    "sampling_params": {"temperature": 0, "seed": 7, "max_completions_tokens": 20, "top_p": 1},
}  # fmt: skip
LABEL = {
    "type": "label_model", "name": "sentiment", "model": "judge-model",
    "input": [{"role": "user", "content": "Label: {{ sample.output_text }}"}],
    "labels": ["positive", "neutral", "negative"], "passing_labels": ["positive", "neutral"],
}  # fmt: skip


def run(grader: dict, judge: ScriptedJudge, sample: str = "Paris"):  # type: ignore[no-untyped-def]
    context = GradeContext(judge=judge)
    parsed = parse_grader(grader)
    check_runnable(parsed, context=context)
    return grade(parsed, sample, {"answer": "Paris"}, context=context)


def test_score_model_asks_the_judge_with_templated_messages_and_scales_its_score() -> None:
    judge = ScriptedJudge('{"steps": ["close"], "result": 7.5}')
    result = run(SCORE, judge)
    assert result.reward == pytest.approx(0.75) and result.scores["raw_score"] == 7.5
    (request,) = judge.requests
    assert request.model == "judge-model"
    assert request.messages == [{"role": "system", "content": "Score from 0 to 10."},
                                {"role": "user", "content": "Answer: Paris; gold: Paris"}]  # fmt: skip
    assert request.sampling == {"temperature": 0, "seed": 7, "max_completion_tokens": 20, "top_p": 1}
    assert request.response_format["json_schema"]["schema"]["required"] == ["result"]
    assert result.token_usage == 15 and result.token_usage_per_model["judge-model"]["prompt_tokens"] == 10


@pytest.mark.parametrize("answer", ["11", '{"result": -1}', "seven", '{"score": 3}', "{}"])
def test_score_outside_the_range_or_unparsable_is_a_parse_error(answer: str) -> None:
    result = run(SCORE, ScriptedJudge(answer))
    assert result.errors.model_grader_parse_error and result.reward == 0.0


def test_judge_server_error_and_refusal() -> None:
    down = run(SCORE, ScriptedJudge("DOWN"))
    assert down.errors.model_grader_server_error and "connection refused" in str(
        down.errors.model_grader_server_error_details
    )
    refused = run(SCORE, ScriptedJudge(None))
    assert refused.errors.model_grader_refusal_error and refused.reward == 0.0


def test_label_model_inside_multi_passes_on_passing_labels() -> None:
    multi = {"type": "multi", "name": "m", "calculate_output": "sentiment", "graders": {"sentiment": LABEL}}
    assert run(multi, ScriptedJudge('{"result": "neutral"}')).reward == 1.0
    failing = run(multi, ScriptedJudge('{"result": "negative"}'))
    assert failing.reward == 0.0 and not failing.errors.any
    assert run(multi, ScriptedJudge('{"result": "angry"}')).errors.model_grader_parse_error
    judge = ScriptedJudge("positive")  # a bare label is read too
    assert run(multi, judge).reward == 1.0
    assert (
        judge.requests[0].response_format["json_schema"]["schema"]["properties"]["result"]["enum"]
        == LABEL["labels"]
    )


def test_multi_sums_judge_token_usage_and_lists_judge_models() -> None:
    multi = {
        "type": "multi",
        "name": "m",
        "calculate_output": "(a + b) / 2",
        "graders": {"a": SCORE, "b": SCORE},
    }
    result = run(multi, ScriptedJudge('{"result": 10}', '{"result": 0}'))
    assert result.reward == 0.5 and result.token_usage == 30
    assert judge_models(parse_grader(multi)) == {"grader.graders.a.model": "judge-model",
                                                 "grader.graders.b.model": "judge-model"}  # fmt: skip


def test_model_grader_without_a_judge_is_refused() -> None:
    with pytest.raises(GraderError) as raised:
        check_runnable(parse_grader(SCORE), context=GradeContext())
    assert raised.value.param == "grader.model"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"sampling_params": {"temperature": 5}}, "grader.sampling_params.temperature"),
        ({"sampling_params": {"max_completions_tokens": 0}}, "grader.sampling_params.max_completions_tokens"),
        ({"input": [{"role": "robot", "content": "x"}]}, "grader.input.0.role"),
        ({"input": [{"role": "user", "content": {"type": "input_image", "image_url": "x"}}]}, "grader.input.0.content"),
        ({"model": ""}, "grader.model"),
    ],
)  # fmt: skip
def test_bad_model_grader_fields(change: dict, param: str) -> None:
    with pytest.raises(GraderError) as raised:
        parse_grader({**SCORE, **change})
    assert raised.value.param == param, raised.value.message
