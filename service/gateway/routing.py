"""Routing of the inference gateway: which vLLM server a request's `model` goes to, and by what name.

A served base model id goes as is. An `ft:` name must be a live model of the caller's project on a served base
model (anything else is the same 404 `model_not_found`, so that other projects' models cannot be probed) and
goes as its adapter name, `core.naming.adapter_name()` of our own job id: nothing the user typed reaches vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from core.naming import adapter_name
from core.settings import Settings
from core.tables import ModelRow, Project
from service.errors import ModelNotFound


@dataclass
class Target:
    """Where a request goes: the vLLM server of `base_model` and the name it knows the model by."""

    requested: str  # the name the caller sent (echoed in responses)
    base_model: str
    url: str
    upstream: str  # base model id or adapter name
    row: ModelRow | None = None  # the fine-tuned model, for adapter requests

    @property
    def kind(self) -> str:
        return "base" if self.row is None else "adapter"


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model '{model}' does not exist or you do not have access to it.", param="model"
    )


def _live_row(engine: Engine, project: Project, model: str) -> ModelRow | None:
    with Session(engine, expire_on_commit=False) as session:
        query = select(ModelRow).where(
            ModelRow.id == model, ModelRow.project_id == project.id, col(ModelRow.deleted).is_(False)
        )
        return session.exec(query).first()


async def resolve_target(*, settings: Settings, engine: Engine, project: Project, model: str) -> Target:
    """The server and upstream name for `model` as `project` asked for it.

    Args:
        settings: the API settings (`vllm_url()`).
        engine: the database, to map `ft:` names.
        project: the caller's project.
        model: the request's `model`.

    Returns:
        The target; `row` is set for a fine-tuned model.

    Raises:
        ModelNotFound: not a served base model, nor a live fine-tuned model of `project` on a served base.
    """
    if not model.startswith("ft:"):
        url = settings.vllm_url(model)
        if url is None:
            raise _not_found(model)
        return Target(requested=model, base_model=model, url=url, upstream=model)
    row = await run_in_threadpool(_live_row, engine, project, model)
    url = settings.vllm_url(row.base_model) if row is not None else None
    if row is None or url is None:
        raise _not_found(model)
    upstream = adapter_name(row.job_id, row.checkpoint_step)
    return Target(requested=model, base_model=row.base_model, url=url, upstream=upstream, row=row)
