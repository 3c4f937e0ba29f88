"""Exact, chunked k-nearest-neighbour search by cosine (or dot-product) similarity.

Queries are processed in blocks: one block's similarities to the whole reference set
(``chunk x n_reference``) are computed with one matrix product, and the k largest are kept. The
full ``n x n`` similarity matrix never exists, so memory is bounded by the block size.

Tie-breaking (the definition used everywhere in :mod:`dmlnb.metrics`)
---------------------------------------------------------------------
Neighbours are ordered by similarity, largest first; **on equal similarity the reference item with
the lower index ranks first**. This is exactly the order of a stable sort of the full similarity
row by descending similarity, so the chunked search and a brute-force sort agree item by item,
including for exact duplicate embeddings. (``torch.topk`` alone does not promise any order among
ties: rows whose k-th value is tied with items left outside the top k are re-selected exactly.)
Leave-one-out search excludes the query *by index* (its own similarity is set to ``-inf``), never
by dropping the first neighbour, which would be wrong for duplicates.

Note that equality is equality of the computed float values: two mathematically equal
similarities that the matrix product rounds differently are not a tie.

Speed
-----
Per block, the only passes over the ``chunk x n_reference`` similarities are the matrix product
and one ``torch.topk`` asking for ``k + 1`` candidates: a tie straddles the k-th boundary iff the
(k+1)-th largest value equals the k-th, so only such rows (rare outside adversarial inputs) are
re-selected exactly. On the CPU the product is numpy's ``matmul`` (its BLAS, OpenBLAS in the
numpy wheels, was about twice as fast as torch's MKL on the AMD CPU used for the benchmark), run
with as many BLAS threads as ``torch.get_num_threads()`` for large products, and the block buffer
is reused from block to block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dmlnb._validate import check_positive_int

# bytes that one block of query-vs-reference similarities may take (float32 matrix plus the same
# again for temporaries); 128 MiB keeps SOP (60,502 references) at ~270 queries a block.
from dmlnb.defaults import KNN_BLOCK_BYTES  # noqa: E402
from dmlnb.metrics._inputs import as_embeddings, l2_normalize


def auto_chunk_size(n_reference: int, itemsize: int = 4, budget: int = KNN_BLOCK_BYTES) -> int:
    """Queries per block so that a block of similarities (plus temporaries) fits in ``budget``."""
    return max(1, int(budget // (2 * max(1, n_reference) * itemsize)))


def topk_stable(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row, ordered by value (descending) then index (ascending).

    Equivalent to ``torch.sort(sims, descending=True, stable=True)[..., :k]`` without sorting
    whole rows: ``torch.topk`` picks ``k + 1`` candidates; the k-th boundary splits a run of equal
    values iff the (k+1)-th largest value equals the k-th, and only those rows are re-selected
    (the lowest indices among the tied values win). One pass over ``sims`` unless a row has such
    a tie; within the k kept, only rows holding equal values are re-ordered by index.
    """
    n = sims.shape[1]
    kk = min(k + 1, n)
    vals, idx = torch.topk(sims, kk, dim=1, largest=True, sorted=True)
    fix = torch.zeros(sims.shape[0], dtype=torch.bool, device=sims.device)
    if kk > k:
        bad = (vals[:, k - 1] == vals[:, k]).nonzero().flatten()
        vals, idx = vals[:, :k], idx[:, :k]
        if bad.numel() > 0:
            s = sims[bad]
            kb = vals[bad, k - 1 :]
            greater = s > kb
            tied = s == kb
            need = k - greater.sum(dim=1, keepdim=True)
            chosen = greater | (tied & (tied.cumsum(dim=1) <= need))
            cols = chosen.nonzero()[:, 1].reshape(len(bad), k)  # row-major: ascending index
            idx[bad] = cols
            vals[bad] = s.gather(1, cols)
            fix[bad] = True  # in index order now
    # topk's rows are in value order; the index order is undefined only within runs of equal
    # values, so only rows with such a run (or re-selected) are re-ordered: index ascending,
    # then a stable sort by value descending
    if k > 1:
        fix |= (vals[:, 1:] == vals[:, :-1]).any(dim=1)
    rows = fix.nonzero().flatten()
    if rows.numel() > 0:
        v, i = vals[rows], idx[rows]
        by_index = torch.argsort(i, dim=1)
        i, v = i.gather(1, by_index), v.gather(1, by_index)
        by_value = torch.sort(v, dim=1, descending=True, stable=True).indices
        vals[rows], idx[rows] = v.gather(1, by_value), i.gather(1, by_value)
    return vals, idx


# products smaller than this (multiply-adds) run without adjusting the BLAS thread count: the
# adjustment costs ~2 ms, and small products run on one thread anyway. DECISION (measured here).
_BLAS_LIMIT_MIN_WORK = 2**27


