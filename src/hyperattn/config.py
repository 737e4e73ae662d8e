"""Configuration of the approximate attention methods."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["HyperAttentionConfig", "METHODS"]

#: Methods understood by :func:`hyperattn.hyper_attention`.
#:
#: - ``"structured"`` (default): exact on sinks/heavy columns, a local window, the key
#:   blocks with the largest block scores (and optionally an LSH block); the rest
#:   estimated by sampling; per-head error estimate and a guard over budget tiers.
#: - ``"hyper"``: the paper's HyperAttention (sortLSH blocks + uniform residual samples).
#: - ``"exact"``: exact attention through the same entry point.
#: - ``"streaming"``, ``"vertical_slash"``, ``"block_topk"``, ``"oracle_topk"``: peer
#:   patterns and the oracle limit, for side-by-side measurements.
METHODS = (
    "structured",
    "hyper",
    "exact",
    "streaming",
    "vertical_slash",
    "block_topk",
    "oracle_topk",
)

# min_seq_len used when the config leaves it as None.
_DEFAULT_MIN_SEQ_LEN = {"hyper": 4096}
_FALLBACK_MIN_SEQ_LEN = 1024


@dataclass(frozen=True)
class HyperAttentionConfig:
    """Budget and randomness of one approximate attention call.

    The user's knobs (what a call asks for):

    Args:
        method: one of :data:`METHODS`. Default ``"structured"``.
        max_error: relative error target per (head, chunk) (structured). Each chunk runs at
            the cheapest budget tier (1/4x, 1/2x, 1x, 2x, 4x, 8x the key blocks and samples)
            whose error on its probe rows, taken at a one-sided 90% upper bound (the probe
            blocks as clusters), is at most ``max_error``, else exactly (through SDPA on
            CUDA). ``None`` disables the guard (every chunk at 1x). Default 0.05.
        min_seq_len: at or below this many keys (per level of the causal recursion for
            ``"hyper"``; per row for ``"structured"``, rounded up to a query block) attention
            is exact. ``None`` (default) means the method's own default: 4096 for
            ``"hyper"`` (the paper's); for ``"structured"`` the measured crossover on CUDA
            (131072: at and below it SDPA is faster than the current pipeline,
            benchmarks/NOTES.md) and 1024 elsewhere; 1024 for the peers.
        seed: ``None`` draws fresh randomness from torch's global generator on every
            call (so ``torch.manual_seed`` makes runs repeatable); an int in
            ``[0, 2**63 - 1]`` fixes hashes and samples.
        sample_size: ``m``, residual columns sampled: per (batch, KV head, sub-problem) for
            ``"hyper"``; per (batch, KV head, chunk) for ``"structured"`` (at the 1x tier). ``m`` at least
            the residual's size takes every column, which makes the result exact. Default 256.
        block_size: ``"hyper"``: ``b``, keys per block of the sorted order that each
            query block attends exactly; ``"oracle_topk"``: top keys per row. Unused by the
            structured method (its block is ``query_block``). Default 256.
        check_finite: check inputs for NaN/Inf (one reduction per tensor and a host wait),
            raising ``ValueError``. On CUDA a structured call below its crossover is one SDPA
            call and skips the check: NaN/Inf come out as NaN, as in exact attention. Default True.


    Expert tuning of the structured method and the peers (defaults measured on the
    tuning text, docs/QUALITY.md; change them to study the method, not to use it):

    Args:
        lsh_num_projs: hash bits ``r``; keys and queries fall in ``2**r`` angular buckets
            ordered by Gray code (adjacent buckets differ in one hyperplane). Default 7.
        window: keys before each query block that it attends exactly, as whole key blocks
            (structured; streaming: the window itself). Default 128.
        num_sinks: leading "sink" columns always attended exactly. Default 16.
        heavy_columns: heavy columns per chunk found by the probe rows (structured). Default 48.
        probe_rows: query rows per chunk scored against every key they see, spread over
            ``probe_blocks`` blocks; half find the chunk's heavy columns, the other half
            estimate its error (structured; ``"vertical_slash"``: its last rows, which find
            its columns). Default 64: against 32, on the held-out text's 30 layers the worst
            head fell from 0.193 to 0.096 at the same budget (docs/QUALITY.md).
            With ``max_error`` set it must be >= 2 (no estimating row would blind the guard).
        query_block: rows per query block and keys per key block (structured): the unit of
            selection and of the block-sparse pass. Default 128.
        key_blocks: key blocks each query block attends exactly beyond its window, the best
            by pooled block scores (structured). Default 4.
        chunk: rows per chunk (structured): heavy columns, probe rows and the guard's tier
            are decided per chunk from its own rows, so rows before a multiple of ``chunk``
            never depend on later tokens. A multiple of ``query_block``. Default 4096.
        score_group: consecutive query rows whose mean query scores the key blocks'
            mean keys for the block scores (structured); must divide ``query_block``.
            Default 16.
        probe_blocks: query blocks per chunk holding its probe rows (structured), an even
            number, one per equal stratum of the chunk: alternate blocks find the heavy
            columns and estimate the error (blocks that chose the columns would flatter it).
            Default 32, every block of a default chunk: with 2 estimating blocks per chunk a
            head at 0.18 was estimated at 0.03; with 16, 96.5% of heads stay within 1.5x
            max_error (docs/QUALITY.md). More blocks than a chunk holds share blocks between
            finding and estimating rows.
        lsh_block: keys of each query's own LSH bucket attended exactly (structured); 0
            turns the LSH block off. Default 32: it finds a key wanted by one query row alone
            (a needle no block score sees; tested).
        sample_mix: share of uniform sampling in the residual proposal; the rest follows
            the block scores (structured). 1.0 is plain uniform sampling; the uniform share
            bounds every weight by |complement| / (sample_size * sample_mix). Default 0.3.
        heavy_span: keys before each chunk (causal; on each side of it otherwise) that its
            finding probe rows scan for heavy columns (structured), besides the columns the
            earlier chunks found near themselves, carried forward (the ``2 * heavy_columns``
            with the most mass summed over those chunks); ``None`` scans every key they see.
            Default 32768: up to that many keys before a chunk's rows it is the full scan
            (the embedded model's 8,192 positions always are), past it the scan costs
            O(N (heavy_span + chunk)) instead of O(N^2 / chunk), the selection's largest cost
            at long inputs (1M tokens on an H100: 500 ms a call with the full scan, 211 ms
            with a span of 16,384 and the carried columns). Measured at 8k on the held-out
            text with 1,024-row chunks: a span of 1,024 with the carried columns matched the
            full scan on every layer (the span alone took layers 3-10 from 0.03-0.14 to
            0.23-0.32 mean error); at 16k tokens (past the model's positions, 4,096-row
            chunks) a span of 4,096 with them gave 6-12% more error than the full scan on the
            four layers measured (docs/QUALITY.md).
    """

    lsh_num_projs: int = 7
    block_size: int = 256
    sample_size: int = 256
    min_seq_len: int | None = None
    seed: int | None = None
    method: str = "structured"
    # Expert tuning from here on (except max_error and check_finite, kept in their place so
    # positional construction stays as it was).
    window: int = 128
    num_sinks: int = 16
    heavy_columns: int = 48
    probe_rows: int = 64
    max_error: float | None = 0.05
    check_finite: bool = True
    query_block: int = 128
    key_blocks: int = 4
    chunk: int = 4096
    score_group: int = 16
    probe_blocks: int = 32
    lsh_block: int = 32
    sample_mix: float = 0.3
    heavy_span: int | None = 32768

    def __post_init__(self) -> None:
        _check_int("lsh_num_projs", self.lsh_num_projs, low=1, high=16)
        _check_int("block_size", self.block_size, low=1)
        _check_int("sample_size", self.sample_size, low=0)
        if self.min_seq_len is not None:
            _check_int("min_seq_len", self.min_seq_len, low=0)
        if self.seed is not None:
            _check_seed(self.seed)
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        _check_int("window", self.window, low=0)
        _check_int("num_sinks", self.num_sinks, low=0)
        _check_int("heavy_columns", self.heavy_columns, low=0)
        _check_int("probe_rows", self.probe_rows, low=0)
        if self.max_error is not None:
            if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)):
                raise TypeError(f"max_error: expected a float or None, got {type(self.max_error).__name__}")
            if not (math.isfinite(self.max_error) and self.max_error > 0):
                raise ValueError(f"max_error: expected a finite float > 0 or None, got {self.max_error!r}")
            if self.probe_rows < 2 and self.method == "structured":
                # The guard's estimate comes from the probe rows: with none it would report
                # 0 for every head and never fall back, whatever the true error.
                raise ValueError("probe_rows: expected an int >= 2 when max_error is set (the guard estimates "
                                 f"each chunk's error from every other probe row), got {self.probe_rows}; pass "
                                 "max_error=None to run without the guard")
        _check_int("query_block", self.query_block, low=1)
        _check_int("key_blocks", self.key_blocks, low=0)
        _check_int("score_group", self.score_group, low=1)
        if self.query_block % self.score_group:
            raise ValueError(f"score_group: expected a divisor of query_block = {self.query_block}, "
                             f"got {self.score_group}")
        _check_int("chunk", self.chunk, low=1)
        if self.chunk % self.query_block:
            raise ValueError(f"chunk: expected a multiple of query_block = {self.query_block}, got {self.chunk}")
        _check_int("probe_blocks", self.probe_blocks, low=2)
        if self.probe_blocks % 2:
            raise ValueError(f"probe_blocks: expected an even int (half find heavy columns, half estimate the "
                             f"error), got {self.probe_blocks}")
        _check_int("lsh_block", self.lsh_block, low=0)
        if isinstance(self.sample_mix, bool) or not isinstance(self.sample_mix, (int, float)):
            raise TypeError(f"sample_mix: expected a float in (0, 1], got {type(self.sample_mix).__name__}")
        if not 0 < self.sample_mix <= 1:
            raise ValueError(f"sample_mix: expected a float in (0, 1], got {self.sample_mix!r}")
        if self.heavy_span is not None:
            _check_int("heavy_span", self.heavy_span, low=0)
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite: expected a bool, got {type(self.check_finite).__name__}")

    @property
    def effective_min_seq_len(self) -> int:
        """``min_seq_len`` with ``None`` resolved to the method's default off CUDA.

        The structured method on CUDA resolves ``None`` to its measured crossover instead
        (:func:`hyperattn.methods.structured.default_min_seq_len`).
        """
        if self.min_seq_len is not None:
            return self.min_seq_len
        return _DEFAULT_MIN_SEQ_LEN.get(self.method, _FALLBACK_MIN_SEQ_LEN)

    def replace(self, **changes) -> HyperAttentionConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# Seeds reach int64 arguments (the torch.library op's) and torch.Generator.manual_seed,
# which takes up to 2**64 - 1: int64's non-negative range fits both, with room for the
# small offsets that derived seeds add.
_MAX_SEED = 2**63 - 1


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected None or an int, got {type(seed).__name__} ({seed!r})")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed: expected None or an int in [0, 2**63 - 1], got {seed}")


def _check_int(name: str, value, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")
