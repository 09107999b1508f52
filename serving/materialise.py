"""Materialising fine-tuned adapters on the serve process's own disk, where its vLLM server can read them.

An adapter is *materialised* as `FT_HOME/served/<base folder>/<adapter name>/`: the weights hard-linked (or
copied) from the artifact store, and `adapter_config.json` with `base_model_name_or_path` rewritten to the
server's exact `--model` string, so that vLLM's filesystem resolver accepts the folder for on-demand loading.
Only the serve process calls this: the folder must be on the disk of the vLLM server that loads it. Names are
`core.naming.adapter_name()` of our own job ids, and source paths come only from store keys checked by
`ArtifactStore.path`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from core.naming import adapter_name
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import ModelRow
from serving.engine import model_arg, resolver_dir

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STAGING_PREFIX = ".tmp-"  # staging folders start with a dot: the sweep and vLLM's resolver skip them


def vllm_name(row: ModelRow) -> str:
    """The name vLLM knows `row`'s adapter by.

    Args:
        row: the fine-tuned model.

    Returns:
        `core.naming.adapter_name()` of its job id and checkpoint step.
    """
    return adapter_name(row.job_id, row.checkpoint_step)


def materialise(*, settings: Settings, store: ArtifactStore, row: ModelRow) -> Path:
    """Place `row`'s adapter in the resolver folder of its base model (idempotent).

    Args:
        settings: the serve process's settings (its FT_HOME and base models).
        store: the artifact store holding the adapter.
        row: the fine-tuned model.

    Returns:
        The adapter's folder.

    Raises:
        ValueError: the store key is not one of ours, or the base model is unknown.
        FileNotFoundError: the stored adapter lacks `adapter_config.json` or `adapter_model.safetensors`.
        OSError: the folder could not be written.
    """
    source = store.path(row.storage_key)
    missing = [name for name in ADAPTER_FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model {row.id}: adapter in the store lacks {', '.join(missing)}")
    target = resolver_dir(settings, row.base_model) / vllm_name(row)
    config = json.loads((source / ADAPTER_FILES[0]).read_text())
    config["base_model_name_or_path"] = model_arg(settings, row.base_model)
    if _up_to_date(target, config):
        return target
    # Unique per call (not only per process): two concurrent materialisations never share a staging folder.
    staging = target.with_name(f"{STAGING_PREFIX}{target.name}-{uuid.uuid4().hex}")
    try:
        staging.mkdir(parents=True)
        _link_or_copy(source / ADAPTER_FILES[1], staging / ADAPTER_FILES[1])
        (staging / ADAPTER_FILES[0]).write_text(json.dumps(config, indent=2))
        _replace(staging, target, config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("model %s: materialised as %s", row.id, target)
    return target


def _replace(staging: Path, target: Path, config: dict[str, Any]) -> None:
    """Move the complete `staging` folder to `target`; a concurrent writer that got there first is fine."""
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # a folder reappeared between the two calls (renaming onto a non-empty folder fails)
        if not _up_to_date(target, config):
            raise


def _up_to_date(target: Path, config: dict[str, Any]) -> bool:
    try:
        return (target / ADAPTER_FILES[1]).is_file() and json.loads(
            (target / ADAPTER_FILES[0]).read_text()
        ) == config
    except (OSError, ValueError):
        return False


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem: copy
        shutil.copy2(source, target)


def remove(*, settings: Settings, row: ModelRow) -> None:
    """Delete `row`'s folder from the resolver folder, so that vLLM cannot load it on demand any more.

    Args:
        settings: the serve process's settings.
        row: the fine-tuned model.
    """
    remove_name(settings=settings, base_model=row.base_model, name=vllm_name(row))


def remove_name(*, settings: Settings, base_model: str, name: str) -> None:
    """Delete adapter folder `name` from `base_model`'s resolver folder (a folder that is not there is fine).

    Args:
        settings: the serve process's settings.
        base_model: the base model whose resolver folder holds it.
        name: the adapter's vLLM name (a folder the sweep found without a model row).
    """
    shutil.rmtree(resolver_dir(settings, base_model) / name, ignore_errors=True)


def on_disk(*, settings: Settings, base_model: str) -> set[str]:
    """Names of the adapter folders materialised for `base_model` (staging folders excluded).

    Args:
        settings: the serve process's settings.
        base_model: the base model.

    Returns:
        The folder names, which are vLLM adapter names.
    """
    return {
        child.name
        for child in resolver_dir(settings, base_model).iterdir()
        if child.is_dir() and not child.name.startswith(".")
    }
