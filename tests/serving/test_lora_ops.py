"""`serving.lora_ops` against vLLM's own PyTorch LoRA ops (no server): equal for real slots, zero for -1.

vLLM's ops are the reference for non-negative indices; for index -1 (no adapter) the delta must be zero, which
the reference gets wrong (it applies the last slot), so those rows are checked against zero instead.
"""

from __future__ import annotations

import random

import pytest
import torch

from serving import lora_ops

SLOTS = 4
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def _reference():  # type: ignore[no-untyped-def]
    from vllm.lora.ops.torch_ops import lora_ops as ref

    # The vLLM originals, even when the plugin has patched the module in this process.
    return ref.__dict__.get("_tuneworks_originals", ref.__dict__)


def _segments(kind: str, rng: random.Random) -> list[tuple[int, int]]:
    """(slot, length) per sequence, as vLLM's `compute_meta` gives them (or rougher: empty segments too)."""
    n = rng.randint(1, 6)
    lengths = [rng.randint(1, 40) for _ in range(n)]
    if kind == "all_base":
        return [(-1, length) for length in lengths]
    if kind == "one_slot":
        slot = rng.randrange(SLOTS)
        return [(slot, length) for length in lengths]
    if kind == "interleaved":  # base, a, base, b, ... and a slot seen in several segments
        return [(-1 if i % 2 == 0 else rng.randrange(2), rng.randint(1, 9)) for i in range(2 * n + 1)]
    if kind == "empty_segments":
        return [(rng.choice([-1, 0, 1, 3]), rng.choice([0, 0, 3, 17])) for _ in range(n + 3)] + [(2, 5)]
    assert kind == "random"
    return [(rng.randrange(-1, SLOTS), length) for length in lengths]


KINDS = ["all_base", "one_slot", "interleaved", "empty_segments", "random"]
DTYPES = [torch.float32, torch.bfloat16]


Meta = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]  # vLLM's prefill_metadata


def _close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(ours, theirs, atol=TOL[dtype]["atol"], rtol=TOL[dtype]["rtol"])


def _case(kind: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, Meta, int, random.Random]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    segments = _segments(kind, rng)
    slots = torch.tensor([s for s, _ in segments], dtype=torch.long)
    lens = torch.tensor([n for _, n in segments], dtype=torch.long)
    per_token = torch.repeat_interleave(slots, lens)
    starts = torch.cumsum(lens, 0) - lens
    tokens = int(lens.sum())
    meta: Meta = (starts, lens, slots, len(segments), int(lens.max()), tokens)
    return per_token, meta, tokens, rng


