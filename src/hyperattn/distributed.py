"""Context-parallel attention over ``torch.distributed``: one long sequence split across ranks.

Layout: head-parallel all-to-all (DeepSpeed-Ulysses). Each of the ``W`` ranks of the
process group holds a contiguous slice of ``N / W`` positions of the sequence for every
head. One all-to-all turns ``(B, H, N / W, D)`` per rank into ``(B, H / W, N, D)``: every
rank then holds the whole sequence for ``H / W`` heads and runs the single-device method
on them; a second all-to-all returns the output (and LSE) to the sequence layout. Every
method is independent per head (the structured one per KV-head group), and its random
draws are keyed by global head, so the result is the single-device call on the whole
sequence, up to float rounding. Traffic per rank is the size of its own q, k, v and
output slices, whatever ``W``. Long sequences exchange the heads in two rounds (half of
each rank's KV-head groups at a time), so the exchanged copies and the method's working
memory are held for half the heads at once.

Why this layout rather than a ring over KV shards: the methods select keys from the whole
sequence (LSH sorts, heavy columns, block scores, samples over the residual), which a ring
would have to rebuild from pieces held by other ranks; after the all-to-all each rank runs
the single-device pipeline unchanged, whichever it is. Its limit is the head count:
``Hq`` (and for the structured method ``Hkv``) divisible by ``W``.

Shape legend as in :mod:`hyperattn.ops`, with ``W`` the group's world size and
``N_local = N / W`` the positions each rank holds.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from .config import HyperAttentionConfig
from .ops import _DEFAULT_CONFIG, _attention, _check_inputs, _shape_only

__all__ = ["context_parallel_attention"]

# Methods whose draws are keyed by global head (or that draw nothing); the peer patterns
# draw per call, so a head-sharded call would not reproduce the single-device one.
_METHODS = ("structured", "hyper", "exact")

# What each rank tells the others before any data moves: whether its own inputs passed
# validation, its shapes, and its call arguments that must agree.
_FIELDS = ("failed", "B", "Hq", "Nq", "D", "Hkv", "Nk", "causal", "seed")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over dim 0 (``W`` equal chunks); its own adjoint, so backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.group), None


def _to_heads(x: Tensor, world: int, group) -> Tensor:
    """``(B, H, N_local, ...)`` on each rank -> ``(B, H / W, N, ...)``: this rank's heads over the whole sequence."""
    bsz, heads, n_local, *rest = x.shape
    chunks = x.reshape(bsz, world, heads // world, n_local, *rest).transpose(0, 1)  # chunk j goes to rank j
    got = _AllToAll.apply(chunks, group)  # chunk j came from rank j: sequence slice j
    return got.transpose(0, 1).transpose(1, 2).reshape(bsz, heads // world, world * n_local, *rest)


def _to_sequence(x: Tensor, world: int, group) -> Tensor:
    """Inverse of :func:`_to_heads`: ``(B, H / W, N, ...)`` -> ``(B, H, N_local, ...)``."""
    bsz, heads, n, *rest = x.shape
    chunks = x.reshape(bsz, heads, world, n // world, *rest).permute(2, 0, 1, *range(3, x.dim() + 1))
    got = _AllToAll.apply(chunks, group)  # chunk j came from rank j: its heads for this rank's slice
    return got.transpose(0, 1).reshape(bsz, world * heads, n // world, *rest)


def _world_and_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized; call torch.distributed.init_process_group "
                         "first (torchrun sets up its environment)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_local(q, k, v, causal, scale, config, cfg, world: int) -> None:
    """This rank's inputs, before any collective: :func:`hyperattn.ops._check_inputs` and the sharding constraints."""
    _check_inputs(q, k, v, causal, scale, config, cfg.check_finite if isinstance(cfg, HyperAttentionConfig) else True)
    if _shape_only(q):
        raise ValueError("q: expected tensors with values, got a meta or fake tensor (collectives move data; "
                         "context_parallel_attention does not trace)")
    if cfg.method not in _METHODS:
        raise ValueError(f"config: expected method in {_METHODS} for context parallelism, got {cfg.method!r} (the "
                         "peer patterns draw their randomness per call, not per global head, so a head-sharded "
                         "call would not equal the single-device one)")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % world:
        raise ValueError(f"q: expected a head count Hq divisible by the world size {world}, got Hq = {hq}")
    if cfg.method == "structured" and hkv % world:
        raise ValueError(f"k: expected a KV head count Hkv divisible by the world size {world} for "
                         f"method='structured', got Hkv = {hkv} (the query heads of a KV head choose its heavy "
                         "and sampled columns together, so one KV head's group cannot be split across ranks; "
                         "method='hyper' and 'exact' replicate KV heads instead)")


def _collective_device(q, group) -> torch.device:
    if isinstance(q, Tensor) and not _shape_only(q):
        return q.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")


def _agree(q, k, causal, seed: int, error: Exception | None, world: int, group) -> int:
    """Exchange each rank's validation outcome, shapes, ``causal`` and seed; raise the same way on every rank.

    Every rank raises when any rank's inputs fail, so no rank is left waiting in the
    all-to-all. Returns the seed of the group's rank 0.
    """
    row = [int(error is not None)]
    row += [*q.shape, k.shape[1], k.shape[2], int(causal)] if error is None else \
        [0] * (len(_FIELDS) - 2)
    row.append(seed)
    mine = torch.tensor(row, dtype=torch.int64, device=_collective_device(q, group))
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu()
    if error is not None:
        raise error
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        raise ValueError(f"context_parallel_attention: the inputs of rank(s) {failed} of the group are invalid "
                         "(the error is raised there)")
    names = {name: i for i, name in enumerate(_FIELDS)}
    # Each rank checked that v has k's shape and k has q's B and D: q and k's shapes say it all.
    for arg, fields, layout in (("q", ("B", "Hq", "Nq", "D"), "(B, Hq, N_local, D)"),
                                ("k", ("B", "Hkv", "Nk", "D"), "(B, Hkv, N_local, D)")):
        cols = [names[f] for f in fields]
        for r in range(world):
            if not torch.equal(table[r, cols], table[0, cols]):
                raise ValueError(f"{arg}: expected the same shape {layout} on every rank of the group (each passes "
                                 f"an equal slice: N divisible by the world size {world}), got "
                                 f"{tuple(table[0, cols].tolist())} on rank 0 and {tuple(table[r, cols].tolist())} "
                                 f"on rank {r}")
    flags = table[:, names["causal"]]
    if not bool((flags == flags[0]).all()):
        raise ValueError(f"causal: expected the same value on every rank, got {flags.bool().tolist()} by rank")
    return int(table[0, names["seed"]])


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                               config: HyperAttentionConfig | None = None, group=None, *, return_lse: bool = False):
    """:func:`hyperattn.hyper_attention` on a sequence split across the ranks of a process group.

    Each rank passes its contiguous slice of the sequence, for all heads, in SDPA layout,
    and gets back its slice of the output: rank ``r`` of ``W`` holds positions
    ``[r * N_local, (r + 1) * N_local)`` of q, k and v. With the same seed the result is
    the single-device call on the whole sequence, up to float rounding. Runs on the
    collectives of ``torch.distributed`` (NCCL on GPUs, gloo on CPUs): two all-to-alls of
    q, k, v and one of the output (and LSE), the head-parallel layout of DeepSpeed-Ulysses
    (module docstring). Differentiable (the backward of an all-to-all is the reverse one).

    Args:
        q: ``(B, Hq, N_local, D)`` this rank's queries; ``Hq`` divisible by ``W``.
        k: ``(B, Hkv, N_local, D)`` this rank's keys; ``Hq % Hkv == 0``.
        v: ``(B, Hkv, N_local, D)`` this rank's values.
        causal: causal mask over the whole sequence (key ``j`` seen by query ``i`` iff
            ``j <= i``, counted globally). Default False.
        scale: logit scale; default ``D ** -0.5``.
        config: as for :func:`~hyperattn.hyper_attention`; ``method`` one of
            ``"structured"`` (default), ``"hyper"``, ``"exact"``. With ``seed=None`` the
            group's rank 0 draws the seed and every rank uses it.
        group: the ``torch.distributed`` process group; default the whole world.
        return_lse: also return ``lse: (B, Hq, N_local)`` fp32 for this rank's rows.

    Constraints (checked; the error names the argument):

    - every rank of the group calls with the same shapes (so ``N`` is divisible by ``W``),
      ``causal``, ``scale`` and ``config``, its q, k, v on the device its backend serves;
    - ``Hq`` divisible by ``W``;
    - ``method="structured"``: ``Hkv`` divisible by ``W`` (the query heads of a KV head
      choose its columns together, so a group stays on one rank);
    - ``method="hyper"``/``"exact"`` with ``Hkv`` not divisible by ``W`` (e.g. ``Hkv < W``):
      KV heads are replicated before the exchange (``lcm(Hkv, W)`` heads, each rank
      receiving the ones its query heads read), which costs ``lcm(Hkv, W) / Hkv`` times
      the K/V traffic and the same answer.

    An invalid input on any rank raises on every rank, before any data moves.

    Returns:
        ``out: (B, Hq, N_local, D)`` in the input dtype, this rank's rows; then ``lse`` if
        ``return_lse``.

    Raises:
        TypeError, ValueError: on invalid inputs or a group without ``torch.distributed``
        initialized, naming the argument.

    Examples::

        >>> # torchrun --nproc_per_node 2 prefill.py
        >>> import torch, torch.distributed as dist, hyperattn as ha
        >>> from hyperattn.distributed import context_parallel_attention
        >>> dist.init_process_group("nccl"); rank = dist.get_rank(); torch.cuda.set_device(rank)
        >>> n_local = 2**20 // 2  # 1M tokens over two GPUs
        >>> q = torch.randn(1, 32, n_local, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(1, 8, n_local, 128, device="cuda", dtype=torch.bfloat16)
        >>> out = context_parallel_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(seed=0))
        >>> out.shape
        torch.Size([1, 32, 524288, 128])
    """
    world, rank = _world_and_rank(group)
    cfg = _DEFAULT_CONFIG if config is None else config
    error = None
    try:
        _check_local(q, k, v, causal, scale, config, cfg, world)
    except (TypeError, ValueError) as exc:
        error = exc
    seed = cfg.seed if error is None and cfg.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    seed = _agree(q, k, causal, seed, error, world, group)
    cfg = dataclasses.replace(cfg, seed=seed)

    hq, hkv = q.shape[1], k.shape[1]
    if hkv % world:
        # Repeat each KV head so the head count divides W and every rank receives whole
        # copies of the KV heads its query heads read (lcm(Hkv, W) divides Hq).
        repeat = math.lcm(hkv, world) // hkv
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    rounds = _rounds(k.shape[1] // world, q.shape[2] * world)
    bsz, n_local = q.shape[0], q.shape[2]
    out = torch.empty(bsz, world, rounds, hq // (world * rounds), n_local, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, world, rounds, hq // (world * rounds), n_local, dtype=torch.float32, device=q.device) \
        if return_lse else None
    for r in range(rounds):
        # Round r moves the r-th part of every rank's heads (whole KV-head groups), so the
        # exchanged copies and the method's working memory are 1 / rounds of the heads.
        q_h, k_h, v_h = (_to_heads(_part(x, world, rounds, r), world, group) for x in (q, k, v))
        result = _attention(q_h, k_h, v_h, causal, scale, cfg, return_lse=return_lse,
                            head_offset=rank * (hq // world) + r * (hq // (world * rounds)), total_heads=hq)
        del q_h, k_h, v_h
        o = result[0] if return_lse else result
        out[:, :, r] = _to_sequence(o, world, group).unflatten(1, (world, -1))
        if return_lse:
            lse[:, :, r] = _to_sequence(result[1], world, group).unflatten(1, (world, -1))
        del result, o
    out = out.reshape(bsz, hq, n_local, -1)
    return (out, lse.reshape(bsz, hq, n_local)) if return_lse else out


# Sequences from this length (whole) exchange heads in two rounds: the working memory per
# GPU then halves again, which at 1M tokens is what brings a GPU's peak to about half the
# single-GPU one (inputs and output held throughout). Shorter calls keep one round.
_ROUNDS_FROM = 1 << 18


def _rounds(kv_per_rank: int, n: int) -> int:
    """Rounds of the head exchange: 2 where each rank's KV heads split evenly and the sequence is long."""
    return 2 if n >= _ROUNDS_FROM and kv_per_rank % 2 == 0 else 1


def _part(x: Tensor, world: int, rounds: int, r: int) -> Tensor:
    """Part ``r`` of ``rounds`` of each rank's heads of ``x (B, H, N_local, D)``: ``(B, H / rounds, N_local, D)``."""
    bsz, heads, *rest = x.shape
    return x.reshape(bsz, world, rounds, heads // (world * rounds), *rest)[:, :, r].reshape(bsz, heads // rounds, *rest)
