"""Retrieval metrics per query: Recall@K, R-Precision and MAP@R, exact, from a chunked k-NN.

Definitions (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020)
---------------------------------------------------------------------------
For a query q with label y_q, let rel(i) = 1 if its i-th neighbour (query excluded by index in
leave-one-out form; ties broken by lower reference index, see :mod:`dmlnb.metrics.neighbors`)
has label y_q, and R_q = number of reference items with label y_q (minus 1 in leave-one-out form).

- Recall@K (the DML meaning, not IR recall) = 1[sum_{i<=K} rel(i) >= 1]. Recall@1 equals
  Precision@1. When K exceeds the number of reference items available, all of them are used.
- R-Precision = (1/R_q) sum_{i<=R_q} rel(i).
- MAP@R = (1/R_q) sum_{i<=R_q} P(i) rel(i), with P(i) = (1/i) sum_{j<=i} rel(j). The
  denominator is always R_q. The neighbour list always reaches max_q R_q, so MAP@R is exact for
  every class size.
- Computation: one pass over blocks of the similarity matrix. Each block keeps its top
  k_top = max(max_q R_q, min(max K, ``RECALL_CANDIDATES``)) neighbours in the tie-broken order
  (:func:`dmlnb.metrics.neighbors.topk_stable`); relevance is computed on these ``[block, k_top]``
  neighbour labels only. R-Precision and MAP@R read the first R_q of them. Recall@K needs the
  exact position of the first relevant neighbour: read from the list when it is there, otherwise
  (only for queries whose list holds no relevant item, when some K exceeds k_top) counted
  exactly: the relevant item j* of largest similarity s* (lowest index among equals, found among
  the query's class members) is preceded by every item with s > s* and every item with s = s*
  and a lower index. So K = 1000 costs no top-1000 selection.
- Leave-one-out on the CPU (float32, more than one tile): the same lists and counts come from
  the symmetric search, which computes each pair of tiles of the similarity matrix once
  (:func:`dmlnb.metrics.neighbors.symmetric_topk`): about half the products. When some K exceeds
  k_top, s* and j* are computed first (products of class-sorted blocks with their classes) and
  the search counts, for every query, the items ranked before j*, exactly up to max K. The
  scores are then computed from the lists by the same code, block by block, so they are the
  per-row search's, bit for bit (``tests/test_metrics_symmetric.py``).
- Lone queries (R_q = 0: no other item of their label in the reference set) get NaN for
  R-Precision and MAP@R (they are excluded from those means and counted), and 0 for Recall@K
  (they are kept in the Recall@K mean, which is a mean over all queries).

Differences from pytorch-metric-learning's AccuracyCalculator (v2.9): it drops lone queries from
precision_at_1 as well (dmlnb keeps them at 0 in Recall@K). In leave-one-out form it also excludes
the query by index (it searches k+1 neighbours and removes the query's own index wherever it
appears, or the last column when it is absent), as dmlnb does; only the order among tied
similarities differs (faiss's order there, not defined; dmlnb's: lower index first), which can
change a result only when tied items of different labels straddle a cut-off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dmlnb._validate import check_positive_int
from dmlnb.metrics._inputs import as_embeddings, as_labels, l2_normalize
from dmlnb.metrics.neighbors import (
    NotReproducibleError,
    auto_chunk_size,
    best_relevant,
    best_relevant_work,
    blas_threads_like_torch,
    class_floor,
    iter_similarity_blocks,
    symmetric_applicable,
    symmetric_topk,
    topk_stable,
)

# Neighbours kept per query for Recall@K beyond those that R-Precision/MAP@R need: queries with
# a relevant item among them get Recall@K from the list, the others by an exact count over their
# similarity row. DECISION: small, as torch.topk's cost grows with k; 32 covers the first hit of
# almost every query at SOP's Recall@32 (> 0.99 in published results).
RECALL_CANDIDATES = 32


def relevant_counts(
    query_labels: torch.Tensor, reference_labels: torch.Tensor, leave_one_out: bool
) -> torch.Tensor:
    """R_q for every query: reference items sharing its label (minus itself in leave-one-out)."""
    classes, counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp(max=len(classes) - 1)
    r = torch.where(classes[pos] == query_labels, counts[pos], torch.zeros_like(pos))
    return r - int(leave_one_out)


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Validate a sequence of K values (each an int >= 1), keep their order, drop duplicates."""
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = (int(ks),)
    try:
        ks = tuple(dict.fromkeys(ks))
    except TypeError:
        raise TypeError(f"ks must be a sequence of integers, got {ks!r}") from None
    if not ks:
        raise ValueError("ks is empty; give at least one K >= 1, e.g. ks=(1, 2, 4, 8)")
    for k in ks:
        check_positive_int("K in ks", int(k) if isinstance(k, np.integer) else k)
    return tuple(int(k) for k in ks)


