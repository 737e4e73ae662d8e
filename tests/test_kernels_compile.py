"""Every Triton kernel the CUDA paths launch compiles for sm_90 (H100/H200), checked on a machine without a GPU.

The interpreter runs kernels without compiling them, so a kernel can pass every CPU test
and still fail Triton's GPU passes (a layout conversion it cannot do, say). This test runs
the CUDA code paths of the structured method (forward, guard on and off, causal and not; backward)
and of ``method="hyper"``, forward and backward under the interpreter in a child process,
records each launch's argument types and ``constexpr`` values (the first autotune config:
a config that does not fit is pruned at run time, a pass that fails fails them all), then
compiles each launch for ``cuda:90`` here, as recorded (fp32) and as the benchmarks run it
(q, k, v and the gathered keys and values in bf16, head dim 128).

Opt-in, since it compiles ~30 kernels (several minutes on 2 cores):
``HYPERATTN_COMPILE_CHECK=1 pytest tests/test_kernels_compile.py``. Needs ``triton``; on a
machine with a GPU the GPU tests compile the kernels themselves.
"""

from __future__ import annotations

import importlib
import json
import os
import textwrap

import pytest
import torch
from conftest import run_interpreted

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: the GPU tests compile the kernels"),
    pytest.mark.skipif(os.environ.get("HYPERATTN_COMPILE_CHECK") != "1", reason="opt-in: HYPERATTN_COMPILE_CHECK=1"),
]

_RECORD = textwrap.dedent("""
    import json, sys
    import torch
    import triton.runtime.interpreter as interpreter
    from conftest import qkv
    import hyperattn as ha
    from hyperattn.kernels import hyper as kh
    from hyperattn.methods import structured as M

    DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
              torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
              torch.float64: "fp64"}
    launches = {}
    run = interpreter.InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        values = dict(zip(fn.__code__.co_varnames[:fn.__code__.co_argcount], args), **kwargs)
        constexprs = {n for n, a in fn.__annotations__.items() if "constexpr" in str(a)}
        types, consts = {}, {}
        for name, value in values.items():
            if name in ("num_warps", "num_stages"):
                continue
            if name in constexprs or value is None:
                consts[name] = value
            elif isinstance(value, torch.Tensor):
                types[name] = "*" + DTYPES[value.dtype]
            elif isinstance(value, bool):
                types[name] = "i1"
            elif isinstance(value, int):
                types[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            else:
                types[name] = "fp32"
        entry = [fn.__module__, fn.__name__, types, consts, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)]
        launches.setdefault(json.dumps(entry, sort_keys=True), entry)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = record
    M._kernels_ok = lambda x: True
    # Groups of 2 and 4 query heads per KV head: the column mass stacks a group's finding
    # rows into one tile (M = 64 and 128 with the default probe rows; 128 is the benchmarks').
    for causal, nq, nk, max_error, hq in ((True, 1200, 1200, None, 8), (False, 900, 1100, 0.1, 4),
                                          (True, 1200, 1200, 0.05, 4)):
        q, k, v = qkv(1, hq, 2, nq, nk, 32, seed=5)
        k[:, :, 0] *= 4
        cfg = ha.HyperAttentionConfig(seed=0, max_error=max_error, min_seq_len=256, chunk=512)
        with torch.no_grad():
            M.run(q, k, v, 32 ** -0.5, causal, cfg, 0)
    for causal in (True, False):  # the structured attention step's backward
        q, k, v = (x.requires_grad_() for x in qkv(1, 4, 2, 1200, 1200, 32, seed=5))
        cfg = ha.HyperAttentionConfig(seed=0, max_error=None, min_seq_len=256, chunk=512)
        M.run(q, k, v, 32 ** -0.5, causal, cfg, 0, need_stats=False)[0].sum().backward()
    for causal in (True, False):
        q, k, v = (torch.randn(1, h, 300, 16, generator=torch.Generator().manual_seed(0)) for h in (4, 2, 2))
        sel = kh.hyper_select(q, k, causal=causal, block_size=32, sample_size=16, num_projs=3, min_seq_len=64,
                              seed=0)
        out, lse = kh.hyper_attend(q, k, v, 0.25, sel)
        kh.hyper_backward(q, k, v, out, lse, torch.randn_like(out), torch.zeros_like(lse), 0.25, sel)
    print(json.dumps(list(launches.values())))
""")

# Shared memory one block may use on sm_90 (H100, H200): 227 KB.
_SM90_SHARED = 232448

# Pointer arguments in the inputs' dtype on the GPU (fp32 under the recording run).
_INPUT_POINTERS = ("Q", "K", "V", "KG", "VG", "DO", "QS", "KS", "VS")


def _variants(types: dict, consts: dict):
    # As recorded (fp32, small head dims), and as the benchmarks run: bf16 inputs, D = 128.
    yield types, consts
    if any(types.get(name) == "*fp32" for name in ("Q", "K", "V")):
        low = {n: "*bf16" if n in _INPUT_POINTERS and t == "*fp32" else t for n, t in types.items()}
        extra = {key: value for key, value in (("PRECISION", "tf32"), ("HEAD_DIM", 128)) if key in consts}
        yield low, {**consts, **extra}


def test_every_launch_of_the_cuda_paths_compiles_for_sm90():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = run_interpreted(_RECORD, "", timeout=1200)
    names = {name for _, name, *_ in launches}
    # Both methods' forward and backward kernels were reached.
    assert {"_sparse_kernel", "_lsh_kernel", "_probe_kernel", "_column_mass", "_gathered_attention_kernel",
            "_range_attention_dkv_kernel", "_block_dkv_kernel", "_sample_dkv_kernel", "_lsh_dq_kernel",
            "_sparse_dq_kernel", "_exact_dkv_kernel", "_lsh_dkv_kernel", "_gathered_dkv_kernel"} <= names
    failures, compiled = [], 0
    for module, name, types, consts, num_warps, num_stages in launches:
        jit = getattr(importlib.import_module(module), name)
        params = list(jit.arg_names)
        for types_v, consts_v in _variants(types, consts):
            signature = {p: "constexpr" if p in consts_v else types_v[p] for p in params}
            source = ASTSource(jit, signature, constexprs={(params.index(p),): v for p, v in consts_v.items()})
            try:
                kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                        options={"num_warps": num_warps, "num_stages": num_stages})
                compiled += 1
            except Exception as exc:  # any pass failing is the finding
                failures.append(f"{name} {consts_v}: {type(exc).__name__}: {str(exc)[-400:]}")
                continue
            # What a launch would refuse ("out of resource: shared memory") on an H100/H200.
            if kernel.metadata.shared > _SM90_SHARED:
                failures.append(f"{name} {consts_v}: {kernel.metadata.shared} bytes of shared memory")
    assert compiled > 0
    assert not failures, "\n".join(failures)
