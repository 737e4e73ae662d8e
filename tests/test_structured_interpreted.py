"""The structured method's CUDA path, run on CPU under Triton's interpreter, against its reference path.

The driver runs once with the kernels (:mod:`hyperattn.kernels.selection`, ``sparse`` and
``structured``: probe rows, their exact attention and column mass, LSH hashes, pooled
means, block scores, the guard's trials and the attention engine) and once with the
PyTorch reference, in fp32 on one input: the outputs and error estimates agree to rounding,
with the guard off and on, causal and not, Nq != Nk. Needs ``triton`` installed (any
device); the compiled kernels themselves are checked on CUDA in
``tests/test_structured_kernels.py``.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import run_interpreted

pytest.importorskip("triton")
# On a GPU the compiled kernels are tested instead; the interpreter is for machines without one.
pytestmark = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA: compiled kernels tested")

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    sys.path.insert(0, "tests")
    from conftest import qkv, rel_err
    import hyperattn as ha
    from hyperattn.kernels import structured as ker
    from hyperattn.methods import structured as M

    def eager(name):
        def run(q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options=None):
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=enable_gqa, return_lse=True)
        return run

    ker._flex = eager
    results = []
    for causal, nq, nk, max_error, need_stats in json.loads(sys.argv[1]):
        q, k, v = qkv(1, 4, 2, nq, nk, 32, seed=5)
        # A sink and a heavy column: selections with clear winners (random input alone is all ties).
        k[:, :, 0] *= 4
        k[:, :, 700] = q[:, 0, 900].mean(0) * 3
        cfg = ha.HyperAttentionConfig(seed=0, max_error=max_error, min_seq_len=256, chunk=512)
        runs = []
        for kernels in (False, True):
            M._kernels_ok = lambda x, kernels=kernels: kernels
            with torch.no_grad():
                runs.append(M.run(q, k, v, 32 ** -0.5, causal, cfg, 0, need_stats=need_stats))
        (ref, _, st_r), (mine, _, st_k) = runs
        results.append({"out": rel_err(mine.float(), ref.float()),
                        "est": float((st_k.est_error - st_r.est_error).abs().max()),
                        "keys": [st_k.keys_per_query, st_r.keys_per_query],
                        "approximate": bool((~st_r.exact_heads).any()), "stats": need_stats})
    print(json.dumps(results))
""")

# (causal, Nq, Nk, max_error, need_stats): guard off, non-causal with Nq != Nk, guard on,
# causal Nq < Nk, and guard off without stats (the probe rows score the heavy columns alone).
CASES = [(True, 2048, 2048, None, True), (False, 1800, 2100, None, True), (True, 2048, 2048, 0.05, True),
         (True, 1500, 2300, 0.2, True), (True, 2048, 2048, None, False)]


def test_cuda_path_under_the_interpreter_matches_the_reference_path():
    results = run_interpreted(_SCRIPT, json.dumps(CASES), timeout=900)
    assert len(results) == len(CASES)
    assert sum(r["approximate"] for r in results) >= 3  # the approximate path really ran
    for result in results:
        # fp32, the same terms in another order (base-2 exponentials, online softmax): a few
        # 1e-7 relative measured; 1e-5 leaves room.
        assert result["out"] < 1e-5
        assert result["est"] < 1e-5
        if result["stats"]:  # without stats, keys_per_query is a NaN placeholder on both paths
            assert abs(result["keys"][0] - result["keys"][1]) < 1e-6 * result["keys"][1]
