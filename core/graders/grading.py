"""Grading: `grade_batch(grader, samples, items, context=...)` -> one `GradeResult` (reward in [0, 1]) per sample.

Pure functions of (grader, sample, item) plus the two things a grader may need from outside, both in
`GradeContext`: a judge for model graders and the sandbox limits for python graders. The API grades one sample
per request (`grade`); the reinforcement runner grades a step's group of samples at once (`grade_batch`), which
runs each python grader once for the whole batch. A sample whose grading fails gets reward 0 and its error flags;
only a bad definition raises (`GraderError`, from `check_runnable` before any sample is graded).
"""

from __future__ import annotations

import ast
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from core.graders import judge as judging
from core.graders.errors import GradeErrors, GraderError, TemplateError, TemplateTooLong
from core.graders.formula import FormulaError, evaluate, parse_formula
from core.graders.metrics import UNSUPPORTED, similarity
from core.graders.sandbox import PythonOutcome, SandboxLimits, run_python
from core.graders.spec import (
    Grader,
    LabelModelGrader,
    Message,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)
from core.graders.templates import render, sample_namespace

logger = logging.getLogger(__name__)

PYTHON_DISABLED = ("Python graders are disabled on this service. An operator can enable them with "
                   "FT_PYTHON_GRADERS=1 (they then run in a sandboxed process; see the README's Graders section).")  # fmt: skip


@dataclass
class GradeContext:
    """What graders may use besides the sample: the judge (model graders) and the python sandbox."""

    judge: judging.Judge | None = None
    python_graders: bool = False
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)


@dataclass
class GradeResult:
    """One sample's grade, shaped for `/graders/run`'s response and the runner's events."""

    reward: float
    name: str
    type: str
    errors: GradeErrors = field(default_factory=GradeErrors)
    scores: dict[str, Any] = field(default_factory=dict)
    sub_rewards: dict[str, float] = field(default_factory=dict)
    token_usage_per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    execution_time: float = 0.0
    invalid_variable: TemplateError | None = None  # the first missing template field, when there was one

    @property
    def token_usage(self) -> int | None:
        if not self.token_usage_per_model:
            return None
        return sum(usage.get("total_tokens", 0) for usage in self.token_usage_per_model.values())


def check_runnable(grader: Grader, *, context: GradeContext, param: str = "grader") -> None:
    """Refuse, before any sample, a grader this service cannot run as configured.

    Raises:
        GraderError: a python grader while they are disabled, a source that does not compile, an unsupported
            metric, or a model grader without a judge; `param` names the field.
    """
    if isinstance(grader, MultiGrader):
        for key, sub in grader.graders.items():
            check_runnable(sub, context=context, param=f"{param}.graders.{key}")
    elif isinstance(grader, PythonGrader):
        if not context.python_graders:
            raise GraderError(PYTHON_DISABLED, param=f"{param}.type")
        _compile(grader.source, param=f"{param}.source")
    elif isinstance(grader, TextSimilarityGrader) and grader.evaluation_metric in UNSUPPORTED:
        raise GraderError(UNSUPPORTED[grader.evaluation_metric], param=f"{param}.evaluation_metric")
    elif isinstance(grader, ScoreModelGrader | LabelModelGrader) and context.judge is None:
        raise GraderError(
            "Model graders need a judge model, which this caller cannot reach.", param=f"{param}.model"
        )


def judge_models(grader: Grader, *, param: str = "grader") -> dict[str, str]:
    """The judge model of every model grader in `grader`, keyed by its field (`grader.graders.judge.model`),
    for the caller to check that each is a model it may use before grading."""
    if isinstance(grader, MultiGrader):
        found: dict[str, str] = {}
        for key, sub in grader.graders.items():
            found |= judge_models(sub, param=f"{param}.graders.{key}")
        return found
    if isinstance(grader, ScoreModelGrader | LabelModelGrader):
        return {f"{param}.model": grader.model}
    return {}


def _compile(source: str, *, param: str) -> None:
    """Parse (never run: the code runs in the sandbox only) and look for a top-level `grade`."""
    try:
        tree = ast.parse(source, "grader.py")
    except SyntaxError as exc:
        raise GraderError(f"The python grader's source does not compile: {exc.msg} (line {exc.lineno}).",
                          param=param) from None  # fmt: skip
    except (RecursionError, MemoryError, ValueError) as exc:
        raise GraderError(f"The python grader's source cannot be compiled: {exc}.", param=param) from None
    if "grade" not in _top_level_names(tree):
        raise GraderError("The python grader's source must define grade(sample, item).", param=param)


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def grade(grader: Grader, model_sample: str, item: Any, *, context: GradeContext) -> GradeResult:
    """The grade of one sample (see `grade_batch`)."""
    return grade_batch(grader, [model_sample], [item], context=context)[0]


