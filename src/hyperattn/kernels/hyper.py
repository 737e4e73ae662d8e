"""HyperAttention forward on the GPU (mirrors :mod:`hyperattn.reference.hyper`), same function for the same draws.

The reference's plan (:func:`~hyperattn.reference.hyper.causal_plan`) is flattened into a
few launches:

- exact pieces: in the causal recursion they join, per query row, into one contiguous
  causal key range (a segment's off-diagonal exact block followed by its diagonal
  leaves), so they run as one :func:`~hyperattn.kernels.attention.range_attention`
  launch (a second one only for an exact prefix with ``Nk > Nq`` that is not adjacent);
- approximate pieces: grouped into launches whose pieces have disjoint query and key
  ranges (one launch per recursion level). Per group, one hashing pass
  (:func:`~hyperattn.kernels.lsh.lsh_sort_keys`) and one stable integer sort per head
  give every piece its sorted order; one fused
  :func:`~hyperattn.kernels.attention.gathered_attention` launch then attends each sorted
  query block to its key block and the piece's residual samples, and LSE-merges the result
  into the output rows in place.

The backward (:func:`hyper_backward`) keeps the call's :class:`HyperSelection` (sorted
orders and sample tables, O(N)) and runs one backward launch per forward launch
(:func:`~hyperattn.kernels.attention.gathered_attention_bwd`,
:func:`~hyperattn.kernels.attention.range_attention_bwd`), recomputing scores from the
saved fp32 ``lse``. In fp16/bf16 the exact pieces' gradients come from SDPA's backward
instead (cuDNN's, else flash's), one call per run of equal pieces, given the call's final
output and ``lse`` (so its softmax is the merged one: the same gradient, at SDPA's speed).

Plans (segments, tile tables, exact ranges) depend only on the shapes and the budget and
are cached per device; the draws (hyperplanes, stratum offsets) come from
:func:`~hyperattn.reference.hyper.draw_randomness` and
:func:`~hyperattn.reference.hyper.stratified_samples`, exactly as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..reference.hyper import Piece, causal_plan, draw_randomness, noncausal_plan, stratified_samples
from .attention import (TILE_ROWS, backward_delta, gathered_attention, gathered_attention_bwd, key_block_width,
                        key_blocks, range_attention, range_attention_bwd, range_key_tiles, sample_chunks)
from .lsh import lsh_sort_keys

__all__ = ["KernelPlan", "kernel_plan", "HyperSelection", "hyper_select", "hyper_attend", "hyper_forward",
           "hyper_backward"]


@dataclass(frozen=True)
class _Group:
    """Approximate pieces run by one fused launch (disjoint query and key ranges); tensors on the device."""

    pieces: tuple[Piece, ...]
    tiles: Tensor  # (T, 6) int32, see gathered_attention
    chunks: Tensor  # (C, 2) int32: attention.sample_chunks of tiles, for the backward
    blocks: Tensor  # (K, 2) int32: attention.key_blocks of tiles, for the backward
    block_keys: int  # attention.key_block_width of tiles
    k_base: Tensor  # (p,) first slot of each piece in the group's sorted key order
    k0: Tensor  # (p,) first key position of each piece
    num_samples: Tensor  # (p,) int32 columns each piece samples: min(m, its key count)
    width: int  # max of num_samples
    # Pieces of equal key count draw their samples in one call: (count, local index, approx index).
    by_length: tuple[tuple[int, Tensor, Tensor], ...]
    prior: Tensor | None = None  # (Nq,) int8: rows an earlier launch wrote (merged, not overwritten)


@dataclass(frozen=True)
class KernelPlan:
    """Launch plan of one (Nq, Nk, budget, causal) shape on one device.

    Launches run in this order: ``groups`` (fused approximate launches, one per recursion
    level), then ``exact``: ``(lo, hi, prior)`` per-row key ranges ``(Nq,)`` int32 and the
    rows ``(Nq,)`` int8 that earlier launches wrote (``None``: none). ``seg_q (G, Nq)`` and
    ``seg_k (G, Nk)`` int32: each position's piece within group ``g`` (``len(pieces)`` where
    it is in none). The last launch writes every row, so it stores the result in the
    input dtype directly.
    """

    exact: list[tuple[Tensor, Tensor, Tensor | None]]
    exact_pieces: tuple[Piece, ...]  # the plan's exact pieces, for SDPA's backward
    exact_keys: list[tuple[Tensor, Tensor]]  # attention.range_key_tiles of each exact range, for the backward
    groups: list[_Group]
    seg_q: Tensor
    seg_k: Tensor
    num_approx: int


def _exact_ranges(plan: list[Piece], nq: int, nk: int) -> list[tuple[Tensor, Tensor]]:
    ranges: list[tuple[Tensor, Tensor]] = []
    for piece in plan:
        if piece.approx:
            continue
        rows = torch.arange(piece.q0, piece.q1)
        lo = torch.full_like(rows, piece.k0)
        hi = rows - piece.q0 + piece.k0 if piece.causal else torch.full_like(rows, piece.k1 - 1)
        for cur_lo, cur_hi in ranges:
            seg_lo, seg_hi = cur_lo[piece.q0:piece.q1], cur_hi[piece.q0:piece.q1]
            empty = seg_lo > seg_hi
            after = seg_hi + 1 == lo
            before = hi + 1 == seg_lo
            if bool((empty | after | before).all()):
                cur_lo[piece.q0:piece.q1] = torch.where(empty | after, torch.where(empty, lo, seg_lo), lo)
                cur_hi[piece.q0:piece.q1] = torch.where(empty | after, hi, seg_hi)
                break
        else:
            new_lo, new_hi = torch.zeros(nq, dtype=torch.long), torch.full((nq,), -1, dtype=torch.long)
            new_lo[piece.q0:piece.q1], new_hi[piece.q0:piece.q1] = lo, hi
            ranges.append((new_lo, new_hi))
    return [(lo.int(), hi.int()) for lo, hi in ranges]


def _tiles(pieces: tuple[Piece, ...], q_base: tuple[int, ...], k_base: tuple[int, ...], block_size: int) -> Tensor:
    rows = []
    for j, (p, qb0, kb0) in enumerate(zip(pieces, q_base, k_base)):
        pq, pk = p.q1 - p.q0, p.k1 - p.k0
        num_blocks = math.ceil(pk / block_size)
        q_block = math.ceil(pq / num_blocks)
        for i in range(math.ceil(pq / q_block)):
            r1 = min((i + 1) * q_block, pq)
            key = (kb0 + i * block_size, kb0 + min((i + 1) * block_size, pk))
            for r0 in range(i * q_block, r1, TILE_ROWS):
                rows.append((qb0 + r0, qb0 + min(r0 + TILE_ROWS, r1), *key, j, i))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 6)


def _groups(plan: list[Piece], block_size: int, sample_size: int, device: torch.device) -> list[_Group]:
    approx = list(enumerate(p for p in plan if p.approx))
    runs: list[list[tuple[int, Piece]]] = []
    for index, piece in approx:
        run = runs[-1] if runs else None
        if run is None or any(p.q0 < piece.q1 and piece.q0 < p.q1 or p.k0 < piece.k1 and piece.k0 < p.k1
                              for _, p in run):
            runs.append([(index, piece)])
        else:
            run.append((index, piece))
    groups = []
    for run in runs:
        pieces = tuple(p for _, p in run)
        lengths = [p.k1 - p.k0 for p in pieces]
        q_base = [sum(p.q1 - p.q0 for p in pieces[:j]) for j in range(len(pieces))]
        k_base = [sum(lengths[:j]) for j in range(len(pieces))]
        by_length = tuple(
            (n, torch.tensor([j for j, m in enumerate(lengths) if m == n], device=device),
             torch.tensor([i for (i, _), m in zip(run, lengths) if m == n], device=device))
            for n in sorted(set(lengths)))
        counts = [min(sample_size, n) for n in lengths]
        tiles = _tiles(pieces, q_base, k_base, block_size)
        groups.append(_Group(
            pieces=pieces, tiles=tiles.to(device), chunks=sample_chunks(tiles).to(device),
            blocks=key_blocks(tiles).to(device), block_keys=key_block_width(tiles),
            k_base=torch.tensor(k_base, device=device), k0=torch.tensor([p.k0 for p in pieces], device=device),
            num_samples=torch.tensor(counts, dtype=torch.int32, device=device), width=max(counts),
            by_length=by_length))
    return groups


def _segments(groups: list[_Group], n: int, query: bool) -> Tensor:
    seg = torch.empty(len(groups), n, dtype=torch.int32)
    for g, group in enumerate(groups):
        seg[g] = len(group.pieces)
        for j, p in enumerate(group.pieces):
            lo, hi = (p.q0, p.q1) if query else (p.k0, p.k1)
            seg[g, lo:hi] = j
    return seg


def _prior(covered: Tensor) -> Tensor | None:
    return covered.to(torch.int8) if bool(covered.any()) else None


@functools.lru_cache(maxsize=32)
def kernel_plan(nq: int, nk: int, min_seq_len: int, block_size: int, sample_size: int, causal: bool,
                device: str) -> KernelPlan:
    """The cached launch plan for one shape and budget, its tensors on ``device``.

    Examples::

        >>> plan = kernel_plan(131072, 131072, 4096, 256, 256, True, "cpu")
        >>> len(plan.groups), len(plan.exact), plan.num_approx  # 4 fused levels, one exact launch
        (4, 1, 15)
    """
    plan = causal_plan(nq, nk, min_seq_len) if causal else noncausal_plan(nq, nk, min_seq_len)
    dev = torch.device(device)
    groups = _groups(plan, block_size, sample_size, dev)
    covered = torch.zeros(nq, dtype=torch.bool)
    for g, group in enumerate(groups):
        prior = _prior(covered)
        groups[g] = dataclasses.replace(group, prior=None if prior is None else prior.to(dev))
        for p in group.pieces:
            covered[p.q0:p.q1] = True
    exact, exact_keys = [], []
    for lo, hi in _exact_ranges(plan, nq, nk):
        prior = _prior(covered)
        exact.append((lo.to(dev), hi.to(dev), None if prior is None else prior.to(dev)))
        exact_keys.append(tuple(x.to(dev) for x in range_key_tiles(lo, hi, nk)))
        covered[:] = True  # a range launch writes every row, empty ranges as out 0, lse -inf
    # The last launch must write every row: exact ranges always do; without them the one
    # approximate piece is the non-causal call over all rows.
    assert exact or (len(groups) == 1 and all(p.q0 == 0 and p.q1 == nq for p in groups[0].pieces))
    return KernelPlan(exact, tuple(p for p in plan if not p.approx), exact_keys, groups,
                      _segments(groups, nq, True).to(dev), _segments(groups, nk, False).to(dev),
                      sum(len(g.pieces) for g in groups))


def _group_samples(group: _Group, u: Tensor, k_slot: Tensor, bsz: int, hq: int, hkv: int, block_size: int):
    """Sample columns ``(p, B*Hq, M)``, log-weights ``(p, M)`` and block ids ``(p, B*Hq, M)`` of one group."""
    num, width = len(group.pieces), group.width
    sample_idx = torch.zeros(num, bsz, hq, width, dtype=torch.long, device=u.device)
    sample_logw = torch.zeros(num, width, dtype=torch.float32, device=u.device)
    for length, local, index in group.by_length:
        idx, logw = stratified_samples(u.index_select(0, index), length)
        sample_idx[local, ..., :idx.shape[-1]] = idx + group.k0[local].reshape(-1, 1, 1, 1)
        sample_logw[local, :idx.shape[-1]] = logw[:, 0, 0]
    # Block of each sampled key in its piece's sorted order (the query heads of a KV head share its sort).
    per_kv = hq // hkv
    pos = sample_idx.reshape(num, bsz, hkv, per_kv, width).permute(1, 2, 0, 3, 4).reshape(bsz, hkv, -1)
    slots = k_slot.reshape(bsz, hkv, -1).gather(-1, pos).reshape(bsz, hkv, num, per_kv, width)
    slots = slots.permute(2, 0, 1, 3, 4).reshape(num, bsz * hq, width)
    # The kernel indexes these flat: permuted views must be copied into contiguous memory.
    sample_block = ((slots - group.k_base.reshape(-1, 1, 1)) // block_size).int().contiguous()
    return sample_idx.reshape(num, bsz * hq, width), sample_logw, sample_block


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    # From pinned memory the copy is queued on the stream instead of synchronising it.
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


@dataclass(frozen=True)
class HyperSelection:
    """Everything random or data-dependent of one call, fixed for its backward.

    O(N) sorted orders, O(pieces * m) samples.

    ``q_perm (G, B*Hq, Nq)``, ``k_perm (G, B*Hkv, Nk)``: each launch group's sorted orders
    (``None`` without approximate pieces); ``samples``: per group, the sample columns,
    log-weights and block ids of :func:`_group_samples`.
    """

    plan: KernelPlan
    q_perm: Tensor | None
    k_perm: Tensor | None
    samples: tuple[tuple[Tensor, Tensor, Tensor], ...]


def hyper_select(q: Tensor, k: Tensor, *, causal: bool, block_size: int, sample_size: int, num_projs: int,
                 min_seq_len: int, seed: int, head_offset: int = 0, total_heads: int | None = None) -> HyperSelection:
    """Plan, hashes, sorts and samples of a call (arguments as in :func:`hyper_forward`)."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    plan = kernel_plan(nq, nk, min_seq_len, block_size, sample_size, causal, str(q.device))
    if not plan.groups:
        return HyperSelection(plan, None, None, ())
    draws = draw_randomness(seed, dim, num_projs, plan.num_approx, bsz, hq, min(sample_size, nk),
                            head_offset=head_offset, total_heads=total_heads)
    proj, u = _to_device(draws.proj, q.device), _to_device(draws.u, q.device)
    q_perm = torch.argsort(lsh_sort_keys(q, proj, plan.seg_q), dim=-1, stable=True)
    k_perm = torch.argsort(lsh_sort_keys(k, proj, plan.seg_k), dim=-1, stable=True)
    k_slot = torch.empty_like(k_perm).scatter_(-1, k_perm, torch.arange(nk, device=q.device).expand_as(k_perm))
    samples = tuple(_group_samples(group, u, k_slot[g], bsz, hq, hkv, block_size)
                    for g, group in enumerate(plan.groups))
    return HyperSelection(plan, q_perm, k_perm, samples)


