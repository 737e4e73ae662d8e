"""Context parallelism on CPU: 2 gloo processes equal one process on the whole sequence, and the validation.

One pair of processes runs every case (a spawn costs seconds); each rank saves its slice
of the output, LSE and input gradients, or the error it raised, and the tests compare
them with the single-process call on the whole sequence, with the same seed.
"""

from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hyperattn as ha
from conftest import SHARD_ATOL, qkv
from hyperattn.distributed import _ROUNDS_FROM, context_parallel_attention

WORLD = 2
N, DIM = 512, 32

# Small budgets so that 512 tokens really approximate (query blocks of 16, chunks of 128).
SMALL = ha.HyperAttentionConfig(query_block=16, chunk=128, score_group=4, window=16, key_blocks=2, num_sinks=2,
                                heavy_columns=4, lsh_block=8, sample_size=16, probe_rows=8, min_seq_len=64, seed=0)
HYPER = ha.HyperAttentionConfig(method="hyper", block_size=32, sample_size=16, min_seq_len=64, seed=0)


@dataclasses.dataclass(frozen=True)
class Case:
    config: ha.HyperAttentionConfig
    causal: bool
    hkv: int
    batch: int = 1
    hq: int = 8
    grad: bool = False
    rounds_from: int | None = None  # exchange heads in rounds from this length (default: 1M-scale only)


# A guard target between the chunks' estimated errors on these inputs, so some chunks
# approximate and others go exact (checked in test_guard_case_mixes_tiers).
GUARD = dataclasses.replace(SMALL, max_error=0.3)

CASES = {
    "structured-fixed-causal-hkv4": Case(dataclasses.replace(SMALL, max_error=None), True, 4),
    "structured-fixed-noncausal-hkv2": Case(dataclasses.replace(SMALL, max_error=None), False, 2, batch=2),
    "structured-guard-causal-hkv2": Case(GUARD, True, 2),
    "structured-guard-noncausal-hkv4": Case(GUARD, False, 4),
    "hyper-causal-hkv4": Case(HYPER, True, 4),
    "hyper-noncausal-hkv2": Case(HYPER, False, 2, batch=2),
    "hyper-causal-hkv1-replicated": Case(HYPER, True, 1),
    "hyper-causal-hkv2-backward": Case(HYPER, True, 2, grad=True),
    "structured-fixed-causal-hkv4-two-rounds": Case(dataclasses.replace(SMALL, max_error=None), True, 4,
                                                    rounds_from=N),
    "hyper-causal-hkv4-two-rounds-backward": Case(HYPER, True, 4, grad=True, rounds_from=N),
    "exact-causal-hkv2": Case(ha.HyperAttentionConfig(method="exact"), True, 2),
    "exact-noncausal-hkv1-replicated-backward": Case(ha.HyperAttentionConfig(method="exact"), False, 1, grad=True),
}


