"""SDPA's backward ops as the exact pieces' share of a merged call's gradient: which call forms work, and their speed.

    for m in check-cudnn-slices check-cudnn-contig check-cudnn-batched check-flash-batched \\
             time-flash-loop time-flash-batched time-cudnn-loop time-cudnn-batched; do
        python -X faulthandler benchmarks/sdpa_backward_probe.py $m; done

Each mode runs in its own process, so a crash of one call form loses one line. ``check-*``:
the gradient of a 4096-row causal call split into 1024-row pieces (diagonal leaves and
off-diagonal blocks), each piece's backward given the merged output and LSE, against fp32
autograd (``slices``: views of the inputs; ``contig``: copies; ``batched``: the diagonal
leaves as one call). ``time-*``: the 48 exact pieces of ``method="hyper"`` at 131,072 causal
(32 leaves and 16 off-diagonal blocks of 4096), one call per piece or one per run.
B1 Hq32/Hkv8 D128 bf16. Output of one H200 run (of an earlier form of this script, same calls):
``results/profiles/h200-exact-pieces-sdpa-backward-probe.txt``.
"""

from __future__ import annotations

import sys

import torch

DEV = "cuda"
B, H, HKV, D = 1, 32, 8, 128
SCALE = D ** -0.5


def backward(backend, grad_out, q, k, v, out, lse, causal):
    """One SDPA backward op; cuDNN's takes no grouped heads, so its KV heads are repeated and summed back."""
    seed = torch.zeros(2, dtype=torch.uint64, device=DEV)  # dropout off: never read
    offset = torch.zeros((), dtype=torch.uint64, device=DEV)
    nq, nk = q.shape[2], k.shape[2]
    if backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, nq, nk, 0.0, causal, seed, offset, scale=SCALE)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    gq, gk, gv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None, nq, nk, 0.0, causal, scale=SCALE)
    return gq, gk.unflatten(1, (-1, group)).sum(2), gv.unflatten(1, (-1, group)).sum(2)


def batched(x, start, count, step, length):
    """``x[:, :, start + i * step:][:length]`` for ``i < count`` as one batch ``(count, H, length, ...)`` (B = 1)."""
    st = x.stride()
    return x.as_strided((count, x.shape[1], length, *x.shape[3:]), (step * st[2], st[1], st[2], *st[3:]),
                        x.storage_offset() + start * st[2])


def check(backend, layout):
    length, pieces = 1024, 4
    n = length * pieces
    gen = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, HKV, n, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    grad_out = torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    s = qf @ kf.repeat_interleave(H // HKV, 1).transpose(-1, -2) * SCALE
    s = s.masked_fill(torch.ones(n, n, device=DEV, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.softmax(s, -1) @ vf.repeat_interleave(H // HKV, 1)
    o.backward(grad_out.float())
    out, lse = o.detach().to(torch.bfloat16), lse.detach()
    grads = [torch.zeros(B, h, n, D, device=DEV) for h in (H, HKV, HKV)]
    # (first row, first key, causal) of each piece: the diagonal leaves, then every block below them.
    todo = [(i * length, i * length, True) for i in range(pieces)]
    if layout == "batched":
        views = [batched(t, 0, pieces, length, length) for t in (grad_out, q, k, v, out)]
        got = backward(backend, *views, batched(lse, 0, pieces, length, length).contiguous(), True)
        for acc, g in zip(grads, got):
            batched(acc, 0, pieces, length, length).add_(g)
        todo = []
    todo += [(i * length, j * length, False) for i in range(pieces) for j in range(i)]
    for r0, k0, causal in todo:
        rows, keys = slice(r0, r0 + length), slice(k0, k0 + length)
        args = [grad_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows]]
        if layout == "contig":
            args = [t.contiguous() for t in args]
        got = backward(backend, *args, lse[:, :, rows].contiguous(), causal)
        for acc, g, at in zip(grads, got, (rows, keys, keys)):
            acc[:, :, at] += g
    errs = [((g - ref.grad).norm() / ref.grad.norm()).item() for g, ref in zip(grads, (qf, kf, vf))]
    print(f"check-{backend}-{layout} rel err dq dk dv " + " ".join(f"{e:.2e}" for e in errs), flush=True)


def time(backend, layout):
    n, length = 131072, 4096
    leaves = n // length
    q, grad_out, out = (torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    k, v = (torch.randn(B, HKV, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    lse = torch.randn(B, H, n, device=DEV) + 10
    # Runs: the diagonal leaves (causal, step L) and the off-diagonal blocks, rows
    # [2iL + L, 2iL + 2L) against keys [2iL, 2iL + L) (step 2L).
    runs = [(0, 0, leaves, length, True), (length, 0, leaves // 2, 2 * length, False)]

    def step():
        for r0, k0, count, stride, causal in runs:
            if layout == "batched":
                rows = [batched(t, r0, count, stride, length) for t in (grad_out, q)]
                keys = [batched(t, k0, count, stride, length) for t in (k, v)]
                backward(backend, *rows, *keys, batched(out, r0, count, stride, length),
                         batched(lse, r0, count, stride, length).contiguous(), causal)
                continue
            for i in range(count):
                rows = slice(r0 + i * stride, r0 + i * stride + length)
                keys = slice(k0 + i * stride, k0 + i * stride + length)
                backward(backend, grad_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                         out[:, :, rows], lse[:, :, rows].contiguous(), causal)

    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        step()
    end.record()
    torch.cuda.synchronize()
    print(f"time-{backend}-{layout} {start.elapsed_time(end) / 5:.2f} ms per backward of the 48 exact pieces",
          flush=True)


if __name__ == "__main__":
    kind, backend, layout = sys.argv[1].split("-")
    {"check": check, "time": time}[kind](backend, layout)
