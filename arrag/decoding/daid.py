"""DAiD: distribution augmentation in decoding (training-free).

At every step whose target cell is valid for the retriever's neighbourhood, for every row at once:
  query  = the already-sampled neighbours' normalised codebook vectors, concatenated
  hits   = one batched k-NN search for all rows
  p_ret  = softmax(-d / tau) over the distinct retrieved codes (nearest hit per code; or 'sum':
           exp(-d / tau) summed over duplicates, kNN-LM style), zero elsewhere
  p      = (1 - lambda) * p_model + lambda * p_ret
p_model is the CFG-combined, temperature-scaled distribution. Top-k / top-p, when set, apply to the
merged p (the sampler filters after its hooks). Rows whose search returns nothing keep p_model.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from arrag.decoding.hooks import DecodeState, DecodingHook
from arrag.decoding.step_queries import StepQueries
from arrag.errors import ArragError

# Defaults (MethodConfig and the CLI take theirs from here). k = 2048 is the original code's; tau = 1.0 is its
# retri_temperature default. The paper's tuned lambda is not published (the original example passed none, so
# it ran at 0); 0.1 is the library default, and the README's "DAiD defaults" says what the ShapesWorld sweep found.
DEFAULT_LAMBDA, DEFAULT_TAU, DEFAULT_K, DEFAULT_AGGREGATE = 0.1, 1.0, 2048, "nearest"
AGGREGATES = ("nearest", "sum")


def retrieval_distribution(distances: torch.Tensor, codes: torch.Tensor, vocab_size: int, tau: float = 1.0,
                           aggregate: str = "nearest", copies: torch.Tensor | None = None) -> torch.Tensor:
    """p_ret [B, V] from k-NN hits: distances [B, k], codes [B, k] (int, -1 = no hit). Rows without hits are 0.

    nearest: each distinct code weighs exp(-d_min / tau), its nearest hit's distance (the original DAiD).
    sum:     each distinct code weighs the sum of exp(-d / tau) over its hits (kNN-LM).
    copies [B, k] (optional, from PatchRetriever.search_counted): each hit stands for that many identical hits
    (0 = none), so a de-duplicated index's raw hits give the p_ret of its full, repeated hits.
    """
    if tau <= 0:
        raise ArragError(f"--daid-tau must be > 0, got {tau}")
    if aggregate not in ("nearest", "sum"):
        raise ArragError(f"--daid-aggregate {aggregate!r}: choose nearest or sum")
    d = distances.float()
    valid = codes >= 0 if copies is None else (codes >= 0) & (copies > 0)
    # Weights relative to each row's nearest valid hit: the softmax is unchanged and exp() cannot underflow
    # to an empty row. exp is decreasing, so a code's largest weight is its nearest hit's ('nearest').
    d_min = torch.where(valid, d, float("inf")).amin(1, keepdim=True)
    w = torch.exp((d_min - d) / tau)
    if copies is not None and aggregate == "sum":
        w = w * copies
    w = torch.where(valid, w, 0.0)  # also clears rows without hits (their d_min is inf)
    p = torch.zeros(d.shape[0], vocab_size, device=d.device)
    p.scatter_reduce_(1, codes.clamp_min(0).long(), w, reduce="sum" if aggregate == "sum" else "amax")
    return p / p.sum(1, keepdim=True).clamp_min(1e-30)


class SearchPrefetch:
    """DAiD's search for the next target, started before the forward pass that predicts it, collected after.

    A worker thread runs the search (FAISS and torch release the GIL), so its host work overlaps the forward
    pass's. On CUDA, with side_stream, it also launches on a stream of its own, so its kernels can run beside
    the forward pass's instead of queueing behind them: events order the streams (the side stream waits for
    the query's kernels, the caller's stream for the search's), and record_stream tells the caching allocator
    which stream last uses each tensor handed across, so its memory is not reused too early.
    """

    def __init__(self, search, device: torch.device, side_stream: bool = True):
        self.search = search
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daid-search")
        self.stream = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None

    def submit(self, query: torch.Tensor, k: int) -> Future:
        """Start search(query [Q, D], k) now; collect() its result."""
        if self.stream is None:
            return self.pool.submit(self.search, query, k)
        ready = torch.cuda.current_stream(query.device).record_event()
        query.record_stream(self.stream)
        return self.pool.submit(self._search_on_side, query, k, ready)

    def _search_on_side(self, query: torch.Tensor, k: int, ready) -> tuple:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            found = self.search(query, k)
            return found, self.stream.record_event()

    def collect(self, future: Future) -> tuple:
        """The search's result, usable on the caller's stream (no host synchronisation on CUDA)."""
        if self.stream is None:
            return future.result()
        found, done = future.result()
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_event(done)
        for tensor in found:
            if tensor is not None and tensor.is_cuda:
                tensor.record_stream(current)
        return found

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class DAiD(DecodingHook):
    """The DAiD hook for the sampling loop (see the module docstring)."""

    def __init__(self, retriever, lam: float = DEFAULT_LAMBDA, tau: float = DEFAULT_TAU, k: int = DEFAULT_K,
                 aggregate: str = DEFAULT_AGGREGATE, prefetch: bool | None = None, side_stream: bool = True):
        """prefetch: search for the next target while the forward pass runs (None: on CUDA models only);
        side_stream: on CUDA, on a stream of its own (SearchPrefetch). Neither changes the images."""
        self.check_settings(lam, tau, k, aggregate)
        self.retriever, self.lam, self.tau, self.k, self.aggregate = retriever, lam, tau, k, aggregate
        self.prefetch, self.side_stream, self.prefetcher, self.pending = prefetch, side_stream, None, None
        self.recorder = None  # an AttributionRecorder, when the run records attribution
        self.stats = {"steps_augmented": 0, "rows_augmented": 0, "rows_without_hits": 0}

    @staticmethod
    def check_settings(lam: float, tau: float, k: int, aggregate: str) -> None:
        """One-line errors for DAiD settings that cannot work."""
        if not 0.0 <= lam <= 1.0:  # NaN fails every comparison
            raise ArragError(f"--daid-lambda must lie in [0, 1], got {lam}")
        if not (tau > 0 and math.isfinite(tau)):
            raise ArragError(f"--daid-tau must be > 0 and finite, got {tau}")
        if k < 1:
            raise ArragError(f"--daid-k must be >= 1, got {k}")
        if aggregate not in AGGREGATES:
            raise ArragError(f"--daid-aggregate {aggregate!r}: choose nearest or sum")

    def begin(self, state: DecodeState) -> None:
        self.queries = StepQueries(self.retriever, state)
        self.misses = torch.zeros((), dtype=torch.long, device=state.codes.device)
        self.rows_searched = 0
        self.active = self.lam > 0 and self.retriever.entries > 0
        self.pending = None
        if self.prefetch is None:
            # Overlapping search and forward pays off when the model runs on a GPU; on a CPU both compete for
            # the same cores (measured on 2 cores: 1.61x -> 1.89x overhead at batch 16), so it stays off there.
            self.prefetch = state.codes.device.type == "cuda"
        if self.active and self.prefetch and self.prefetcher is None:
            self.prefetcher = SearchPrefetch(self._search, state.codes.device, self.side_stream)
        if self.lam > 0 and self.retriever.entries == 0:
            warnings.warn(f"retriever {self.retriever.folder} is empty: DAiD decodes as base", stacklevel=2)

    def _search(self, query, k: int) -> tuple:
        """(distances, codes, copies[, ids with attribution]) of the raw hits."""
        return self.retriever.search_counted(query, k, with_ids=self.recorder is not None)

    def before_forward(self, state: DecodeState, target: int) -> None:
        # DAiD gives the decoder no context; it only starts the search early. The query for `target` is complete
        # once the token before it is sampled, i.e. now: search in a background thread while the model's forward
        # pass computes the logits. Not for the prefill (target 0) and the first step (target 1): that step is
        # when a CUDA graph is captured, and no other thread may allocate or synchronise during a capture.
        if self.active and self.prefetch and target > 1 and self.queries.valid[target]:
            self.pending = (target, self.prefetcher.submit(self.queries.query(state, target), self.k))

    def adjust_probs(self, state: DecodeState, target: int, probs: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.queries.valid[target]:
            return probs
        if self.pending is not None and self.pending[0] == target:
            found = self.prefetcher.collect(self.pending[1])
            self.pending = None
        else:
            found = self._search(self.queries.query(state, target), self.k)
        distances, codes, copies = found[:3]
        p_ret = retrieval_distribution(distances.to(probs.device), codes.to(probs.device), probs.shape[1],
                                       self.tau, self.aggregate, None if copies is None else copies.to(probs.device))
        missing = codes[:, :1] < 0  # hits come nearest first: a row without a first hit has none
        self.stats["steps_augmented"] += 1
        self.rows_searched += len(codes)
        self.misses = self.misses + missing.sum()  # counted on the device: no host sync per step
        # (1 - lambda) p + lambda p_ret, and p unchanged where p_ret is an empty row (no hits).
        mixed = torch.where(missing, probs, probs * (1 - self.lam) + p_ret * self.lam)
        if self.recorder is not None:
            self.recorder.daid_step(target, self.queries.query(state, target), distances, codes, copies, found[3],
                                    p_ret, self.tau, self.aggregate, p_model=probs, p_mixed=mixed)
        return mixed

    def end(self, state: DecodeState) -> None:
        self.pending = None
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        self.stats["rows_augmented"] += self.rows_searched - int(self.misses)
        self.stats["rows_without_hits"] += int(self.misses)
        if self.stats["rows_without_hits"]:
            warnings.warn(f"DAiD: {self.stats['rows_without_hits']} row-steps found no entry and decoded as base",
                          stacklevel=2)

    def settings(self) -> dict:
        return {"daid_lambda": self.lam, "daid_tau": self.tau, "daid_k": self.k, "daid_aggregate": self.aggregate,
                **self.retriever.settings()}