class ClassMembers:
    """Reference items of each query's class, for exact first-hit positions.

    Parameters
    ----------
    reference_labels : int64 tensor [n_reference].
    query_labels : int64 tensor [n_query] on the same device.
    """

    def __init__(self, reference_labels: torch.Tensor, query_labels: torch.Tensor) -> None:
        self.n_reference = reference_labels.shape[0]
        self.order = torch.argsort(reference_labels, stable=True)  # ascending index within class
        classes, counts = torch.unique_consecutive(reference_labels[self.order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        at = torch.searchsorted(classes, query_labels).clamp(max=len(classes) - 1)
        found = classes[at] == query_labels
        self.start = torch.where(found, starts[at], 0)
        self.count = torch.where(found, counts[at], 0)

    def first_relevant_position(self, sims: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Position of the first relevant item in each row's stable order (int64 max if none).

        ``sims`` [m, n_reference] are the similarity rows of the queries ``queries`` [m] (query
        itself already at -inf in leave-one-out form). With s* the largest similarity to an item
        of the query's class and j* the lowest such index, the position is
        #{j: s_j > s*} + #{j < j*: s_j = s*}.
        """
        dev = sims.device
        cnt = self.count[queries]
        width = int(cnt.max()) if cnt.numel() else 0
        no_hit = torch.iinfo(torch.int64).max
        if width == 0:
            return torch.full((len(queries),), no_hit, dtype=torch.int64, device=dev)
        offs = torch.arange(width, device=dev)
        valid = offs[None, :] < cnt[:, None]
        at = (self.start[queries, None] + offs[None, :]).clamp(max=self.n_reference - 1)
        mem = self.order[at]  # [m, width], ascending index along each row
        v = sims.gather(1, mem).masked_fill_(~valid, float("-inf"))
        best = v.max(dim=1, keepdim=True).values
        j_star = torch.where(v == best, mem, self.n_reference).min(dim=1, keepdim=True).values
        pos = (sims > best).sum(dim=1)
        eq = sims == best
        ties = (eq.sum(dim=1) > 1).nonzero().flatten()  # j* itself is one of them
        if ties.numel() > 0:
            cols = torch.arange(self.n_reference, device=dev)
            pos[ties] += (eq[ties] & (cols[None, :] < j_star[ties])).sum(dim=1)
        return torch.where(best[:, 0] > float("-inf"), pos, no_hit)


def retrieval_scores(
    embeddings: Any,
    labels: Any,
    *,
    reference: Any | None = None,
    reference_labels: Any | None = None,
    ks: Sequence[int] = (1,),
    normalize: bool = True,
    chunk_size: int | None = None,
    ranking: bool = True,
    symmetric: bool | None = None,
) -> dict[str, np.ndarray]:
    """Per-query Recall@K, R-Precision and MAP@R (module docstring for the definitions).

    Parameters
    ----------
    embeddings, labels : query embeddings [n, dim] and integer labels [n].
    reference, reference_labels : optional gallery; None means leave-one-out among the queries.
    ks : K values for Recall@K.
    normalize : L2-normalise first (cosine similarity), default True.
    chunk_size : queries per k-NN block (default from a memory budget); in the symmetric
        leave-one-out search, rows (and columns) per tile.
    ranking : also compute R-Precision and MAP@R (the neighbour list then reaches max R_q).
    symmetric : leave-one-out only: compute each pair of tiles of the similarity matrix once
        (:func:`dmlnb.metrics.neighbors.symmetric_topk`; same results). None (default): when it
        applies (CPU float32, at least two tiles, lists within the memory budget), falling back
        to per-row blocks if the BLAS is caught giving a pair another value in a tile; True:
        require it (ValueError if it does not apply, RuntimeError instead of the fallback);
        False: per-row blocks.

    Returns
    -------
    dict with float64 arrays of length n: ``recall@K`` (0/1) for each K, ``r_precision`` and
    ``map@r`` (NaN for lone queries) when ``ranking``, and ``r`` (int64, R_q).
    """
    ks = check_ks(ks)
    q = as_embeddings("embeddings", embeddings)
    yq = as_labels("labels", labels, q.shape[0], device=q.device)
    leave_one_out = reference is None
    if leave_one_out:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without reference")
        r, yr = q, yq
    else:
        if reference_labels is None:
            raise ValueError("reference was given without reference_labels")
        r = as_embeddings("reference", reference, device=q.device)
        yr = as_labels("reference_labels", reference_labels, r.shape[0], device=q.device)
        if r.shape[1] != q.shape[1]:
            raise ValueError(
                f"embeddings have dimension {q.shape[1]} but reference has {r.shape[1]}"
            )
        if q.dtype != r.dtype:
            q, r = q.to(torch.float64), r.to(torch.float64)
    if normalize:
        q = l2_normalize(q)
        r = q if leave_one_out else l2_normalize(r)
    available = r.shape[0] - int(leave_one_out)
    if available < 1:
        raise ValueError("leave-one-out retrieval needs at least 2 items; got 1")

    rq = relevant_counts(yq, yr, leave_one_out)
    r_max = int(rq.max()) if ranking else 0
    n, n_r = q.shape[0], r.shape[0]
    dev = q.device
    k_recall = min(max(ks), available)  # first-hit positions >= k_recall are misses for every K
    k_top = min(available, max(r_max, min(k_recall, RECALL_CANDIDATES)))
    counting = k_recall > k_top  # some first hits must be counted beyond the neighbour lists
    no_hit = torch.iinfo(torch.int64).max  # first-hit position of a query no K reaches
    first_hit = torch.empty(n, dtype=torch.int64, device=dev)
    rp = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
    ap = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
    positions = torch.arange(k_top, device=dev)
    ranks = torch.arange(1, r_max + 1, device=dev, dtype=torch.float64)

    def score(start: int, idx: torch.Tensor, beyond, depth: torch.Tensor | None = None) -> None:
        """Scores of queries start.. from their neighbour lists ``idx`` [block, k_top], exact in
        their first ``depth`` entries (default: all); ``beyond(todo)``: exact first-hit
        positions of block rows whose list has no hit."""
        stop = start + idx.shape[0]
        rel = yr[idx] == yq[start:stop, None]  # [block, k_top]
        if depth is not None:
            rel &= positions[None, :] < depth[start:stop, None]
        pos = torch.where(rel, positions, k_top).min(dim=1).values
        hit = pos < k_top
        fh = torch.where(hit, pos, no_hit)
        if counting:
            todo = (~hit & (rq[start:stop] > 0)).nonzero().flatten()
            if todo.numel() > 0:
                fh[todo] = beyond(todo)
        first_hit[start:stop] = fh
        if r_max > 0:
            relr = rel[:, :r_max].to(torch.float64)
            rb = rq[start:stop].to(torch.float64)
            within = ranks[None, :] <= rb[:, None]
            prec = relr.cumsum(dim=1) / ranks[None, :]
            rp[start:stop] = (relr * within).sum(dim=1) / rb  # 0/0 -> NaN for lone queries
            ap[start:stop] = (prec * relr * within).sum(dim=1) / rb

    lists = None
    if symmetric and not leave_one_out:
        raise ValueError("symmetric=True is for leave-one-out search (reference=None)")
    # the entries of each list its scores read: R_q for R-Precision and MAP@R, and the first
    # hit's position up to max(ks) (all k_top while first hits beyond the lists are counted)
    depth = None if counting else torch.clamp(rq.cpu(), min=k_recall, max=k_top)
    if leave_one_out and symmetric is not False:
        lists = _symmetric_lists(q, yq, k_top, k_recall if counting else None, chunk_size,
                                 require=bool(symmetric), depth=depth)
    if lists is not None:
        idx_all, count = lists
        block = min(n, chunk_size or auto_chunk_size(n_r, q.element_size()))
        for start in range(0, n, block):
            score(start, idx_all[start : start + block],
                  lambda todo, start=start: count[todo + start], depth)
    else:
        members = ClassMembers(yr, yq) if counting else None
        with blas_threads_like_torch(n * n_r * q.shape[1]):
            for start, sims in iter_similarity_blocks(
                q, r, exclude_self=leave_one_out, chunk_size=chunk_size
            ):
                _, idx = topk_stable(sims, k_top)
                score(start, idx, lambda todo, sims=sims, start=start:
                      members.first_relevant_position(sims[todo], todo + start))
    res = {f"recall@{kk}": (first_hit < kk).double().cpu().numpy() for kk in ks}
    if ranking:
        res["r_precision"] = rp.cpu().numpy()
        res["map@r"] = ap.cpu().numpy()
    res["r"] = rq.cpu().numpy()
    return res


def _symmetric_lists(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    cap: int | None,
    tile: int | None,
    *,
    require: bool,
    depth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Leave-one-out neighbour lists [n, k] (and first-hit counts when ``cap``) by the symmetric
    search, or None where it does not apply (or where its canary falls back to per-row blocks).
    ``depth``: the entries of each list that must be exact (:func:`symmetric_topk`).

    With ``cap`` (some K beyond the lists), each item's best same-class similarity is computed
    first (:func:`dmlnb.metrics.neighbors.best_relevant`), so that the search can count the items
    ranked before it; that costs about the sum over classes of size^2 products, so classes
    holding most of the data (over n^2 / 4 same-class pairs) keep the per-row search.
    """
    n = x.shape[0]
    ok = n >= 2 and symmetric_applicable(x, k, tile, forced=require)
    y = labels.numpy() if ok else None
    if ok and cap is not None:
        sizes = np.unique(y, return_counts=True)[1].astype(np.float64)
        ok = float((sizes**2).sum()) <= n * n / 4
    if not ok:
        if require:
            raise ValueError(
                "symmetric=True needs leave-one-out float32 embeddings on the CPU, more than one "
                f"tile (n={n}, tile={tile or 'default'}), neighbour lists within the memory "
                "budget and, with K beyond the lists, classes smaller than most of the data"
            )
        return None
    xs = x.numpy()
    first = None
    wanted = np.full(n, k, dtype=np.int64) if depth is None else depth.numpy()
    with blas_threads_like_torch(best_relevant_work(y) * x.shape[1]):
        floor = class_floor(xs, y, wanted)  # the lists' thresholds from their own classes
        if cap is not None:
            s_star, j_star, _ = best_relevant(xs, y)
            first = (s_star, j_star, cap)
    try:
        _, idx, count = symmetric_topk(xs, k, tile=tile, first_hit=first, floor=floor,
                                       depth=None if depth is None else wanted)
        if depth is not None:  # entries beyond a list's depth are never read: a valid index there
            idx = np.where(np.arange(k) < depth.numpy()[:, None], idx, idx[:, :1])
    except NotReproducibleError as e:
        if require:
            raise RuntimeError(f"symmetric search not reproducible with this BLAS: {e}") from e
        return None
    return torch.from_numpy(idx), (None if count is None else torch.from_numpy(count))
