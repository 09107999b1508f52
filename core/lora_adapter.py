"""PEFT LoRA adapters as files, read without torch: the checks an adapter must pass to be served here, and the
exact merge of an adapter into its base model's weights (for `export?format=merged`).

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
`base_model.model.<module>.lora_A.weight` (`[r, in]`) and `...lora_B.weight` (`[out, r]`) for a linear module
`<module>` of the base model (`<module>.weight`, `[out, in]`). Merging adds `scaling * B @ A` to that weight, with
`scaling = lora_alpha / r` (`/ sqrt(r)` with rsLoRA), computed in float32 and rounded once to the base weight's
dtype; every other tensor of the base is copied byte for byte, so the merged files keep the base's headers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import safetensors_file
from core.safetensors_file import FLOAT_DTYPES, Header, SafetensorsError, TensorInfo

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections the trainer adapts and vLLM's LoRA layers serve on the Llama-family base models.
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")  # fmt: skip
# Config keys of PEFT features that change what the weights mean (or add weights) and that neither the merge
# nor vLLM's LoRA layers implement: each must be off (false, null, empty).
_MUST_BE_OFF = ("use_dora", "modules_to_save", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "layer_replication", "trainable_token_indices", "target_parameters",
                "use_qalora", "alora_invocation_tokens")  # fmt: skip
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<kind>[AB])\.weight")
CHUNK_BYTES = 1024 * 1024


class AdapterError(ValueError):
    """The folder is not a LoRA adapter that can be served here; the message says why, naming the file and key."""


@dataclass(frozen=True)
class LoraPair:
    a: TensorInfo  # [r, in]
    b: TensorInfo  # [out, r]


@dataclass(frozen=True)
class Adapter:
    folder: Path
    config: dict[str, Any]
    rank: int
    scaling: float
    pairs: dict[str, LoraPair]  # base weight name (`model.layers.0.self_attn.q_proj.weight`) -> its LoRA pair


@dataclass(frozen=True)
class Member:
    """One file of an export: its name in the archive, its size, and its bytes (read lazily, in chunks)."""

    name: str
    size: int
    chunks: Callable[[], Iterator[bytes]]


def load(folder: Path, *, max_rank: int) -> Adapter:
    """The adapter in `folder`, checked on its own (config and weights' header; no tensor is read).

    Args:
        folder: holds `adapter_config.json` and `adapter_model.safetensors`.
        max_rank: the largest rank the inference servers load (`FT_VLLM_MAX_LORA_RANK`).

    Raises:
        AdapterError: a missing file, a config this server cannot serve, or weights that do not match it.
    """
    config = _config(folder / CONFIG_FILE)
    rank = _rank(config, max_rank)
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise AdapterError(f"{CONFIG_FILE}: `lora_alpha` must be a positive number, got {alpha!r}")
    targets = _targets(config)
    try:
        header = safetensors_file.read_header(folder / WEIGHTS_FILE)
    except FileNotFoundError:
        raise AdapterError(f"the adapter has no {WEIGHTS_FILE}") from None
    except SafetensorsError as exc:
        raise AdapterError(f"{WEIGHTS_FILE}: {exc}") from None
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return Adapter(folder, config, rank, float(scaling), _pairs(header, rank, targets))


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"not a PEFT adapter: no {CONFIG_FILE}") from None
    except (UnicodeDecodeError, ValueError):
        raise AdapterError(f"{CONFIG_FILE} is not JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f'{CONFIG_FILE}: `peft_type` must be "LORA" (only LoRA adapters are served)')
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f'{CONFIG_FILE}: `task_type` must be "CAUSAL_LM", got {config["task_type"]!r}')
    if config.get("bias", "none") != "none":
        raise AdapterError(f'{CONFIG_FILE}: `bias` must be "none" (bias weights are not served)')
    for key in _MUST_BE_OFF:
        if config.get(key):
            raise AdapterError(f"{CONFIG_FILE}: `{key}` is not supported here (it must be off or empty)")
    return config


def _rank(config: dict[str, Any], max_rank: int) -> int:
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{CONFIG_FILE}: `r` must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterError(f"{CONFIG_FILE}: `r` is {rank}, over this server's largest LoRA rank {max_rank}")
    return rank


def _targets(config: dict[str, Any]) -> set[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{CONFIG_FILE}: `target_modules` must be a list of module names")
    unsupported = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unsupported:
        raise AdapterError(
            f"{CONFIG_FILE}: `target_modules` {unsupported} are not supported "
            f"(supported: {', '.join(SUPPORTED_TARGETS)})"
        )
    return set(targets)


def _pairs(header: Header, rank: int, targets: set[str]) -> dict[str, LoraPair]:
    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, info in header.tensors.items():
        match = _LORA_KEY.fullmatch(name)
        if match is None:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} is not a LoRA A or B weight")
        module = match["module"]
        if module.rsplit(".", 1)[-1] not in targets:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} adapts a module not in `target_modules`")
        if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} must be a 2-D F32, F16 or BF16 matrix")
        halves.setdefault(module, {})[match["kind"]] = info
    if not halves:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            raise AdapterError(f"{WEIGHTS_FILE}: module {module!r} lacks its lora_A or lora_B weight")
        if half["A"].shape[0] != rank or half["B"].shape[1] != rank:
            raise AdapterError(f"{WEIGHTS_FILE}: module {module!r} does not have rank `r` = {rank}")
        pairs[f"{module}.weight"] = LoraPair(half["A"], half["B"])
    return pairs


def base_headers(base_dir: Path) -> dict[Path, Header]:
    """The headers of every safetensors file of a base model folder (one file, or the shards of an index).

    Raises:
        AdapterError: the folder has no safetensors weights, or a file is malformed.
    """
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"the base model folder {base_dir.name} has no safetensors weights")
    try:
        return {path: safetensors_file.read_header(path) for path in files}
    except SafetensorsError as exc:
        raise AdapterError(f"the base model's weights are malformed: {exc}") from None


def check_base(adapter: Adapter, headers: dict[Path, Header]) -> None:
    """Check that every LoRA pair fits a linear weight of the base model (same module, same shapes).

    Raises:
        AdapterError: a module the base model lacks, or shapes of another model.
    """
    weights = {name: info for header in headers.values() for name, info in header.tensors.items()}
    for name, pair in adapter.pairs.items():
        base = weights.get(name)
        if base is None or len(base.shape) != 2:
            raise AdapterError(f"{WEIGHTS_FILE}: the base model has no linear weight {name!r}")
        if pair.a.shape[1] != base.shape[1] or pair.b.shape[0] != base.shape[0]:
            raise AdapterError(
                f"{WEIGHTS_FILE}: {name!r} is {list(base.shape)} in the base model, but the adapter's "
                f"A is {list(pair.a.shape)} and B {list(pair.b.shape)}: an adapter of another model"
            )


def delta(adapter: Adapter, name: str) -> np.ndarray:
    """`scaling * B @ A` of base weight `name`, in float32 (as PEFT computes it on CPUs)."""
    pair = adapter.pairs[name]
    with (adapter.folder / WEIGHTS_FILE).open("rb") as handle:
        a = safetensors_file.read_tensor(handle, pair.a)
        b = safetensors_file.read_tensor(handle, pair.b)
    return (b @ a) * np.float32(adapter.scaling)


def merged_file(path: Path, header: Header, adapter: Adapter) -> Member:
    """Safetensors file `path` of the base model with the adapter merged in: same header, same size.

    Raises:
        AdapterError: a weight to merge is not a float tensor.
    """
    for name in adapter.pairs.keys() & header.tensors.keys():
        if header.tensors[name].dtype not in FLOAT_DTYPES:
            raise AdapterError(f"the base weight {name!r} is {header.tensors[name].dtype}, not a float dtype")

    def chunks() -> Iterator[bytes]:
        yield header.raw
        with path.open("rb") as handle:
            for name, info in sorted(header.tensors.items(), key=lambda item: item[1].begin):
                if name in adapter.pairs:
                    weight = safetensors_file.read_tensor(handle, info) + delta(adapter, name)
                    yield safetensors_file.encode(weight, info.dtype)
                else:
                    yield from _copy(handle, info.begin, info.end)

    return Member(path.name, path.stat().st_size, chunks)


def file_member(path: Path, name: str | None = None) -> Member:
    """A file copied as it is."""

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as handle:
            yield from _copy(handle, 0, path.stat().st_size)

    return Member(name or path.name, path.stat().st_size, chunks)


def bytes_member(name: str, data: bytes) -> Member:
    return Member(name, len(data), lambda: iter([data]))


def _copy(handle: Any, begin: int, end: int) -> Iterator[bytes]:
    handle.seek(begin)
    left = end - begin
    while left > 0:
        chunk = handle.read(min(CHUNK_BYTES, left))
        if not chunk:
            raise OSError("the file got shorter while it was read")
        left -= len(chunk)
        yield chunk