def blas_threads_like_torch(work: float) -> contextlib.AbstractContextManager:
    """Context that runs numpy's BLAS with ``torch.get_num_threads()`` threads (restored after).

    Used around the CPU matrix products of a k-NN search, so that ``torch.set_num_threads``
    keeps governing the whole search. A no-op for small products (``work`` = multiply-adds below
    ``_BLAS_LIMIT_MIN_WORK``) or without threadpoolctl (a scikit-learn dependency).
    """
    if work < _BLAS_LIMIT_MIN_WORK:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def _prepare(
    query: Any, reference: Any | None, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    q = as_embeddings("query", query)
    if reference is None:
        r, same = q, True
    else:
        r = as_embeddings("reference", reference, device=q.device)
        same = False
        if r.shape[1] != q.shape[1]:
            raise ValueError(
                f"query has dimension {q.shape[1]} but reference has dimension {r.shape[1]}"
            )
    if q.dtype != r.dtype:
        q, r = q.to(torch.float64), r.to(torch.float64)
    if normalize:
        q = l2_normalize(q)
        r = q if same else l2_normalize(r)
    return q, r, same


def iter_similarity_blocks(
    query: torch.Tensor,
    reference: torch.Tensor,
    *,
    exclude_self: bool,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, sims)``: similarities ``[block, n_reference]`` of one block of queries.

    ``query`` and ``reference`` must be 2-D tensors on one device with one dtype (no checks:
    use :func:`knn` for user input). With ``exclude_self``, ``sims[i, start + i] = -inf``.
    On the CPU, ``sims`` is a view of one buffer that the next block overwrites: copy what must
    outlive the iteration step.
    """
    n_q, n_r = query.shape[0], reference.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(n_r, query.element_size())
    chunk_size = min(chunk_size, n_q)
    on_cpu = query.device.type == "cpu"
    if on_cpu:
        ref_np = reference.numpy()
        buf = np.empty((chunk_size, n_r), dtype=ref_np.dtype)
        q_np = query.numpy()
    else:
        ref_t = reference.t()
    for start in range(0, n_q, chunk_size):
        stop = min(n_q, start + chunk_size)
        if on_cpu:
            out = buf[: stop - start]
            np.matmul(q_np[start:stop], ref_np.T, out=out)
            sims = torch.from_numpy(out)
        else:
            sims = query[start:stop] @ ref_t
        if exclude_self:
            rows = torch.arange(stop - start, device=sims.device)
            sims[rows, rows + start] = float("-inf")
        yield start, sims


def iter_knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    exclude_self: bool,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, sims, indices)`` block by block for already-prepared tensors.

    ``query`` and ``reference`` must be 2-D tensors on one device with one dtype (no checks:
    use :func:`knn` for user input). ``sims`` and ``indices`` have shape ``[block, k]``.
    """
    for start, sims in iter_similarity_blocks(
        query, reference, exclude_self=exclude_self, chunk_size=chunk_size
    ):
        vals, idx = topk_stable(sims, k)
        yield start, vals, idx


def knn(
    query: Any,
    reference: Any | None,
    k: int,
    *,
    exclude_self: bool | None = None,
    chunk_size: int | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query in ``reference`` by cosine similarity.

    Parameters
    ----------
    query : tensor or array, shape [n_query, dim]
        Query embeddings. The search runs on their device (CUDA when they are on CUDA).
    reference : tensor or array, shape [n_reference, dim], or None
        Items searched. ``None`` means the queries themselves (leave-one-out).
    k : int
        Neighbours per query, ``1 <= k <= n_reference`` (``n_reference - 1`` with ``exclude_self``).
    exclude_self : bool, optional
        Exclude query ``i`` from its own list by index (requires query ``i`` to be reference item
        ``i``). Default: True when ``reference`` is None, else False.
    chunk_size : int, optional
        Queries per block; default from a memory budget of :data:`KNN_BLOCK_BYTES`.
    normalize : bool, default True
        L2-normalise both sets first (cosine similarity); False uses raw dot products.

    Returns
    -------
    sims : tensor [n_query, k]
        Similarities, descending along each row.
    indices : tensor [n_query, k] (int64)
        Reference indices. On equal similarity the lower index ranks first (module docstring).
    """
    q, r, same = _prepare(query, reference, normalize)
    if exclude_self is None:
        exclude_self = same
    if exclude_self and q.shape[0] != r.shape[0]:
        raise ValueError(
            f"exclude_self=True needs query i to be reference item i, but query has {q.shape[0]} "
            f"rows and reference {r.shape[0]}"
        )
    check_positive_int("k", k)
    available = r.shape[0] - int(exclude_self)
    if k > available:
        raise ValueError(f"k={k} is larger than the {available} reference items available")
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    sims = torch.empty(q.shape[0], k, dtype=q.dtype, device=q.device)
    idx = torch.empty(q.shape[0], k, dtype=torch.int64, device=q.device)
    with blas_threads_like_torch(q.shape[0] * r.shape[0] * q.shape[1]):
        for start, v, i in iter_knn(q, r, k, exclude_self=exclude_self, chunk_size=chunk_size):
            sims[start : start + len(v)] = v
            idx[start : start + len(v)] = i
    return sims, idx
