"""The torch-free pieces of weights export and import: bfloat16 conversion bit for bit as torch does it, the
safetensors header checks, the archive checks that need no API (sizes, repeats), and the merge on a float32 base."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from core import adapter_archive, lora_adapter, model_export, safetensors_file
from core.lora_adapter import AdapterError
from core.safetensors_file import SafetensorsError


def test_bfloat16_rounding_is_torchs() -> None:
    import torch

    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.00390625, 1.01171875, 3.4e38, 1e-40], np.float32),
    ]).astype(np.float32)  # fmt: skip
    ours = safetensors_file.to_bfloat16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)  # torch's own NaN bits vary by code path (0x7fc0, 0xffff): any NaN is fine
    assert (
        np.array_equal(ours[~nan], theirs[~nan])
        and np.isnan((ours[nan].astype(np.uint32) << 16).view(np.float32)).all()
    )
    back = safetensors_file.read_tensor(
        io.BytesIO(ours.tobytes()), safetensors_file.TensorInfo("BF16", (len(values),), 0, 2 * len(values))
    )
    assert np.array_equal(back, torch.from_numpy(values).to(torch.bfloat16).float().numpy(), equal_nan=True)


def _file(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),  # shorter than announced
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),  # size != shape
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),  # a gap
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),  # unknown dtype
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ({"__metadata__": {"k": 1}}, b""),
    ],
)
def test_malformed_safetensors_headers_are_refused(tmp_path: Path, header: dict, data: bytes) -> None:
    with pytest.raises(SafetensorsError):
        safetensors_file.read_header(_file(tmp_path / "x.safetensors", header, data))


def test_a_huge_header_length_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(SafetensorsError):
        safetensors_file.read_header(path)


def _tar(path: Path, names: list[str], size: int = 1) -> Path:
    with tarfile.open(path, mode="w") as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = size
            archive.addfile(info, io.BytesIO(b"x" * size))
    return path


@pytest.mark.parametrize(
    ("names", "size", "needle"),
    [
        (["adapter_config.json", "adapter_config.json", "adapter_model.safetensors"], 1, "twice"),
        ([f"f{i}" for i in range(adapter_archive.MAX_MEMBERS + 1)], 1, "more than"),
        (["adapter_config.json", "adapter_model.safetensors"], 600, "unpacks to more than"),
        (["a/b/adapter_config.json", "a/b/adapter_model.safetensors"], 1, "one folder"),
        (["x/adapter_config.json", "y/adapter_config.json"], 1, "exactly one"),
        (["adapter_config.json", "weights.pt"], 1, "pickled"),
    ],
)
def test_archive_checks(tmp_path: Path, names: list[str], size: int, needle: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(AdapterError, match=needle):
        adapter_archive.unpack(_tar(tmp_path / "a.tar", names, size), dest, max_bytes=1000)
    assert list(dest.iterdir()) == []


def test_merge_of_a_float32_base_is_w_plus_scaled_ba(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (2, 5), (6, 2)))
    norm = rng.standard_normal(6).astype(np.float32)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file(
        {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": norm}, str(base / "model.safetensors")
    )
    (base / "config.json").write_text("{}")
    key = "base_model.model.model.layers.0.mlp.up_proj"
    save_file(
        {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(adapter / "adapter_model.safetensors")
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "target_modules": ["up_proj"], "use_rslora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    model_export.write_folder(model_export.merged_members(adapter, base, max_rank=8), out)
    from safetensors.numpy import load_file

    merged = load_file(str(out / "model.safetensors"))
    np.testing.assert_allclose(
        merged["model.layers.0.mlp.up_proj.weight"], w + (3 / np.sqrt(2)) * (b @ a), rtol=1e-6
    )
    assert np.array_equal(merged["model.norm.weight"], norm)
    assert (out / "config.json").read_text() == "{}"
    with pytest.raises(AdapterError, match="largest LoRA rank"):
        lora_adapter.load(adapter, max_rank=1)
