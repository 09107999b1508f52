"""`/v1/fine_tuning/alpha/graders/run` and `/validate`: a grader definition checked, and run on one sample.

The grading itself is `core.graders` (the same functions the reinforcement runner calls). What is the API's:
turning `GraderError`s into 400s naming the field, checking that every judge model is one the caller may use,
and the judge itself, which calls our own inference gateway (`service.gateway.complete`) from the grading
thread, so a judge is any base model served here or a fine-tuned model of the caller's project.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio.from_thread
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from core import graders
from core.settings import Settings
from core.tables import Project
from service import gateway
from service.errors import APIError, InvalidRequest, ModelNotFound

logger = logging.getLogger(__name__)

JUDGE_MAX_TOKENS = 512  # a judge's completion when `sampling_params.max_completions_tokens` is not given


# --- wire models (openai.types.fine_tuning.alpha.grader_*) ------------------------------------------------
class GraderRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]
    model_sample: str
    item: Any = None


class GraderValidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    errors: dict[str, bool | str | None]
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None = None
    sampled_model_name: str | None = None


class GraderRunResponse(BaseModel):
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, Any] = Field(default_factory=dict)
    model_grader_token_usage_per_model: dict[str, Any] = Field(default_factory=dict)


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any]


# --- operations ---------------------------------------------------------------------------------------------
async def validate(*, settings: Settings, state: Any, engine: Engine, project: Project, redis: gateway.RedisGetter,
                   grader: dict[str, Any]) -> GraderValidateResponse:  # fmt: skip
    """The grader, checked as `run` would check it, without grading anything.

    Raises:
        InvalidRequest: a bad field, a python grader while they are disabled, an unsupported metric, or a judge
            model the caller cannot use (`param` names the field).
    """
    parsed = await _prepare(settings=settings, state=state, engine=engine, project=project, redis=redis,
                            grader=grader)  # fmt: skip
    return GraderValidateResponse(grader=graders.grader_json(parsed[0]))


async def run(*, settings: Settings, state: Any, engine: Engine, project: Project, redis: gateway.RedisGetter,
              body: GraderRunRequest) -> GraderRunResponse:  # fmt: skip
    """The reward of `body.model_sample` for `body.item` by `body.grader`.

    Args:
        settings: the API settings (python graders on or off, sandbox limits).
        state: `app.state` (the gateway's HTTP client).
        engine: the database, to map `ft:` judge models.
        project: the caller's project.
        redis: the app's Redis getter (a judge adapter's on-demand load).
        body: the request.

    Returns:
        OpenAI's `GraderRunResponse`; a sample that could not be graded has reward 0 and its error flags.

    Raises:
        InvalidRequest: the checks of `validate`, or a template naming a field the item or sample lacks.
    """
    grader, context = await _prepare(settings=settings, state=state, engine=engine, project=project, redis=redis,
                                     grader=body.grader)  # fmt: skip
    result = await run_in_threadpool(graders.grade, grader, body.model_sample, body.item, context=context)
    if result.invalid_variable is not None:
        missing = result.invalid_variable
        raise InvalidRequest(missing.message, param=missing.param, code="invalid_variable")
    logger.info("project %s: %s grader %r: reward %.4f", project.id, grader.type, grader.name, result.reward)
    return _response(result)


async def _prepare(*, settings: Settings, state: Any, engine: Engine, project: Project, redis: gateway.RedisGetter,
                   grader: dict[str, Any]) -> tuple[graders.Grader, graders.GradeContext]:  # fmt: skip
    judge = _GatewayJudge(settings=settings, state=state, engine=engine, project=project, redis=redis)
    context = graders.GradeContext(judge=judge, python_graders=settings.python_graders,
                                   sandbox=sandbox_limits(settings))  # fmt: skip
    try:
        parsed = graders.parse_grader(grader)
        graders.check_runnable(parsed, context=context)
    except graders.GraderError as exc:
        raise InvalidRequest(exc.message, param=exc.param) from None
    for param, model in graders.judge_models(parsed).items():
        try:
            await gateway.resolve_target(settings=settings, engine=engine, project=project, model=model)
        except ModelNotFound as exc:
            raise InvalidRequest(exc.message, param=param, code="model_not_found") from None
    return parsed, context


def sandbox_limits(settings: Settings) -> graders.SandboxLimits:
    """The python grader limits of `settings`; the artifact store and FT_HOME are denied to the grader."""
    return graders.SandboxLimits(
        timeout_seconds=settings.python_grader_timeout_seconds,
        cpu_seconds=settings.python_grader_cpu_seconds,
        memory_bytes=settings.python_grader_memory_mb * 1024 * 1024,
        deny=(str(settings.artifacts_dir), str(settings.home_dir)),
    )


def _response(result: graders.GradeResult) -> GraderRunResponse:
    metadata = GraderRunMetadata(
        name=result.name, type=result.type, errors=result.errors.to_dict(), execution_time=result.execution_time,
        scores=result.scores, token_usage=result.token_usage,
    )  # fmt: skip
    return GraderRunResponse(reward=result.reward, metadata=metadata, sub_rewards=result.sub_rewards,
                             model_grader_token_usage_per_model=result.token_usage_per_model)  # fmt: skip


class _GatewayJudge:
    """A `core.graders.Judge` that asks our gateway for a chat completion, from a grading worker thread."""

    def __init__(self, *, settings: Settings, state: Any, engine: Engine, project: Project,
                 redis: gateway.RedisGetter) -> None:  # fmt: skip
        self.settings, self.state, self.engine, self.project, self.redis = (
            settings,
            state,
            engine,
            project,
            redis,
        )

    def __call__(self, request: graders.JudgeRequest) -> graders.JudgeReply:
        return anyio.from_thread.run(self._complete, request)

    async def _complete(self, request: graders.JudgeRequest) -> graders.JudgeReply:
        body = {"model": request.model, "messages": request.messages, "max_completion_tokens": JUDGE_MAX_TOKENS,
                **request.sampling, "response_format": request.response_format}  # fmt: skip
        try:
            response = await gateway.complete(state=self.state, settings=self.settings, engine=self.engine,
                                              project=self.project, endpoint="chat", body=body,
                                              redis=self.redis)  # fmt: skip
        except APIError as exc:
            raise graders.JudgeUnavailable(f"{request.model}: {exc.message}") from None
        answer = json.loads(bytes(response.body))
        message = answer["choices"][0]["message"]
        usage = {
            key: int(value) for key, value in (answer.get("usage") or {}).items() if isinstance(value, int)
        }
        return graders.JudgeReply(text=message.get("content"), refusal=message.get("refusal"), usage=usage)
