"""`tuneworks models list|prepare|export|import`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from core import base_models
from core.db import init_db, make_engine
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import ModelRow, Project


def list_models(settings: Settings) -> int:
    for model_id in base_models.known_ids(settings):
        model = base_models.get(settings, model_id)
        assert model is not None
        state = "prepared" if model.prepared else "not prepared"
        print(f"{model_id}\t{state}\t{model.path}")
    return 0


def prepare_models(settings: Settings, model_ids: list[str]) -> int:
    from core.weights import UnknownModel, ensure_prepared

    for model_id in model_ids:
        try:
            model = ensure_prepared(settings, model_id)
        except (UnknownModel, FileNotFoundError) as exc:
            print(f"error: cannot prepare {model_id}: {exc}", file=sys.stderr)
            return 1
        print(f"{model_id}\t{model.path}")
    return 0


def add_commands(models: Any) -> None:
    """`tuneworks models export|import` (the `models` subparsers of `tuneworks.cli`)."""
    from core.model_export import FORMATS

    export = models.add_parser(
        "export", help="write a fine-tuned model's adapter or merged weights to a folder"
    )
    export.add_argument("model", help="the fine-tuned model (ft:...) or checkpoint name")
    export.add_argument(
        "--format", choices=FORMATS, default="adapter", help="adapter (PEFT) or merged (full)"
    )
    export.add_argument("-o", "--output", required=True, type=Path, help="folder to write (new or empty)")
    imported = models.add_parser("import", help="register a PEFT LoRA adapter archive as a project's model")
    imported.add_argument("archive", type=Path, help="tar, tar.gz or zip of the adapter folder")
    imported.add_argument("--project", required=True, help="the project name that will own the model")
    imported.add_argument("--model", dest="base_model", help="base model id (default: from the adapter)")
    imported.add_argument("--suffix", help="model name suffix")


def dispatch(args: Any, settings: Settings) -> int:
    if args.models_command == "list":
        return list_models(settings)
    if args.models_command == "export":
        return export_model(settings, args.model, fmt=args.format, output=args.output)
    if args.models_command == "import":
        return import_model(settings, args.archive, project=args.project, base_model=args.base_model,
                            suffix=args.suffix)  # fmt: skip
    return prepare_models(settings, args.model or settings.base_model_ids)


def export_model(settings: Settings, model: str, *, fmt: str, output: Path) -> int:
    """`tuneworks models export MODEL --format adapter|merged -o DIR`: the files the API's export archive holds."""
    from core import model_export
    from core.lora_adapter import AdapterError

    row = _live_model(settings, model)
    entry = base_models.get(settings, row.base_model) if row is not None else None
    if row is None or entry is None or not entry.prepared:
        print(f"error: no live fine-tuned model {model} with its base weights here", file=sys.stderr)
        return 1
    if output.exists() and any(output.iterdir()):
        print(f"error: {output} is not empty", file=sys.stderr)
        return 1
    adapter_dir = ArtifactStore(settings.artifacts_dir).path(row.storage_key)
    try:
        if fmt == "merged":
            members = model_export.merged_members(
                adapter_dir, entry.path, max_rank=settings.vllm_max_lora_rank
            )
        else:
            members = model_export.adapter_members(adapter_dir, entry.path, base_model=row.base_model)
    except AdapterError as exc:
        print(f"error: cannot export {model}: {exc}", file=sys.stderr)
        return 1
    output.mkdir(parents=True, exist_ok=True)
    model_export.write_folder(members, output)
    print(output)
    return 0


def _live_model(settings: Settings, model: str) -> ModelRow | None:
    engine = make_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session:
            query = select(ModelRow).where(ModelRow.id == model, col(ModelRow.deleted).is_(False))
            return session.exec(query).first()
    finally:
        engine.dispose()


def import_model(settings: Settings, archive: Path, *, project: str, base_model: str | None,
                 suffix: str | None) -> int:  # fmt: skip
    """`tuneworks models import ARCHIVE --project NAME`: prints the new model's name."""
    import shutil
    import tempfile

    from service import model_import
    from service.errors import APIError

    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    scratch = Path(tempfile.mkdtemp(prefix=".import-", dir=settings.home_dir))
    try:
        with Session(engine) as session:
            owner = session.exec(select(Project).where(Project.name == project)).first()
            if owner is None:
                print(f"error: no project {project}", file=sys.stderr)
                return 1
            shutil.copyfile(archive, scratch / "archive")
            created = model_import.register(session=session, settings=settings, store=ArtifactStore(settings.artifacts_dir),
                                            project=owner, scratch=scratch, base_model=base_model, suffix=suffix)  # fmt: skip
    except APIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        engine.dispose()
    asyncio.run(_announce(settings, created.id))
    print(created.id)
    return 0


async def _announce(settings: Settings, name: str) -> None:
    from core import queue

    try:
        redis = await asyncio.wait_for(queue.connect(settings.resolved_redis_url), 5)
        try:
            await queue.publish_adapter_event(redis, "ready", name)
        finally:
            await redis.aclose()
    except Exception as exc:  # noqa: BLE001  the serve process's sweep finds the model anyway
        print(f"warning: could not announce {name} on Redis ({exc})", file=sys.stderr)