def hyper_attend(q: Tensor, k: Tensor, v: Tensor, scale: float, selection: HyperSelection) -> tuple[Tensor, Tensor]:
    """The forward launches of a :class:`HyperSelection`: ``out`` in q's dtype, ``lse`` fp32."""
    bsz, hq, nq, dim = q.shape
    plan = selection.plan
    out = torch.empty(bsz, hq, nq, dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(bsz, hq, nq, device=q.device, dtype=torch.float32)
    launches = len(plan.groups) + len(plan.exact)
    # Partial results of all but the last launch are kept in fp32.
    acc = out if launches == 1 or q.dtype == torch.float32 else torch.empty_like(out, dtype=torch.float32)
    done = 0
    for g, group in enumerate(plan.groups):
        sample_idx, sample_logw, sample_block = selection.samples[g]
        done += 1
        gathered_attention(q, k, v, selection.q_perm[g], selection.k_perm[g], group.tiles, sample_idx, sample_logw,
                           sample_block, group.num_samples, scale, acc, out if done == launches else acc, lse,
                           group.prior)
    for lo, hi, prior in plan.exact:
        done += 1
        range_attention(q, k, v, lo, hi, scale, acc, out if done == launches else acc, lse, prior)
    return out, lse


def hyper_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                   grad_lse: Tensor | None, scale: float, selection: HyperSelection) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``dq, dk, dv`` (inputs' dtypes) of the call that gave ``out, lse``, for its fixed ``selection``.

    Recomputes every scored entry from ``q, k, v`` and the final ``lse`` (the flash-attention
    backward, launch by launch): no N x N or N x budget tensor is saved or built. ``grad_lse``:
    the gradient of ``lse`` (``None``: zero).
    """
    plan = selection.plan
    grad_out = grad_out.to(q.dtype).contiguous()
    delta = backward_delta(grad_out, out.contiguous(), grad_lse)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
    for g, group in enumerate(plan.groups):
        sample_idx, sample_logw, sample_block = selection.samples[g]
        gathered_attention_bwd(q, k, v, selection.q_perm[g], selection.k_perm[g], group.tiles, sample_idx,
                               sample_logw, sample_block, group.num_samples, scale, grad_out, lse, delta, dq, dk, dv,
                               group.chunks, group.blocks, group.block_keys)
    if not (grad_lse is None and _sdpa_exact_bwd(q, k, v, out, lse, grad_out, scale, plan.exact_pieces, dq, dk, dv)):
        for (lo, hi, _), keys in zip(plan.exact, plan.exact_keys):
            range_attention_bwd(q, k, v, lo, hi, scale, grad_out, lse, delta, dq, dk, dv, keys)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Elements of one batched call's copied keys (q's heads x its pieces' keys x D): bounds the
# transient copies and gradients (~2.5 GB in bf16) where a run covers a long call.
_RUN_ELEMENTS = 1 << 28
# SDPA backends whose backward refused a call in this process (name -> first line of the error):
# skipped from then on. cuDNN's private backward op is called only from the torch release it
# was checked on (strided batches of pieces, given another call's output and LSE); older ones
# take flash's.
_SDPA_REFUSED: dict[str, str] = {}
if torch.torch_version.TorchVersion(torch.__version__) < (2, 11):
    _SDPA_REFUSED["cudnn"] = f"not checked on torch {torch.__version__}"


def _piece_runs(pieces: tuple[Piece, ...]) -> list[list[Piece]]:
    """The exact pieces as runs of equal pieces at an even step, each run one batched backward call.

    A run's pieces share their shape and causality, and their rows and keys advance by the
    same step, at least their lengths (the causal recursion's diagonal leaves, and its
    off-diagonal exact blocks, are each one run): as a batch they are one strided view of
    the inputs, and their gradients' views do not overlap.
    """
    runs: list[list[Piece]] = []
    for p in sorted(pieces, key=lambda p: (p.causal, p.q1 - p.q0, p.k1 - p.k0, p.q0)):
        run = runs[-1] if runs else None
        if run and (run[0].causal, run[0].q1 - run[0].q0, run[0].k1 - run[0].k0) == (p.causal, p.q1 - p.q0,
                                                                                     p.k1 - p.k0):
            step = p.q0 - run[-1].q0
            if (p.k0 - run[-1].k0 == step >= max(p.q1 - p.q0, p.k1 - p.k0)
                    and (len(run) == 1 or step == run[1].q0 - run[0].q0)):
                run.append(p)
                continue
        runs.append([p])
    return runs


def _run_view(x: Tensor, start: int, count: int, step: int, length: int) -> Tensor:
    """``x[:, :, start + i * step:][:length]`` for ``i < count`` as one view ``(B, count, H, length, ...)``."""
    st = x.stride()
    return x.as_strided((x.shape[0], count, x.shape[1], length, *x.shape[3:]), (st[0], step * st[2], st[1], st[2],
                        *st[3:]), x.storage_offset() + start * st[2])


def _sdpa_bwd(backend: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One SDPA backward op on ``(B, H, L, D)`` batches: their share of the gradient, given the merged ``out, lse``."""
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout is off: never read, but the ops take one
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    nq, nk = q.shape[2], k.shape[2]
    if backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, nq, nk, 0.0, causal, seed, offset, scale=scale)
    # cuDNN takes no grouped heads here: each KV head repeated for its query heads (a copy of
    # the run's keys and values), their gradients summed back.
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    gq, gk, gv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None, nq, nk, 0.0, causal, scale=scale)
    if group > 1:
        gk, gv = gk.unflatten(1, (-1, group)).sum(2), gv.unflatten(1, (-1, group)).sum(2)
    return gq, gk, gv