def _check(
    ours: torch.Tensor,
    theirs: torch.Tensor,
    per_token: torch.Tensor,
    base_rows: torch.Tensor,
    dtype: torch.dtype,
) -> None:
    """Rows with a slot equal the reference (to `dtype`'s tolerance); rows without one equal `base_rows`."""
    real = per_token >= 0
    _close(ours[real], theirs[real], dtype)
    assert torch.equal(ours[~real], base_rows[~real])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_matches_vllm(kind: str, dtype: torch.dtype, seed: int) -> None:
    ref = _reference()
    per_token, meta, tokens, rng = _case(kind, dtype, seed)
    hidden, rank = rng.choice([(576, 16), (1536, 16), (64, 8)])
    x = torch.randn(tokens, hidden, dtype=dtype)
    weights = torch.randn(SLOTS, 1, rank, hidden, dtype=dtype)
    scaling = rng.choice([1.0, 0.5, 2.0])
    for out_dtype in (torch.float32, dtype):  # vLLM's buffer is float32; the op uses the output's dtype
        ours = torch.full((tokens, rank), 7.0, dtype=out_dtype)
        lora_ops.sgmv_shrink(x, weights, ours, *meta, scaling)
        theirs = torch.full((tokens, rank), 7.0, dtype=out_dtype)
        ref["sgmv_shrink"](x, weights, theirs, *meta[:2], meta[2].clamp(min=0), *meta[3:], scaling)
        _check(
            ours, theirs, per_token, torch.zeros_like(ours), dtype
        )  # shrink assigns: base rows become zero
        ours_b = torch.full((tokens, rank), 7.0, dtype=out_dtype)
        lora_ops.bgmv_shrink(x, weights, ours_b, per_token, scaling)
        _close(ours_b, ours, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_matches_vllm(kind: str, dtype: torch.dtype, add_inputs: bool) -> None:
    ref = _reference()
    per_token, meta, tokens, rng = _case(kind, dtype, 3)
    rank, width = 16, 960  # qkv of SmolLM2: 576 + 192 + 192
    offset, size = rng.choice([(0, 576), (576, 192), (768, 192)])
    x = torch.randn(tokens, rank, dtype=torch.float32)  # the float32 shrink buffer
    weights = torch.randn(SLOTS, 1, size, rank, dtype=dtype)
    start = torch.randn(tokens, width, dtype=dtype)
    ours, theirs = start.clone(), start.clone()
    lora_ops.sgmv_expand_slice(x, weights, ours, *meta, offset, size, add_inputs)
    ref["sgmv_expand_slice"](
        x, weights, theirs, *meta[:2], meta[2].clamp(min=0), *meta[3:], offset, size, add_inputs
    )
    expected_base = start.clone()
    if not add_inputs:
        expected_base[:, offset : offset + size] = 0
    _check(ours, theirs, per_token, expected_base, dtype)
    outside = torch.ones(width, dtype=torch.bool)
    outside[offset : offset + size] = False
    assert torch.equal(ours[:, outside], start[:, outside])  # other slices untouched
    ours_b = start.clone()
    lora_ops.bgmv_expand_slice(x, weights, ours_b, per_token, offset, size, add_inputs)
    _close(ours_b, ours, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_matches_vllm_with_padding(kind: str, dtype: torch.dtype, add_inputs: bool) -> None:
    ref = _reference()
    per_token, meta, tokens, rng = _case(kind, dtype, 4)
    rank = 16
    out_width, lora_width = rng.choice([(576, 576), (600, 576), (576, 640)])  # vLLM pads either side
    x = torch.randn(tokens, rank, dtype=torch.float32)
    weights = torch.randn(SLOTS, 1, lora_width, rank, dtype=dtype)
    start = torch.randn(tokens, out_width, dtype=dtype)
    ours, theirs = start.clone(), start.clone()
    lora_ops.sgmv_expand(x, weights, ours, *meta, add_inputs)
    ref["sgmv_expand"](x, weights, theirs, *meta[:2], meta[2].clamp(min=0), *meta[3:], add_inputs)
    common = min(out_width, lora_width)
    expected_base = start.clone()
    if not add_inputs:
        expected_base[:, :common] = 0
    _check(ours, theirs, per_token, expected_base, dtype)
    ours_b = start.clone()
    lora_ops.bgmv_expand(x, weights, ours_b, per_token, add_inputs)
    _close(ours_b, ours, dtype)


@pytest.mark.parametrize("slot", [-1, 2])
def test_expand_broadcasts_a_single_row_as_vllm_does(slot: int) -> None:
    ref = _reference()
    x = torch.randn(1, 8)
    weights = torch.randn(SLOTS, 1, 12, 8)
    start = torch.randn(5, 12)
    ours, theirs = start.clone(), start.clone()
    lora_ops.bgmv_expand(x, weights, ours, torch.tensor([slot]), True)
    ref["bgmv_expand"](x, weights, theirs, torch.tensor([max(slot, 0)]), True)
    if slot < 0:
        assert torch.equal(ours, start)
    else:
        torch.testing.assert_close(ours, theirs)


def test_expand_writes_only_the_rows_the_output_has() -> None:
    ref = _reference()
    x = torch.randn(6, 8)
    weights = torch.randn(SLOTS, 1, 12, 8)
    indices = torch.tensor([1, 1, 3, 0, 0, 3])
    ours, theirs = torch.zeros(4, 12), torch.zeros(4, 12)
    lora_ops.bgmv_expand(x, weights, ours, indices, False)
    ref["bgmv_expand"](x, weights, theirs, indices, False)
    torch.testing.assert_close(ours, theirs)


def test_three_dimensional_weight_stacks_work_too() -> None:
    ref = _reference()
    x = torch.randn(5, 8)
    weights = torch.randn(SLOTS, 4, 8)
    indices = torch.tensor([0, 0, 2, 2, 1])
    ours, theirs = torch.zeros(5, 4), torch.zeros(5, 4)
    lora_ops.bgmv_shrink(x, weights, ours, indices, 0.25)
    ref["bgmv_shrink"](x, weights, theirs, indices, 0.25)
    torch.testing.assert_close(ours, theirs)


def test_plans_group_segments_by_slot_and_skip_base() -> None:
    groups, covered, total = lora_ops.plan([-1, 0, -1, 1, 0, 2], [3, 2, 0, 4, 1, 0])
    assert not covered and total == 10
    by_slot = {slot: rows for slot, rows in groups}
    assert set(by_slot) == {0, 1}  # slot 2's only segment is empty
    rows = by_slot[0]
    assert isinstance(rows, torch.Tensor) and torch.equal(
        rows, torch.tensor([3, 4, 9])
    )  # two segments: an index tensor
    assert by_slot[1] == slice(5, 9)  # one segment: a slice, no copy
    assert lora_ops.plan([1, 1], [2, 3]).covered


# --- the fused layer (`fused_lora_linear`, what the plugin installs as PunicaWrapperCPU.add_lora_linear) ---

PACKED = {  # output slices per layer of SmolLM2 (qkv, o, gate_up, down), and small ones
    "qkv": ((576, 192, 192), 576),
    "o": ((576,), 576),
    "gate_up": ((1536, 1536), 576),
    "down": ((576,), 1536),
    "small_qkv": ((64, 32, 32), 48),
}


def _layer(
    slices: tuple[int, ...], fan_in: int, ranks: tuple[int, ...], max_rank: int, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """vLLM's stacks (`[slots, 1, max_rank, in]`, `[slots, 1, out, max_rank]`), slice i's adapter of rank
    `ranks[i]` zero-padded to `max_rank` as vLLM's `set_lora` leaves it."""
    lora_a, lora_b = [], []
    for out, rank in zip(slices, ranks, strict=True):
        a = torch.zeros(SLOTS, 1, max_rank, fan_in, dtype=dtype)
        b = torch.zeros(SLOTS, 1, out, max_rank, dtype=dtype)
        a[:, :, :rank] = torch.randn(SLOTS, 1, rank, fan_in) * 0.1
        b[:, :, :, :rank] = torch.randn(SLOTS, 1, out, rank) * 0.1
        lora_a.append(a)
        lora_b.append(b)
    return tuple(lora_a), tuple(lora_b)


def _plain_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    slices: tuple[int, ...],
    per_token: torch.Tensor,
) -> torch.Tensor:
    """Token by token, slice by slice, in float64: y[i, slice] += scale * x[i] @ A[slot].T @ B[slot].T."""
    out = y.double().clone()
    for i, slot in enumerate(per_token.tolist()):
        if slot < 0:
            continue
        offset = 0
        for a, b, size in zip(lora_a, lora_b, slices, strict=True):
            h = scale * (x[i].double() @ a[slot, 0].double().T)
            out[i, offset : offset + size] += h @ b[slot, 0].double().T
            offset += size
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", ["qkv", "gate_up", "down", "small_qkv"])
@pytest.mark.parametrize("onednn", [True, False])
def test_fused_layer_matches_a_plain_reference(
    kind: str, dtype: torch.dtype, layer: str, onednn: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lora_ops, "USE_ONEDNN", onednn)
    monkeypatch.setattr(lora_ops, "_ONEDNN_STATE", [])
    per_token, _meta, tokens, rng = _case(kind, dtype, 5)
    slices, fan_in = PACKED[layer]
    ranks = tuple(rng.choice([16, 8, 4]) for _ in slices)  # packed slices may have different ranks
    lora_a, lora_b = _layer(slices, fan_in, ranks, 16, dtype)
    x = torch.randn(tokens, fan_in, dtype=dtype)
    start = torch.randn(tokens, sum(slices), dtype=dtype)
    scale = rng.choice([1.0, 0.5])
    expected = _plain_reference(start, x, lora_a, lora_b, scale, slices, per_token)
    for dense_max_rows in (0, 10**6):  # one matmul pair per slot, and all slots at once
        monkeypatch.setattr(lora_ops, "DENSE_MAX_ROWS", dense_max_rows)
        y = start.clone()
        step = lora_ops.Step(per_token)
        assert lora_ops.fused_lora_linear(y, x, lora_a, lora_b, scale, slices, step)
        base = per_token < 0
        assert torch.equal(y[base], start[base])  # base tokens: exactly the base output
        if dtype == torch.float32:
            torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
        else:  # the model's dtype throughout, as vLLM's expand (bf16 rounding of the product and of y)
            torch.testing.assert_close(y.double(), expected, atol=5e-2, rtol=2e-2)


def test_fused_layer_one_slot_and_mixed_base_take_their_fast_forms() -> None:
    one = lora_ops.Step(torch.tensor([2, 2, 2]))
    assert one.single == 2 and one.slots == (2,)
    mixed = lora_ops.Step(torch.tensor([2, -1, 2]))
    assert mixed.single == -1 and mixed.slots == (2,)
    assert lora_ops.Step(torch.tensor([-1, -1])).slots == ()
    mask = mixed.mask(SLOTS, 3, torch.float32, 0.5)
    assert mask.shape == (3, SLOTS * 3)
    assert torch.equal(mask[1], torch.zeros(SLOTS * 3))  # base row: no slot
    assert torch.equal(mask[0, 6:9], torch.full((3,), 0.5)) and mask[0].sum() == 1.5


def test_fused_layer_sees_new_adapter_weights() -> None:
    """The stacked weights are cached per layer; writing a slot (vLLM's set_lora) must not serve stale ones."""
    slices, fan_in = PACKED["small_qkv"]
    lora_a, lora_b = _layer(slices, fan_in, (16, 16, 16), 16, torch.float32)
    x = torch.randn(4, fan_in)
    per_token = torch.tensor([1, 1, 1, 1])

    def run() -> torch.Tensor:
        y = torch.zeros(4, sum(slices))
        assert lora_ops.fused_lora_linear(y, x, lora_a, lora_b, 1.0, slices, lora_ops.Step(per_token))
        return y

    first = run()
    lora_b[1][1, 0].copy_(torch.randn(32, 16))  # in place, as set_lora does: the version counter moves
    second = run()
    zeros = torch.zeros(4, sum(slices))
    torch.testing.assert_close(
        second, _plain_reference(zeros, x, lora_a, lora_b, 1.0, slices, per_token).float()
    )
    assert not torch.equal(first, second)
    with (
        torch.inference_mode()
    ):  # tensors without version counters: the plugin's weights_changed() is the key
        a_inf = tuple(t.clone() for t in lora_a)
        b_inf = tuple(t.clone() for t in lora_b)
        y = torch.zeros(4, sum(slices))
        lora_ops.fused_lora_linear(y, x, a_inf, b_inf, 1.0, slices, lora_ops.Step(per_token))
        b_inf[0][1, 0].zero_()
        lora_ops.weights_changed()
        y2 = torch.zeros(4, sum(slices))
        lora_ops.fused_lora_linear(y2, x, a_inf, b_inf, 1.0, slices, lora_ops.Step(per_token))
        assert torch.count_nonzero(y2[:, :64]) == 0 and torch.count_nonzero(y[:, :64]) > 0


def test_fused_layer_declines_layouts_it_does_not_handle() -> None:
    slices, fan_in = PACKED["small_qkv"]
    lora_a, lora_b = _layer(slices, fan_in, (16, 16, 16), 16, torch.float32)
    step = lora_ops.Step(torch.tensor([0, 0, 0]))
    x = torch.randn(3, fan_in)
    wider = torch.zeros(3, sum(slices) + 8)  # output wider than the slices: vLLM's per-slice path handles it
    assert not lora_ops.fused_lora_linear(wider, x, lora_a, lora_b, 1.0, slices, step)
    assert torch.count_nonzero(wider) == 0
    padded = torch.zeros(5, sum(slices))  # more rows than the step's mapping
    assert not lora_ops.fused_lora_linear(padded, torch.randn(5, fan_in), lora_a, lora_b, 1.0, slices, step)
