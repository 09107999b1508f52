"""What an export of a fine-tuned model holds, and the uncompressed tar stream that carries it (no torch).

- `adapter`: the PEFT adapter (`adapter_config.json` with `base_model_name_or_path` set to the base model's id,
  `adapter_model.safetensors`) and the base model's tokenizer files;
- `merged`: the base model's folder (config, generation config, tokenizer, every safetensors file and its index)
  with the adapter merged into the weights (`core.lora_adapter.merged_file`), loadable by
  `AutoModelForCausalLM.from_pretrained` and vLLM like the base model itself.

Files sit at the archive's root. The tar is built as it is sent, one tensor in memory at a time, and its size is
known beforehand (the merged files have the base's sizes), so a response can say its `content-length`.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from core import lora_adapter
from core.lora_adapter import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, AdapterError, Member

FORMATS = ("adapter", "merged")
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def adapter_members(adapter_dir: Path, base_dir: Path, *, base_model: str) -> list[Member]:
    """The files of an `adapter` export.

    Raises:
        AdapterError: the stored adapter lacks its config.
    """
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise AdapterError(f"the stored adapter has no readable {CONFIG_FILE}") from None
    config["base_model_name_or_path"] = base_model
    members = [lora_adapter.bytes_member(CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())]
    members.append(lora_adapter.file_member(adapter_dir / WEIGHTS_FILE))
    return members + [
        lora_adapter.file_member(base_dir / n) for n in TOKENIZER_FILES if (base_dir / n).is_file()
    ]


def merged_members(adapter_dir: Path, base_dir: Path, *, max_rank: int) -> list[Member]:
    """The files of a `merged` export: every top-level file of the base folder, its weights merged.

    Raises:
        AdapterError: the adapter does not fit the base model, or the base has pickled weights only.
    """
    adapter = lora_adapter.load(adapter_dir, max_rank=max_rank)
    headers = lora_adapter.base_headers(base_dir)
    lora_adapter.check_base(adapter, headers)
    members = []
    for path in sorted(base_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix in (*_PICKLED, ".lock"):
            continue
        if path in headers:
            members.append(lora_adapter.merged_file(path, headers[path], adapter))
        else:
            members.append(lora_adapter.file_member(path))
    return members


def tar_size(members: list[Member]) -> int:
    """The exact length of `tar_stream(members)`."""
    size = sum(_BLOCK + _padded(m.size) for m in members) + 2 * _BLOCK
    return _padded(size, _RECORD)


def tar_stream(members: list[Member], *, mtime: int = 0) -> Iterator[bytes]:
    """An uncompressed POSIX (ustar) tar of `members`, chunk by chunk.

    Raises:
        OSError: a file changed size while it was read.
    """
    written = 0
    for member in members:
        info = tarfile.TarInfo(member.name)
        info.size, info.mtime, info.mode = member.size, mtime, 0o644
        header = info.tobuf(format=tarfile.USTAR_FORMAT)
        yield header
        sent = 0
        for chunk in member.chunks():
            sent += len(chunk)
            yield chunk
        if sent != member.size:
            raise OSError(f"{member.name}: {sent} bytes read, {member.size} announced")
        yield b"\0" * (_padded(sent) - sent)
        written += len(header) + _padded(sent)
    end = written + 2 * _BLOCK
    yield b"\0" * (_padded(end, _RECORD) - written)


def write_folder(members: list[Member], folder: Path) -> None:
    """Write `members` as files of `folder` (which must exist)."""
    for member in members:
        with (folder / member.name).open("wb") as handle:
            for chunk in member.chunks():
                handle.write(chunk)


def _padded(size: int, unit: int = _BLOCK) -> int:
    return -(-size // unit) * unit