def _sdpa_exact_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float,
                    pieces: tuple[Piece, ...], dq: Tensor, dk: Tensor, dv: Tensor) -> bool:
    """Adds the exact pieces' gradients into ``dq, dk, dv`` through SDPA's backward ops; ``False`` if none can.

    An SDPA backward recomputes ``P = exp(scale q.k - lse)`` from the ``lse`` it is given
    and ``delta = rowsum(dO * out)`` from the ``out`` it is given. Given the call's merged
    output and LSE (and no gradient on ``lse``), that is this piece's share of the gradient
    of the whole call, as the ring-attention backward uses it. A causal piece is square
    (the reference's diagonal leaves), where top-left and bottom-right alignment agree.

    Each run of equal pieces (:func:`_piece_runs`) is one batched call (several where its
    copies would pass ``_RUN_ELEMENTS``). cuDNN's backward first (the 48 exact pieces of a
    131k causal call, H200: 48.7 ms, against 78.6 ms for flash's batched and 85.6 ms for
    flash's one call per piece), flash's where cuDNN refuses.
    """
    dim = q.shape[-1]
    if (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or dim % 8 or dim > 256
            or any(p.causal and p.q1 - p.q0 != p.k1 - p.k0 for p in pieces)):
        return False
    bsz, heads = q.shape[:2]
    batches = []
    for run in _piece_runs(pieces):
        size = heads * max(run[0].q1 - run[0].q0, run[0].k1 - run[0].k0) * dim
        per_call = max(1, _RUN_ELEMENTS // size)
        batches += [run[i:i + per_call] for i in range(0, len(run), per_call)]
    for i, run in enumerate(batches):
        p, count = run[0], len(run)
        step = run[1].q0 - p.q0 if count > 1 else 0
        lq, lk = p.q1 - p.q0, p.k1 - p.k0

        def rows(x):
            return _run_view(x, p.q0, count, step, lq)

        def keys(x):
            return _run_view(x, p.k0, count, step, lk)

        def batch(x):
            return x.reshape(bsz * count, *x.shape[2:])

        args = (batch(rows(grad_out)), batch(rows(q)), batch(keys(k)), batch(keys(v)), batch(rows(out)),
                batch(rows(lse)).contiguous())
        grads = None
        for backend in ("cudnn", "flash"):
            if backend in _SDPA_REFUSED:
                continue
            try:
                grads = _sdpa_bwd(backend, *args, p.causal, scale)
                break
            except (RuntimeError, TypeError) as exc:
                # This torch refuses the op (a shape: RuntimeError; a signature older than
                # the one called: TypeError): the next backend.
                _SDPA_REFUSED[backend] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if grads is None:
            if i:  # runs already added: no clean fallback
                raise RuntimeError(f"SDPA's backward refused a run of exact pieces: {_SDPA_REFUSED}")
            return False  # the Triton range kernels, from now on
        # Added run by run: one run's gradients alive at a time.
        for acc, g, view in zip((dq, dk, dv), grads, (rows, keys, keys)):
            view(acc).add_(g.view(bsz, count, *g.shape[1:]))
    return True


def hyper_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, block_size: int,
                  sample_size: int, num_projs: int, min_seq_len: int, seed: int, head_offset: int = 0,
                  total_heads: int | None = None) -> tuple[Tensor, Tensor]:
    """The paper's method with Triton kernels; same draws as ``hyper_attention_reference``.

    ``q: (B, Hq, Nq, D)``, ``k, v: (B, Hkv, Nk, D)`` CUDA tensors (last dim contiguous, D a
    power of two in [16, 128]). ``head_offset``, ``total_heads``: q's heads are global heads
    ``[head_offset, head_offset + Hq)`` of ``total_heads`` (default: all of them). Returns
    ``out: (B, Hq, Nq, D)`` in q's dtype (accumulated and merged in fp32) and
    ``lse: (B, Hq, Nq)`` fp32. (:func:`hyper_select` then :func:`hyper_attend`; the autograd
    path keeps the selection for :func:`hyper_backward`.)

    Examples::

        >>> q = torch.randn(1, 8, 16384, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(1, 2, 16384, 128, device="cuda", dtype=torch.bfloat16)
        >>> out, lse = hyper_forward(q, k, v, scale=128 ** -0.5, causal=True, block_size=256, sample_size=256,
        ...                          num_projs=7, min_seq_len=4096, seed=0)
    """
    selection = hyper_select(q, k, causal=causal, block_size=block_size, sample_size=sample_size,
                             num_projs=num_projs, min_seq_len=min_seq_len, seed=seed, head_offset=head_offset,
                             total_heads=total_heads)
    return hyper_attend(q, k, v, scale, selection)
