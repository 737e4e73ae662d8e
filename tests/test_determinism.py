"""Determinism and thread safety: a fixed seed gives bitwise-equal results, concurrent calls equal
sequential ones, and inputs are never modified, for every method."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import hyperattn as ha
from conftest import qkv

# Budgets below the 300 keys, so every method approximates (and draws, where it samples).
_SMALL = dict(min_seq_len=64, block_size=32, sample_size=32, window=32, num_sinks=4, heavy_columns=16,
              key_blocks=2, lsh_block=16)


def _config(method: str, seed: int = 0) -> ha.HyperAttentionConfig:
    return ha.HyperAttentionConfig(method=method, seed=seed, **_SMALL)


@pytest.mark.parametrize("method", ha.METHODS)
def test_same_seed_is_bitwise_equal(method):
    q, k, v = qkv(1, 4, 2, 300, 300, 16, seed=1)
    first = ha.hyper_attention(q, k, v, causal=True, config=_config(method), return_lse=True)
    again = ha.hyper_attention(q, k, v, causal=True, config=_config(method), return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("method", ha.METHODS)
def test_inputs_are_never_modified(method):
    q, k, v = qkv(1, 4, 2, 300, 280, 16, seed=2)
    kept = [x.clone() for x in (q, k, v)]
    for causal in (True, False):
        ha.hyper_attention(q, k, v, causal=causal, config=_config(method), return_lse=True, return_stats=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    before = [x.detach().clone() for x in leaves]
    ha.hyper_attention(*leaves, causal=True, config=_config(method)).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), kept))
    assert all(torch.equal(a.detach(), b) for a, b in zip(leaves, before))


def test_concurrent_calls_match_sequential_ones():
    # Every method with its own seed, causal or not, on distinct inputs, from 4 threads at
    # once, each job twice: no shared generator or cache may leak between calls.
    jobs = [(method, i, i % 2 == 0) for i, method in enumerate(ha.METHODS)]
    inputs = {job: qkv(1, 4, 2, 300, 300, 16, seed=i) for i, job in enumerate(jobs)}

    def run(job):
        method, seed, causal = job
        return ha.hyper_attention(*inputs[job], causal=causal, config=_config(method, seed), return_lse=True)

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, jobs + jobs))
    for job, want, got, got_again in zip(jobs, sequential, concurrent[:len(jobs)], concurrent[len(jobs):]):
        assert all(torch.equal(a, b) for a, b in zip(want, got)), job
        assert all(torch.equal(a, b) for a, b in zip(want, got_again)), job