def grade_batch(
    grader: Grader, samples: list[str], items: list[Any], *, context: GradeContext
) -> list[GradeResult]:
    """The grade of each (model sample, item) pair.

    Args:
        grader: a parsed grader (`spec.parse_grader`) that passed `check_runnable`.
        samples: the model outputs (`output_text`; `output_json` when one is a JSON object).
        items: the dataset lines, one per sample.
        context: the judge and the sandbox.

    Returns:
        One result per sample, in order; failed samples have reward 0 and their error flags set.
    """
    started = time.monotonic()
    namespaces = [sample_namespace(sample) for sample in samples]
    python = _run_python_graders(grader, namespaces, items, context=context)
    results = []
    for index, (sample, item) in enumerate(zip(namespaces, items, strict=True)):
        results.append(_grade_one(grader, sample, item, index=index, python=python, context=context))
    elapsed = (time.monotonic() - started) / max(1, len(samples))
    for result in results:
        result.execution_time = elapsed
    return results


def _python_graders(grader: Grader) -> dict[str, PythonGrader]:
    if isinstance(grader, PythonGrader):
        return {"": grader}
    if isinstance(grader, MultiGrader):
        return {key: sub for key, sub in grader.graders.items() if isinstance(sub, PythonGrader)}
    return {}


def _run_python_graders(grader: Grader, samples: list[dict[str, Any]], items: list[Any], *,
                        context: GradeContext) -> dict[str, list[PythonOutcome]]:  # fmt: skip
    """Each python grader's outcomes for the whole batch, keyed by its key in a multi ("" at the top)."""
    pairs = list(zip(samples, items, strict=True))
    return {
        key: run_python(sub.source, pairs, limits=context.sandbox)
        for key, sub in _python_graders(grader).items()
    }


def _grade_one(grader: Grader, sample: dict[str, Any], item: Any, *, index: int,
               python: dict[str, list[PythonOutcome]], context: GradeContext) -> GradeResult:  # fmt: skip
    if isinstance(grader, MultiGrader):
        return _multi(grader, sample, item, index=index, python=python, context=context)
    outcome = python[""][index] if isinstance(grader, PythonGrader) else None
    return _simple(grader, sample, item, outcome=outcome, context=context)


def _simple(grader: Grader, sample: dict[str, Any], item: Any, *, outcome: PythonOutcome | None,
            context: GradeContext) -> GradeResult:  # fmt: skip
    result = GradeResult(reward=0.0, name=grader.name, type=grader.type)
    try:
        if isinstance(grader, StringCheckGrader):
            result.reward = _string_check(grader, sample, item)
        elif isinstance(grader, TextSimilarityGrader):
            hypothesis, reference = (
                render(t, sample=sample, item=item) for t in (grader.input, grader.reference)
            )
            result.reward = similarity(grader.evaluation_metric, hypothesis, reference)
        elif isinstance(grader, PythonGrader):
            assert outcome is not None
            _python_result(result, outcome)
        elif isinstance(grader, ScoreModelGrader | LabelModelGrader):
            _model_result(result, grader, sample, item, context=context)
    except TemplateTooLong:
        result.reward, result.errors.truncated_observation_error = 0.0, True
    except TemplateError as exc:
        result.reward, result.errors.invalid_variable_error, result.invalid_variable = 0.0, True, exc
        result.errors.sample_parse_error = bool(exc.param and exc.param.startswith("sample.output_json")
                                                and sample["output_json"] is None)  # fmt: skip
    except (
        ValueError,
        ArithmeticError,
    ) as exc:  # a metric library failing on odd text fails this sample only
        result.reward, result.errors.other_error = 0.0, True
        logger.warning("%s grader %r: %s", grader.type, grader.name, exc)
    result.scores = {grader.name: result.reward, **result.scores}
    return result


def _string_check(grader: StringCheckGrader, sample: dict[str, Any], item: Any) -> float:
    text, reference = (render(t, sample=sample, item=item) for t in (grader.input, grader.reference))
    passed = {
        "eq": text == reference,
        "ne": text != reference,
        "like": reference in text,
        "ilike": reference.lower() in text.lower(),
    }[grader.operation]
    return 1.0 if passed else 0.0


