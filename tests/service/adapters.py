"""PEFT LoRA adapters on the tiny model for the export and import tests: random, non-zero A and B (no training),
saved by PEFT itself, so the files are exactly what users bring."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.base_models import TINY, folder_name
from core.ids import new_id
from core.naming import fine_tuned_model_name
from core.storage import ArtifactStore
from core.store_keys import adapter_key
from core.tables import ModelRow, Project
from tests.conftest import MODELS_CACHE

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_path() -> Path:
    return MODELS_CACHE / folder_name(TINY)


def make_adapter(out: Path, *, rank: int = 8, alpha: int = 16, seed: int = 0, **config: Any) -> Path:
    """A PEFT adapter folder of the tiny model in `out` (random weights of `seed`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.bfloat16)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=config.pop("target_modules", TARGETS),
                      init_lora_weights=False, task_type="CAUSAL_LM", **config)  # type: ignore[arg-type]  # fmt: skip
    get_peft_model(model, lora).save_pretrained(str(out))
    return out


def tar_of(
    folder: Path, *, prefix: str = "", gz: bool = False, extra: dict[str, bytes] | None = None
) -> bytes:
    """The files of `folder` (plus `extra` name -> bytes) as a tar, under `prefix`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, arcname=prefix + path.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def register_model(db: Engine, store: ArtifactStore, adapter: Path, *, project: str = "proj-test",
                   suffix: str = "exp", step: int | None = None) -> str:  # fmt: skip
    """Store `adapter` as a job's final adapter (or checkpoint) of `project` and register its model, as the worker
    does. Returns the model name."""
    job_id = new_id("ftjob-")
    key = adapter_key(job_id)
    store.put_dir(key, adapter)
    with Session(db) as session:
        owner = session.exec(select(Project).where(Project.name == project)).one()
        name = fine_tuned_model_name(base_model=TINY, project=project, suffix=suffix, job_id=job_id)
        if step is not None:
            name = f"{name}:ckpt-step-{step}"
        session.add(ModelRow(id=name, project_id=owner.id, job_id=job_id, base_model=TINY, storage_key=key,
                             checkpoint_step=step))  # fmt: skip
        session.commit()
    return name


def config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())
