"""Timing harness: HyperAttention against ``scaled_dot_product_attention`` and FlexAttention.

Run it as ``hyperattn bench`` (:mod:`hyperattn.bench.cli`); the harness is
:mod:`hyperattn.bench.forward`, the plot :mod:`hyperattn.bench.plot`.

Results file (stable schema, one JSON object)::

    {
      "device": "NVIDIA H100 80GB HBM3",      # torch.cuda.get_device_name(), or the CPU
      "torch": "2.11.0+cu130", "triton": "3.6.0" | null,
      "shape": {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
      "rows": [
        {"n": 131072,                # Nq = Nk
         "causal": true,
         "backward": false,          # forward only (true rows: forward + backward)
         "impl": "hyper",            # see IMPLS in hyperattn.bench.forward
         "config": {...},            # the HyperAttentionConfig fields, or the backend/mask used
         "ms": 12.3,                 # median of CUDA-event timings after warm-up; null if failed/skipped
         "peak_gb": 4.5,             # peak allocated GPU memory during the call, inputs included
         "pairs_per_head": 1.2e9,    # (query, key) scores one head computes (the mask's, not padding)
         "tflops": 310.0,            # 4 * D * pairs * B * Hq / time (x3.5 on backward rows: the backward's
                                     # five matmuls over the forward's two): work actually done per second
         "error": "..."}             # only on failed or skipped rows
      ],
      "profile": [                   # only with --profile: GPU time per stage of method="hyper"
        {"n": 131072, "causal": true, "backward": false, "total_ms": 40.7,   # backward: with --backward,
         "stages_ms": {"hashing": ..., "sorting": ..., "exact pieces": ..., "approximate pieces": ...,
                       "other": ...},  # + "exact pieces backward", "approximate pieces backward"
         "top_kernels_ms": [{"name": "...", "ms": ...}]}
      ]
    }

Speed-ups are read off the file: ``ms`` of the fastest ``sdpa-*`` row of the same
``(n, causal, backward)`` over ``ms`` of the row (``hyperattn bench --backward`` writes
forward+backward rows: the ratio is then to SDPA's fastest forward+backward). The effective rate of exact
attention at the same
size is ``4 * D * exact_pairs * B * Hq / time``, which the table prints.
"""
