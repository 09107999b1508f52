"""`POST /v1/models/import` (extension): an existing PEFT LoRA adapter becomes a servable `ft:` model of the project.

The multipart body has a `file` (a tar, tar.gz or zip of the adapter folder), an optional `model` (the base
model id; default: the adapter's `base_model_name_or_path` when that is a base model of this server) and an
optional `suffix`. The archive is written to a temporary folder, never to the artifact store, and checked
(`core.adapter_archive`: safe paths, no links, safetensors only, bounded sizes; `core.lora_adapter`: LoRA
config, rank within `FT_VLLM_MAX_LORA_RANK`, supported target modules, weights whose shapes fit the base model).
Only an adapter that passed every check is stored (`imports/<id>/adapter`) and registered as a `ModelRow`, the
way a job's final adapter is, then announced (`AdapterEvent` ready) so the serve processes load it; a refused
import leaves nothing behind.

Imported model names follow the fine-tuned pattern with the import id in the job's place:
`ft:{base}:{project}:{suffix}:ftimp-…`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlmodel import Session

from core import adapter_archive, base_models, lora_adapter
from core.ids import new_id
from core.lora_adapter import CONFIG_FILE, AdapterError
from core.naming import fine_tuned_model_name, is_suffix
from core.settings import Settings
from core.storage import ArtifactStore
from core.store_keys import imported_adapter_key
from core.tables import ModelRow, Project
from service import models
from service.deps import Database
from service.errors import InvalidRequest
from service.files import UploadReader, boundary_of
from service.protocol import Model

logger = logging.getLogger(__name__)

IMPORT_PREFIX = "ftimp-"  # import ids take the job id's place in names and vLLM adapter names


async def import_adapter(
    *, db: Database, settings: Settings, store: ArtifactStore, project: Project, content_type: str,
    stream: AsyncIterator[bytes], redis: Any,
) -> Model:  # fmt: skip
    """Read, check, store and register an uploaded adapter archive; announce the new model.

    Raises:
        InvalidRequest: a missing `file`, a bad `model` or `suffix`, or an archive that is not a servable
            adapter for the base model (`param: file`, the message says why). Nothing is stored.
        PayloadTooLarge: the archive is over `FT_MAX_UPLOAD_BYTES`.
    """
    scratch = Path(tempfile.mkdtemp(prefix=".import-", dir=settings.home_dir))
    try:
        with (scratch / "archive").open("wb") as sink:
            reader = UploadReader(boundary_of(content_type), sink, limit=settings.max_upload_bytes)
            await reader.read(stream)
        if reader.filename is None:
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        fields = {k: v.strip() for k, v in reader.fields.items() if v.strip()}
        model = await db.run(register, settings=settings, store=store, project=project, scratch=scratch,
                             base_model=fields.get("model"), suffix=fields.get("suffix"))  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    await models.announce_ready(redis, model.id)
    return model


def register(
    *, session: Session, settings: Settings, store: ArtifactStore, project: Project, scratch: Path,
    base_model: str | None, suffix: str | None,
) -> Model:  # fmt: skip
    """Check the archive `scratch/archive` and register its adapter (the blocking part, in a thread).

    Returns:
        The new model.

    Raises:
        InvalidRequest: see `import_adapter`.
    """
    if suffix is not None and not is_suffix(suffix):
        raise InvalidRequest(
            "Invalid value for 'suffix': 1 to 64 of A-Z a-z 0-9 _ - (no `:`).", param="suffix"
        )
    folder = scratch / "adapter"
    folder.mkdir()
    try:
        adapter_archive.unpack(scratch / "archive", folder, max_bytes=settings.max_upload_bytes)
        adapter = lora_adapter.load(folder, max_rank=settings.vllm_max_lora_rank)
    except AdapterError as exc:
        raise InvalidRequest(
            f"The file is not a LoRA adapter that can be served here: {exc}", param="file"
        ) from None
    base = _base(settings, base_model or adapter.config.get("base_model_name_or_path"), asked=base_model)
    try:
        lora_adapter.check_base(adapter, lora_adapter.base_headers(base.path))
    except AdapterError as exc:
        raise InvalidRequest(
            f"The adapter does not fit the base model '{base.id}': {exc}", param="file"
        ) from None
    config = {**adapter.config, "base_model_name_or_path": base.id, "inference_mode": True}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return _store(
        session=session, store=store, project=project, folder=folder, base_model=base.id, suffix=suffix
    )


def _base(settings: Settings, model: Any, *, asked: str | None) -> base_models.BaseModel:
    """The base model the adapter is for, prepared on this server.

    Raises:
        InvalidRequest: unknown (`param: model`), or not named and not in the adapter's config.
    """
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "Missing required parameter: 'model' (the adapter's config names no base model).", param="model"
        )
    base = base_models.get(settings, model)
    if base is None:
        known = ", ".join(base_models.known_ids(settings))
        source = "" if asked else " (from the adapter's `base_model_name_or_path`; pass `model` to choose)"
        raise InvalidRequest(f"Unknown base model '{model}'{source}. Known: {known}.", param="model")
    if not base.prepared:
        raise InvalidRequest(
            f"The weights of the base model '{model}' are not on this server.", param="model"
        )
    return base


def _store(
    *,
    session: Session,
    store: ArtifactStore,
    project: Project,
    folder: Path,
    base_model: str,
    suffix: str | None,
) -> Model:
    """Put the checked adapter in the store, then its model row; the folder goes again if the row fails."""
    import_id = new_id(IMPORT_PREFIX)
    key = imported_adapter_key(import_id)
    name = fine_tuned_model_name(base_model=base_model, project=project.name, suffix=suffix, job_id=import_id)
    store.put_dir(key, folder)  # only the two checked files: `unpack` takes nothing else out
    try:
        row = ModelRow(
            id=name, project_id=project.id, job_id=import_id, base_model=base_model, storage_key=key
        )
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(key)
        raise
    logger.info("model %s: imported as %s (%s)", name, import_id, key)
    return models.to_openai(row, project)
