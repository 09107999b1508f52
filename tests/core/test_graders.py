"""Graders without a model: known rewards for every type, operation and metric, templates, the formula
language, limits, and OpenAI's documented examples (the graders guide)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from core.graders import GradeContext, GraderError, check_runnable, grade, grade_batch, parse_grader
from core.graders.formula import FormulaError, evaluate, parse_formula
from core.graders.spec import MAX_SUB_GRADERS, MAX_TEMPLATE_CHARS
from core.graders.templates import render, sample_namespace

CONTEXT = GradeContext()


def string_check(
    operation: str, input: str = "{{ sample.output_text }}", reference: str = "{{ item.answer }}"
) -> dict:
    return {
        "type": "string_check",
        "name": "check",
        "input": input,
        "reference": reference,
        "operation": operation,
    }


def similarity(metric: str) -> dict:
    return {"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
            "reference": "{{ item.reference }}", "evaluation_metric": metric}  # fmt: skip


def reward(grader: dict, sample: str, item: Any) -> float:
    parsed = parse_grader(grader)
    check_runnable(parsed, context=CONTEXT)
    result = grade(parsed, sample, item, context=CONTEXT)
    assert not result.errors.any, result.errors
    return result.reward


@pytest.mark.parametrize(
    ("operation", "sample", "answer", "expected"),
    [
        ("eq", "Paris", "Paris", 1.0), ("eq", "paris", "Paris", 0.0), ("eq", "Paris ", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0), ("ne", "Paris", "Paris", 0.0),
        ("like", "It is Paris.", "Paris", 1.0), ("like", "It is paris.", "Paris", 0.0),
        ("ilike", "It is PARIS.", "paris", 1.0), ("ilike", "It is Lyon.", "paris", 0.0),
    ],
)  # fmt: skip
def test_string_check_operations(operation: str, sample: str, answer: str, expected: float) -> None:
    assert reward(string_check(operation), sample, {"answer": answer}) == expected


HYPOTHESIS, REFERENCE = "the cat is on the mat", "the cat sat on the mat"


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        # unigrams: 5 of 6 match each way -> F = 5/6; bigrams: 3 of 5; LCS "the cat on the mat": 5 of 6
        ("rouge_1", 5 / 6), ("rouge_2", 3 / 5), ("rouge_3", 1 / 4), ("rouge_4", 0.0), ("rouge_5", 0.0),
        ("rouge_l", 5 / 6),
        # GLEU: matched 1-4-grams (5 + 3 + 1 + 0) over the 18 of either side
        ("gleu", 9 / 18),
        # BLEU: precisions 5/6, 3/5, 1/4 and 0/3 smoothed to 1/(2*3); brevity penalty 1 (equal lengths)
        ("bleu", (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25),
    ],
)  # fmt: skip
def test_text_similarity_metrics_known_values(metric: str, expected: float) -> None:
    assert reward(similarity(metric), HYPOTHESIS, {"reference": REFERENCE}) == pytest.approx(
        expected, abs=1e-6
    )


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_l"])
def test_text_similarity_identical_is_one_disjoint_is_zero(metric: str) -> None:
    assert reward(similarity(metric), REFERENCE, {"reference": REFERENCE}) == pytest.approx(1.0)
    assert reward(similarity(metric), "zzzz", {"reference": "qqqq"}) == 0.0


def test_fuzzy_match_ignores_case_and_punctuation_and_scores_near_misses() -> None:
    assert reward(similarity("fuzzy_match"), "HELLO World!", {"reference": "hello world"}) == 1.0
    near = reward(similarity("fuzzy_match"), "helo world", {"reference": "hello world"})
    assert 0.9 < near < 1.0


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_unsupported_metrics_are_refused_naming_the_field(metric: str) -> None:
    with pytest.raises(GraderError) as raised:
        check_runnable(parse_grader(similarity(metric)), context=CONTEXT)
    assert raised.value.param == "grader.evaluation_metric"
    assert {"meteor": "WordNet", "cosine": "embedding model"}[metric] in raised.value.message


# --- OpenAI's graders guide: its multigrader example ((name + email) / 2) ------------------------------------
GUIDE_MULTI = {
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


def test_openai_guide_multigrader_example() -> None:
    item = {"name": "John Doe", "email": "john.doe@example.com"}
    parsed = parse_grader(GUIDE_MULTI)
    both = grade(parsed, '{"name": "John Doe", "email": "john.doe@example.com"}', item, context=CONTEXT)
    assert both.reward == 1.0 and both.sub_rewards == {"name": 1.0, "email": 1.0}
    wrong_email = grade(parsed, '{"name": "john doe", "email": "jd@example.com"}', item, context=CONTEXT)
    assert wrong_email.sub_rewards == {"name": 1.0, "email": 0.0} and wrong_email.reward == 0.5
    assert wrong_email.type == "multi" and wrong_email.name == "user_fields"


def test_multi_accepts_the_sdk_shape_of_one_grader() -> None:
    one = {"type": "multi", "name": "m", "calculate_output": "2 * check - 1", "graders": string_check("eq")}
    assert reward(one, "yes", {"answer": "yes"}) == 1.0
    assert reward(one, "no", {"answer": "yes"}) == 0.0  # -1 clamped to the reward range


def test_multi_formula_division_by_zero_is_a_formula_error() -> None:
    grader = {
        "type": "multi",
        "name": "m",
        "calculate_output": "1 / check",
        "graders": {"check": string_check("eq")},
    }
    result = grade(parse_grader(grader), "no", {"answer": "yes"}, context=CONTEXT)
    assert result.errors.formula_parse_error and result.reward == 0.0


@pytest.mark.parametrize(
    ("formula", "values", "expected"),
    [
        ("(a + b) / 2", {"a": 1, "b": 0}, 0.5), ("-a + 2 * b", {"a": 0.5, "b": 1}, 1.5),
        ("min(a, b, 0.3)", {"a": 1, "b": 0.7}, 0.3), ("max(a, b)", {"a": 0.2, "b": 0.9}, 0.9),
        ("abs(a - b)", {"a": 0.2, "b": 0.9}, 0.7), ("+a", {"a": 0.4}, 0.4), ("3", {}, 3.0),
    ],
)  # fmt: skip
def test_formula_evaluates_the_whitelisted_language(formula: str, values: dict, expected: float) -> None:
    node = parse_formula(formula, names={"a", "b"})
    assert evaluate(node, values) == pytest.approx(expected)


@pytest.mark.parametrize(
    "formula",
    ["a ** 2", "a.real", "__import__('os')", "a if b else 0", "a < b", "[a]", "'a'", "lambda: 1", "open('x')",
     "min(a, key=b)", "abs(a, b)", "c + 1", "a +", "a; b", "(a := 1)", "True + a"],
)  # fmt: skip
def test_formula_refuses_everything_else(formula: str) -> None:
    with pytest.raises(GraderError) as raised:
        parse_formula(formula, names={"a", "b"}, param="grader.calculate_output")
    assert raised.value.param == "grader.calculate_output"


def test_formula_non_finite_result_is_an_error() -> None:
    with pytest.raises(FormulaError):
        evaluate(parse_formula("a / b", names={"a", "b"}), {"a": 1.0, "b": 0.0})
    assert math.isfinite(evaluate(parse_formula("a / 3", names={"a"}), {"a": 1.0}))


# --- templates ----------------------------------------------------------------------------------------------
def test_templates_nested_keys_lists_and_json_values() -> None:
    sample = sample_namespace('{"answer": {"city": "Paris", "tags": ["a", "b"]}, "n": 3}')
    item = {"gold": {"city": "Paris"}, "list": [{"x": 1}]}
    text = "{{ sample.output_json.answer.city }}|{{item.gold.city}}|{{ item.list.0.x }}|{{ sample.output_json.n }}"
    assert render(text, sample=sample, item=item) == "Paris|Paris|1|3"
    assert render("{{ item.gold }}", sample=sample, item=item) == '{"city":"Paris"}'
    assert render("{{ sample.choices.0.message.content }}", sample=sample_namespace("hi"), item={}) == "hi"


@pytest.mark.parametrize(
    ("template", "model_sample", "param"),
    [
        ("{{ item.answer }}", "x", "item.answer"),
        ("{{ item.gold.missing }}", "x", "item.gold.missing"),
        ("{{ sample.output_json.name }}", "not json", "sample.output_json.name"),
        ("{{ sample.output_json.other }}", '{"name": 1}', "sample.output_json.other"),
        ("{{ other.thing }}", "x", "other.thing"),
    ],
)
def test_missing_template_field_is_named(template: str, model_sample: str, param: str) -> None:
    result = grade(parse_grader(string_check("eq", input=template, reference="r")), model_sample,
                   {"gold": {"city": "Paris"}}, context=CONTEXT)  # fmt: skip
    assert result.errors.invalid_variable_error and result.reward == 0.0
    assert result.invalid_variable is not None and result.invalid_variable.param == param
    assert param in result.invalid_variable.message
    assert result.errors.sample_parse_error == (model_sample == "not json")


def test_rendered_template_is_bounded() -> None:
    huge = {"answer": "x" * (MAX_TEMPLATE_CHARS + 1)}
    result = grade(parse_grader(string_check("ne")), "x", huge, context=CONTEXT)
    assert result.errors.truncated_observation_error and result.reward == 0.0


# --- definitions: 400s naming the field ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("grader", "param"),
    [
        (string_check("regex"), "grader.operation"),
        ({"type": "string_check", "name": "x", "input": "a", "operation": "eq"}, "grader.reference"),
        ({"type": "nope", "name": "x"}, "grader.type"),
        ("not an object", "grader"),
        (similarity("bleurt"), "grader.evaluation_metric"),
        ({"type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
          "labels": ["a"], "passing_labels": ["a"]}, "grader.type"),
        ({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "x"}],
          "range": [1, 0]}, "grader.range"),
        ({"type": "score_model", "name": "s", "model": "m", "input": []}, "grader.input"),
        ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": GUIDE_MULTI}},
         "grader.graders.a.type"),
        ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": string_check("bad")}},
         "grader.graders.a.operation"),
        ({"type": "multi", "name": "m", "calculate_output": "b", "graders": {"a": string_check("eq")}},
         "grader.calculate_output"),
        ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {}}, "grader.graders"),
        ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"not-a-name": string_check("eq")}},
         "grader.graders.not-a-name"),
        ({"type": "multi", "name": "m", "calculate_output": "a0",
          "graders": {f"a{i}": string_check("eq") for i in range(MAX_SUB_GRADERS + 1)}}, "grader.graders"),
        ({"type": "multi", "name": "m", "graders": {"a": string_check("eq")}}, "grader.calculate_output"),
        (string_check("eq", input="x" * (MAX_TEMPLATE_CHARS + 1)), "grader.input"),
        ({"type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
          "labels": ["a"], "passing_labels": ["b"]}, "grader.type"),
    ],
)  # fmt: skip
def test_bad_definitions_name_the_field(grader: Any, param: str) -> None:
    with pytest.raises(GraderError) as raised:
        parse_grader(grader)
    assert raised.value.param == param, raised.value.message


def test_label_model_passing_labels_must_be_labels() -> None:
    bad = {"type": "multi", "name": "m", "calculate_output": "l", "graders": {"l": {
        "type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
        "labels": ["a"], "passing_labels": ["b"]}}}  # fmt: skip
    with pytest.raises(GraderError) as raised:
        parse_grader(bad)
    assert raised.value.param == "grader.graders.l.passing_labels"


def test_grade_batch_matches_one_by_one() -> None:
    parsed = parse_grader(GUIDE_MULTI)
    samples = ['{"name": "John Doe", "email": "a@b.c"}', '{"name": "Jon Do", "email": "x@y.z"}', "oops"]
    items = [{"name": "John Doe", "email": "a@b.c"}] * 3
    batch = grade_batch(parsed, samples, items, context=CONTEXT)
    single = [grade(parsed, s, i, context=CONTEXT) for s, i in zip(samples, items, strict=True)]
    assert [r.reward for r in batch] == [r.reward for r in single]
    assert batch[0].reward == 1.0 and 0 < batch[1].reward < 0.5 and batch[2].errors.invalid_variable_error
