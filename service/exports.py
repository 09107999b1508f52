"""`GET /v1/models/{model}/export?format=adapter|merged`: a fine-tuned model's weights as an uncompressed tar.

The merge runs here, without torch (the API image has none): `core.lora_adapter` adds `scaling * B @ A` to each
adapted weight in numpy, rounded once to the base weight's dtype, tensor by tensor while the archive streams;
every other byte is the base model's. The archive's size is known before the first byte (`content-length`).
Tenancy as everywhere: another project's model, a deleted one or a checkpoint shared with the caller is a 404.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from sqlmodel import Session

from core import base_models, model_export
from core.lora_adapter import AdapterError, Member
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import Project
from service import models
from service.errors import APIError, InvalidRequest, ServiceUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Export:
    filename: str  # of the archive, for `content-disposition`
    members: list[Member]

    @property
    def size(self) -> int:
        return model_export.tar_size(self.members)

    def stream(self) -> Iterator[bytes]:
        return model_export.tar_stream(self.members)


def prepare(
    *, session: Session, settings: Settings, store: ArtifactStore, project: Project, model: str, format: str
) -> Export:
    """What the export of `model` in `format` holds (nothing is read yet but headers).

    Raises:
        InvalidRequest: an unknown `format`, or a base model.
        ModelNotFound: unknown, deleted, or another project's model.
        ServiceUnavailable: the base model's weights are not on this server.
    """
    if format not in model_export.FORMATS:
        raise InvalidRequest(
            f"Invalid value for 'format': expected one of {', '.join(model_export.FORMATS)}.", param="format"
        )
    if model in base_models.known_ids(settings):
        raise InvalidRequest(
            f"'{model}' is a base model: only fine-tuned models are exported.", param="model"
        )
    row = models.live_row(session, project, model)
    base = base_models.get(settings, row.base_model)
    if base is None or not base.prepared:
        raise ServiceUnavailable(f"The weights of the base model '{row.base_model}' are not on this server.")
    adapter_dir = store.path(row.storage_key)
    try:
        if format == "adapter":
            members = model_export.adapter_members(adapter_dir, base.path, base_model=row.base_model)
        else:
            members = model_export.merged_members(
                adapter_dir, base.path, max_rank=settings.vllm_max_lora_rank
            )
    except AdapterError as exc:
        logger.error("model %s: cannot export (%s)", model, exc)
        raise APIError(f"The stored adapter of '{model}' cannot be exported: {exc}") from None
    return Export(f"{_safe(model)}-{format}.tar", members)


def _safe(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", model).strip("_")[:200] or "model"