def _python_result(result: GradeResult, outcome: PythonOutcome) -> None:
    if outcome.server_error is not None:
        result.errors.python_grader_server_error = True
        result.errors.python_grader_server_error_type = outcome.server_error
    elif outcome.score is None:
        result.errors.python_grader_runtime_error = True
        result.errors.python_grader_runtime_error_details = outcome.error
    else:
        result.reward = min(1.0, max(0.0, outcome.score))
        result.scores["raw_score"] = outcome.score


def _messages(messages: list[Message], sample: dict[str, Any], item: Any) -> list[dict[str, str]]:
    rendered = []
    for message in messages:
        parts = message.content if isinstance(message.content, list) else [message.content]
        text = "".join(part if isinstance(part, str) else part.text for part in parts)
        rendered.append({"role": message.role, "content": render(text, sample=sample, item=item)})
    return rendered


def _sampling(grader: ScoreModelGrader | LabelModelGrader) -> dict[str, Any]:
    params = grader.sampling_params if isinstance(grader, ScoreModelGrader) else None
    if params is None:
        return {}
    fields = {"max_completion_tokens": params.max_completions_tokens, "temperature": params.temperature,
              "top_p": params.top_p, "seed": params.seed}  # fmt: skip
    return {key: value for key, value in fields.items() if value is not None}


def _model_result(result: GradeResult, grader: ScoreModelGrader | LabelModelGrader, sample: dict[str, Any],
                  item: Any, *, context: GradeContext) -> None:  # fmt: skip
    assert context.judge is not None  # check_runnable refuses model graders without one
    is_score = isinstance(grader, ScoreModelGrader)
    response_format = judging.score_format() if is_score else judging.label_format(list(grader.labels))  # type: ignore[union-attr]
    request = judging.JudgeRequest(model=grader.model, messages=_messages(grader.input, sample, item),
                                   sampling=_sampling(grader), response_format=response_format)  # fmt: skip
    try:
        reply = context.judge(request)
    except judging.JudgeUnavailable as exc:
        result.errors.model_grader_server_error = True
        result.errors.model_grader_server_error_details = str(exc)[:2000]
        return
    if reply.usage:
        result.token_usage_per_model[grader.model] = dict(reply.usage)
    if reply.text is None:
        result.errors.model_grader_refusal_error = True
        return
    if isinstance(grader, ScoreModelGrader):
        _score(result, grader, reply.text)
    else:
        _label(result, grader, reply.text)


def _score(result: GradeResult, grader: ScoreModelGrader, text: str) -> None:
    low, high = grader.bounds
    score = judging.parse_score(text)
    if score is None or not low <= score <= high:
        result.errors.model_grader_parse_error = True
        return
    result.reward = (score - low) / (high - low)
    result.scores["raw_score"] = score


def _label(result: GradeResult, grader: LabelModelGrader, text: str) -> None:
    label = judging.parse_label(text, list(grader.labels))
    if label is None:
        result.errors.model_grader_parse_error = True
        return
    result.reward = 1.0 if label in grader.passing_labels else 0.0
    result.scores["label"] = label


def _multi(grader: MultiGrader, sample: dict[str, Any], item: Any, *, index: int,
           python: dict[str, list[PythonOutcome]], context: GradeContext) -> GradeResult:  # fmt: skip
    result = GradeResult(reward=0.0, name=grader.name, type=grader.type)
    for key, sub in grader.graders.items():
        outcome = python[key][index] if key in python else None
        sub_result = _simple(sub, sample, item, outcome=outcome, context=context)
        result.sub_rewards[key] = sub_result.reward
        result.errors.merge(sub_result.errors)
        result.invalid_variable = result.invalid_variable or sub_result.invalid_variable
        for model, usage in sub_result.token_usage_per_model.items():
            total = result.token_usage_per_model.setdefault(model, {})
            for name, count in usage.items():
                total[name] = total.get(name, 0) + count
    result.scores = dict(result.sub_rewards)
    if result.errors.any:
        return result  # a failed sub-grader fails the whole grade, as OpenAI's errors do
    try:
        node = parse_formula(grader.calculate_output, names=set(grader.graders))
        result.reward = min(1.0, max(0.0, evaluate(node, result.sub_rewards)))
    except (GraderError, FormulaError):
        result.errors.formula_parse_error = True
    return result