def _inputs(case: Case):
    q, k, v = qkv(case.batch, case.hq, case.hkv, N, N, DIM)
    # Even query heads attend mostly to their own position (local heads: estimated error
    # ~0.1), odd ones are random (diffuse: ~2.5), so the guard approximates some chunks on
    # every rank and sends others to exact.
    q[:, ::2] = 0.3 * q[:, ::2] + 2.0 * k.repeat_interleave(case.hq // case.hkv, 1)[:, ::2]
    return q, k, v


def _weights(case: Case) -> torch.Tensor:
    """Fixed output weights: the loss of the backward cases is ``(out * w).sum() + lse.sum()``."""
    return torch.randn(case.batch, case.hq, N, DIM, generator=torch.Generator().manual_seed(7))


def _run_case(case: Case, rank: int) -> dict:
    import hyperattn.distributed as distributed

    distributed._ROUNDS_FROM = case.rounds_from or _ROUNDS_FROM
    q, k, v = _inputs(case)
    rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    local = [x[:, :, rows].clone().requires_grad_(case.grad) for x in (q, k, v)]
    out, lse = context_parallel_attention(*local, causal=case.causal, config=case.config, return_lse=True)
    result = {"out": out.detach(), "lse": lse.detach()}
    if case.grad:
        ((out * _weights(case)[:, :, rows]).sum() + lse.sum()).backward()
        result["grads"] = [x.grad for x in local]
    return result


def _fresh_seed(rank: int) -> dict:
    """``seed=None`` with a different global generator state per rank: every rank must use rank 0's draw."""
    torch.manual_seed(100 + rank)
    case = CASES["hyper-causal-hkv4"]
    return _run_case(dataclasses.replace(case, config=dataclasses.replace(case.config, seed=None)), rank)


def _errors(rank: int) -> dict:
    """Each invalid call, what this rank raised: ``(type name, message)``."""
    q, k, v = qkv(1, 4, 2, N // WORLD, N // WORLD, DIM)
    cases = {
        "hq-not-divisible": lambda: context_parallel_attention(q[:, :3], k[:, :1], v[:, :1]),
        "structured-hkv-not-divisible": lambda: context_parallel_attention(q, k[:, :1], v[:, :1]),
        "peer-method": lambda: context_parallel_attention(q, k, v, config=ha.HyperAttentionConfig(method="streaming")),
        # Rank 1 passes one position more: the sequence is not split equally.
        "unequal-lengths": lambda: context_parallel_attention(*(qkv(1, 4, 2, N // 2 + rank, N // 2 + rank, DIM))),
        # Only rank 1's inputs are invalid: rank 0 must raise too instead of waiting.
        "one-rank-bad-dtype": lambda: context_parallel_attention(q, k.double() if rank else k, v),
        "causal-differs": lambda: context_parallel_attention(q, k, v, causal=bool(rank)),
        "group-type": lambda: context_parallel_attention(q, k, v, group="world"),
        "meta-tensors": lambda: context_parallel_attention(*(x.to("meta") for x in (q, k, v))),
    }
    raised = {}
    for name, call in cases.items():
        try:
            call()
            raised[name] = None
        except Exception as exc:
            raised[name] = (type(exc).__name__, str(exc))
    return raised


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {name: _run_case(case, rank) for name, case in CASES.items()}
        results["fresh-seed"] = _fresh_seed(rank)
        results["errors"] = _errors(rank)
    except Exception:
        results = {"crash": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks returned for every case."""
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    results = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res.get('crash')}"
    return results


def _single(case: Case) -> dict:
    q, k, v = (x.requires_grad_(case.grad) for x in _inputs(case))
    out, lse = ha.hyper_attention(q, k, v, causal=case.causal, config=case.config, return_lse=True)
    result = {"out": out.detach(), "lse": lse.detach()}
    if case.grad:
        ((out * _weights(case)).sum() + lse.sum()).backward()
        result["grads"] = [q.grad, k.grad, v.grad]
    return result


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_gets_its_slice_of_the_single_device_result(ranks, name):
    ref = _single(CASES[name])
    for rank, res in enumerate(ranks):
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        torch.testing.assert_close(res[name]["out"], ref["out"][:, :, rows], atol=SHARD_ATOL, rtol=0)
        torch.testing.assert_close(res[name]["lse"], ref["lse"][:, :, rows], atol=SHARD_ATOL, rtol=0)
        for got, want in zip(res[name].get("grads", []), ref.get("grads", [])):
            torch.testing.assert_close(got, want[:, :, rows], atol=SHARD_ATOL, rtol=0)


def test_without_a_seed_every_rank_uses_rank_0s(ranks):
    torch.manual_seed(100)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what rank 0 drew
    case = CASES["hyper-causal-hkv4"]
    ref = _single(dataclasses.replace(case, config=dataclasses.replace(case.config, seed=seed)))
    for rank, res in enumerate(ranks):
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        torch.testing.assert_close(res["fresh-seed"]["out"], ref["out"][:, :, rows], atol=SHARD_ATOL, rtol=0)


def test_cases_really_approximate():
    for name in ("structured-fixed-causal-hkv4", "hyper-causal-hkv4"):
        q, k, v = _inputs(CASES[name])
        out = ha.hyper_attention(q, k, v, causal=True, config=CASES[name].config)
        exact = ha.exact_attention(q, k, v, causal=True)
        assert (out - exact).abs().max() > 1e-3, name


def test_guard_case_mixes_tiers():
    case = CASES["structured-guard-causal-hkv2"]
    q, k, v = _inputs(case)
    _, stats = ha.hyper_attention(q, k, v, causal=True, config=case.config, return_stats=True)
    approximate = ~stats.exact_chunks & (stats.est_error > 0).unsqueeze(-1)
    assert bool(stats.exact_chunks.any()) and bool(approximate.any())


ERRORS = {
    "hq-not-divisible": ("ValueError", "q: expected a head count Hq divisible by the world size 2"),
    "structured-hkv-not-divisible": ("ValueError", "k: expected a KV head count Hkv divisible by the world size 2"),
    "peer-method": ("ValueError", "config: expected method in"),
    "unequal-lengths": ("ValueError", "q: expected the same shape (B, Hq, N_local, D) on every rank"),
    "causal-differs": ("ValueError", "causal: expected the same value on every rank"),
    "group-type": ("TypeError", "group: expected a torch.distributed.ProcessGroup or None"),
    "meta-tensors": ("ValueError", "q: expected tensors with values"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_invalid_inputs_raise_on_every_rank(ranks, name):
    kind, message = ERRORS[name]
    for res in ranks:
        assert res["errors"][name] is not None and res["errors"][name][0] == kind, res["errors"][name]
        assert res["errors"][name][1].startswith(message), res["errors"][name][1]


def test_one_invalid_rank_stops_the_others(ranks):
    assert ranks[1]["errors"]["one-rank-bad-dtype"][0] == "TypeError"
    assert ranks[1]["errors"]["one-rank-bad-dtype"][1].startswith("k: expected dtype torch.float32")
    assert ranks[0]["errors"]["one-rank-bad-dtype"] == (
        "ValueError", "context_parallel_attention: the inputs of rank(s) [1] of the group are invalid "
        "(the error is raised there)")


def test_needs_an_initialized_process_group():
    q, k, v = qkv(1, 4, 2, 64, 64, DIM)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        context_parallel_attention(q, k, v)
