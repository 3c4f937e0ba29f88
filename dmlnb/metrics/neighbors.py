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

Leave-one-out: each pair of tiles once (:func:`symmetric_topk`)
-------------------------------------------------------------
Among n items the similarity matrix is symmetric, so the leave-one-out search (``reference=None``)
splits the items into tiles (:func:`symmetric_tile_size`: one tile per worker plus temporaries
within :data:`KNN_BLOCK_BYTES`, as the per-row block is; 2,896 rows for 2 workers) and computes
each tile pair (I, J), I < J, once: its product feeds the lists of its rows (items of I,
candidates from J) and of its columns (items of J, candidates from I). A diagonal tile's upper
triangle (in slabs of 512 rows, each from its own first row on) feeds both; only for the lists'
very first tile is a diagonal tile computed whole. That is about n^2/2 + n * 512/2 products
instead of n^2. The results are those of the per-row search, bit for bit:

- Order. A candidate is the int64 key (similarity's float32 bits mapped to an order-preserving
  int32, index reversed): larger key = ranks first, keys of one list are distinct, so merging
  candidates from tiles that arrive in any order by key selects exactly the stable-sort top k
  (on equal similarity the lower index first; -0.0 and +0.0 tie, and -0.0 is restored).
- Values. Each similarity is one element of a float32 BLAS product. OpenBLAS's AVX-512
  (SkylakeX) float32 kernels compute an element as the same chain of fused multiply-adds
  whatever the product's shape and the element's place in it (and x.y as y.x), so a tile gives a
  pair the value a per-row block gives it. Its AVX2 (Haswell) kernels, which it uses on CPUs
  without AVX-512, do not: there a pair's last bits depend on where it falls in the product and
  on the number of threads, so even the per-row search's values depend on the block size
  (``benchmarks/measure_symmetric_work.py`` prints the share of cells that differ). Its
  float64 kernels do not either, so float64 (and CUDA, where the product is not the bottleneck)
  keep the per-row search. This is checked while searching: 16 probe rows are computed as a
  per-row block first and compared with every tile that holds them (and, when first hits are
  counted, each item's best same-class pair); a mismatch falls back to the per-row search
  (:class:`NotReproducibleError` where ``symmetric=True`` requires the symmetric search).
  Embeddings on a coarse lattice (:func:`exact_lattice`) have exact products in any order, so
  the search runs on such inputs whatever the BLAS (the tests and benchmarks use them).
- Filtering. Per tile, the product is computed in slabs of 512 rows (rows of I ordered by their
  list's threshold); while a slab is in cache, the max over each group of 8 rows is compared
  with the columns' thresholds and the groups' smallest row threshold, and only the cells that
  pass are read again, element by element. A threshold is a lower bound of its list's final
  k-th similarity (its current k-th; for a list's first tile, the k-th largest of maxima over
  disjoint sets of the tile's rows), so nothing that belongs to a list is filtered out. Where
  the caller reads only a list's first d entries (R-Precision and MAP@R read R_q of them), its
  d-th similarity is the threshold, and from the first tile on, the d-th largest similarity to
  the item's own class (:func:`class_floor`, less a rounding margin) bounds it from below: with
  trained embeddings class mates are near, so few candidates reach the lists' merges.
- Recall@K beyond the lists (:mod:`dmlnb.metrics.retrieval`): with each item's best same-class
  similarity s* and that item j* computed first (class-sorted blocks), the search counts the
  items ranked before j* (similarity above s*, or equal with a lower index), exactly up to the
  largest K.

Threads: ``torch.get_num_threads()`` workers take tiles in turn, each with a one-thread BLAS
(the first diagonal tile, which every tile of the first strip reads, goes first, alone); merges
into the lists are serialised. Extra memory: per worker one tile of similarities (32 MiB with 2
workers) plus its group maxima (4 MiB), and the lists (n x k int64 keys, at most
:data:`KNN_BLOCK_BYTES`; 5 MiB for SOP's k = 11).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dmlnb._validate import check_positive_int

# bytes that one block of query-vs-reference similarities may take (float32 matrix plus the same
# again for temporaries); 128 MiB keeps SOP (60,502 references) at ~270 queries a block.
from dmlnb.defaults import KNN_BLOCK_BYTES  # noqa: E402
from dmlnb.metrics._inputs import as_embeddings, l2_normalize


def exact_lattice(x: np.ndarray, step: int = 64) -> np.ndarray:
    """``x`` rounded to multiples of ``1 / step`` in ``[-127 / step, 127 / step]`` (float32).

    With ``step`` a power of two, every product of two entries is a multiple of ``step**-2`` and
    every partial sum of a dot product of two rows is an integer multiple of it below
    ``d * 127**2 < 2**24`` in magnitude, so exactly representable: the dot products are exact in
    float32 whatever the summation order, blocking or BLAS kernel. Refuses ``d >= 1041``. Not
    to be L2-normalised afterwards (that leaves the lattice). Used to check and time the
    symmetric search on BLAS builds that round a pair by the product's shape.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] * 127**2 >= 2**24:
        raise ValueError(f"exact_lattice needs a 2-D array of at most 1,040 columns; got shape {x.shape}")
    if step < 1 or step & (step - 1):
        raise ValueError(f"step must be a power of two; got {step}")
    return (np.clip(np.round(x * step), -127, 127) / step).astype(np.float32)


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


# ----------------------------------------------------------------------------- symmetric search
#
# Leave-one-out search among n items: the similarity matrix is symmetric, so each pair of tiles
# (I, J), I <= J, is computed once and feeds the lists of its rows (items of I) and of its
# columns (items of J). Every list receives the candidates of each tile once and is merged by an
# exact total order (see _sortable), so the arrival order of the tiles does not matter.

# rows per group of the prefilter: one max over each group of rows of a tile finds the
# (group, column) cells that can hold a candidate for the column's list or for a row of the
# group; only those cells are read again. DECISION (measured on the SOP-sized benchmark).
SYMMETRIC_GROUP = 8
# rows of the tiles computed up front to check that the BLAS gives each pair the value the
# per-row search gives it (a canary, see NotReproducibleError)
_PROBE_ROWS = 16
# rows of one slab of a tile's product (reduced to group maxima while in cache) and bands of
# groups per comparison. DECISION (measured on the SOP-sized benchmark).
_SLAB_ROWS = 512
_BAND_GROUPS = 16
# smallest tile the default (automatic) choice uses
_MIN_TILE = 256
# class-sorted rows per block when the best same-class similarity is computed up front
_BAND_ROWS = 512
_INT64_MIN = np.iinfo(np.int64).min
_LOW_MASK = np.int64(0xFFFFFFFF)
_INDEX_TOP = np.int64(2**31 - 1)


class NotReproducibleError(RuntimeError):
    """The BLAS gave a pair a different value in a tile than in a per-row block."""


def symmetric_tile_size(
    itemsize: int = 4, budget: int | None = None, workers: int | None = None
) -> int:
    """Rows (= columns) of one tile of the symmetric search: one tile per worker (default
    ``torch.get_num_threads()``) plus temporaries within ``budget`` (default
    :data:`KNN_BLOCK_BYTES`), like the per-row search's block: 2,896 for float32 and 2 workers
    (4,096 for one)."""
    budget = KNN_BLOCK_BYTES if budget is None else budget
    workers = max(1, torch.get_num_threads() if workers is None else workers)
    return max(1, int(math.isqrt(budget // (2 * itemsize * workers))))


def _tile_bounds(n: int, tile: int) -> np.ndarray:
    """Boundaries of ceil(n / tile) tiles of near-equal size (they differ by at most one row)."""
    t = -(-n // max(1, tile))
    return np.array([i * n // t for i in range(t + 1)], dtype=np.int64)


def slab_bounds(groups: int, group: int) -> np.ndarray:
    """Boundaries, in groups, of the slabs of rows in which a tile of ``groups`` groups of
    ``group`` rows is multiplied: whole groups, about ``_SLAB_ROWS`` rows each, none tiny (so
    that each is a full BLAS product)."""
    ns = max(1, round(groups * group / _SLAB_ROWS))
    return np.array([i * groups // ns for i in range(ns + 1)], dtype=np.int64)


def symmetric_applicable(
    x: torch.Tensor, k: int, tile: int | None = None, *, forced: bool = False
) -> bool:
    """Whether :func:`symmetric_topk` serves a leave-one-out search of ``x`` (else: per-row blocks).

    CPU float32 (OpenBLAS's float32 product gives each pair one value whatever the tile shape,
    checked at run time by canaries; its float64 product does not, and on CUDA the product is
    not the bottleneck), at least two tiles, neighbour lists (n x k int64 keys) within the block
    memory budget, and, unless ``forced``, tiles of at least ``_MIN_TILE`` rows (smaller ones
    cost more in per-tile overhead than they save).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    n = x.shape[0]
    tile = symmetric_tile_size() if tile is None else tile
    if not forced and tile < _MIN_TILE:
        return False
    return n > tile and n * k * 8 <= KNN_BLOCK_BYTES and k < n


def _sortable(vals: np.ndarray, index: np.ndarray) -> np.ndarray:
    """int64 keys whose order is the neighbour order: larger similarity, then lower index, first.

    High 32 bits: the float32 bits mapped to an int32 of the same order (-0.0 as +0.0, since
    they compare equal); low 32 bits: the index, reversed, and a flag restoring -0.0 when decoded.
    Keys of one list are distinct (distinct indices), so any selection by key is exact.
    """
    b = np.ascontiguousarray(vals, dtype=np.float32).view(np.int32)
    neg0 = b == np.int32(-(2**31))
    b = np.where(neg0, np.int32(0), b)
    b = np.where(b < 0, b ^ np.int32(0x7FFFFFFF), b).astype(np.int64)
    return (b << 32) | ((_INDEX_TOP - index.astype(np.int64)) << 1) | neg0


def _unsortable(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarities (float32, bit for bit) and indices of ``_sortable`` keys."""
    hi = (keys >> 32).astype(np.int32)
    low = keys & _LOW_MASK
    b = np.where(hi < 0, hi ^ np.int32(0x7FFFFFFF), hi)
    b = np.where((low & 1).astype(bool), np.int32(-(2**31)), b)
    return b.view(np.float32), _INDEX_TOP - (low >> 1)


def _class_bands(x: np.ndarray, labels: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The similarities of every item to the other items of its class, in bands.

    Items sorted by class (stable, so by index within a class); blocks of ``_BAND_ROWS`` of them
    times the items of their classes, each a BLAS product of the per-row search's kind. Yields
    ``(rows, cols, prod)``: the band's items and the items of its classes (indices into ``x``, in
    class order) and their similarities, ``-inf`` outside a row's class and on the row itself.
    """
    order = np.argsort(labels, kind="stable")
    ys = labels[order]
    _, first, counts = np.unique(ys, return_index=True, return_counts=True)
    cls = np.repeat(np.arange(len(first)), counts)
    cs, ce = first[cls], first[cls] + counts[cls]
    bounds = _tile_bounds(len(labels), _BAND_ROWS)
    for p0, p1 in zip(bounds[:-1], bounds[1:], strict=True):
        lo, hi = cs[p0], ce[p1 - 1]
        prod = np.matmul(x[order[p0:p1]], x[order[lo:hi]].T)  # copies: never numpy's syrk
        col = np.arange(lo, hi)
        rows = np.arange(p0, p1)[:, None]
        member = (col >= cs[p0:p1, None]) & (col < ce[p0:p1, None]) & (col != rows)
        prod[~member] = -np.inf
        yield order[p0:p1], order[lo:hi], prod


def best_relevant(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Each item's largest similarity to another item of its class, and that item's index.

    Computed in class bands (:func:`_class_bands`). Returns ``s_star`` (float32, -inf for a lone
    item), ``j_star`` (int64, the lowest index among equal maxima; n for a lone item) and the
    work done, in multiply-adds per dimension.
    """
    n = x.shape[0]
    s_star = np.full(n, -np.inf, dtype=np.float32)
    j_star = np.full(n, n, dtype=np.int64)
    work = 0.0
    for rows, cols, prod in _class_bands(x, labels):
        work += float(prod.size)
        at = prod.argmax(axis=1)  # first maximum: the lowest index (ascending within a class)
        best = prod[np.arange(len(rows)), at]
        s_star[rows] = best
        j_star[rows] = np.where(best > -np.inf, cols[at], n)
    return s_star, j_star, work


#: classes larger than this get no floor from :func:`class_floor` (its products grow as size^2)
FLOOR_MAX_CLASS = 64


def class_floor(x: np.ndarray, labels: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """A lower bound of each item's ``depth``-th largest similarity to the other items, from its
    own class: the ``depth[i]``-th largest similarity of item i to its class mates (its list's
    first ``depth[i]`` entries can be no less similar), less the largest difference between two
    float32 computations of a dot product, ``2 gamma_d |x_i| max_j |x_j|`` with
    ``gamma_d = d u / (1 - d u)``, ``u = 2^-24`` (Higham, Accuracy and Stability of Numerical
    Algorithms, 2002, eq. 3.5), so that it bounds the search's own values whatever product
    computed them. ``-inf`` where the class has fewer than ``depth[i]`` other items or more than
    :data:`FLOOR_MAX_CLASS` items. For :func:`symmetric_topk`'s ``floor``: with trained
    embeddings class mates are among the nearest items, so the lists start near their final
    thresholds and fewer candidates reach them.
    """
    n, d = x.shape
    floor = np.full(n, -np.inf, dtype=np.float64)
    order = np.argsort(labels, kind="stable")
    _, first, counts = np.unique(labels[order], return_index=True, return_counts=True)
    for size in np.unique(counts):
        if size < 2 or size > FLOOR_MAX_CLASS:
            continue
        starts = first[counts == size]
        items = order[starts[:, None] + np.arange(size)]  # [classes, size]
        v = x[items]
        sims = np.matmul(v, v.transpose(0, 2, 1))  # [classes, size, size]
        sims[:, np.arange(size), np.arange(size)] = -np.inf
        ranked = -np.sort(-sims, axis=2)  # each item's class mates, most similar first
        dep = depth[items]
        ok = dep <= size - 1
        pick = np.take_along_axis(ranked, np.minimum(dep, size - 1)[..., None] - 1, axis=2)[..., 0]
        floor[items[ok]] = pick[ok]
    u = 2.0**-24
    gamma = d * u / (1 - d * u)
    x64 = x.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))  # (np.linalg.norm: slow on its first call)
    floor -= 2 * gamma * norms * (norms.max() if n else 0.0)
    out = floor.astype(np.float32)
    return np.nextafter(out, np.float32(-np.inf), where=np.isfinite(out), out=out)


def best_relevant_work(labels: np.ndarray) -> float:
    """Multiply-adds per dimension that :func:`best_relevant` would do (for choosing a path)."""
    ys = np.sort(labels, kind="stable")
    _, first, counts = np.unique(ys, return_index=True, return_counts=True)
    cls = np.repeat(np.arange(len(first)), counts)
    cs, ce = first[cls], first[cls] + counts[cls]
    bounds = _tile_bounds(len(ys), _BAND_ROWS)
    return float(sum((p1 - p0) * (ce[p1 - 1] - cs[p0]) for p0, p1 in zip(bounds[:-1], bounds[1:], strict=True)))


class _Lists:
    """The k best keys of every item's list (descending), their k-th value, first-hit counts."""

    def __init__(self, n: int, k: int, first_hit: tuple[np.ndarray, np.ndarray, int] | None,
                 depth: np.ndarray | None = None, floor: np.ndarray | None = None):
        self.k = k
        # the position in each list whose key is its threshold: k - 1, or depth - 1
        self.last = None if depth is None else depth.astype(np.int64) - 1
        self.keys = np.full((n, k), _INT64_MIN, dtype=np.int64)
        self.kth_key = np.full(n, _INT64_MIN, dtype=np.int64)
        self.kth_val = np.full(n, -np.inf, dtype=np.float32)
        self.counting = first_hit is not None
        if self.counting:
            self.s_star, self.j_star, self.cap = first_hit
            self.active = self.s_star > -np.inf
            self.count = np.zeros(n, dtype=np.int64)
        # a lower bound of each list's final threshold known before any tile (class_floor)
        self.floor = np.full(n, -np.inf, dtype=np.float32) if floor is None else floor
        # threshold: a candidate below it can neither enter the list nor precede the first
        # relevant item (while that is still being counted)
        self.thr = self.bound(self.kth_val, slice(0, n))
        # lists that have taken a tile's candidates (the others need a bound from their first tile)
        self.seen = np.zeros(n, dtype=bool)

    def bound(self, kth: np.ndarray, at) -> np.ndarray:
        """The threshold of lists ``at`` whose k-th (or depth-th) similarity is at least ``kth``."""
        cut = np.maximum(kth, self.floor[at])
        if self.counting:
            cut = np.where(self.active[at], np.minimum(cut, self.s_star[at]), cut)
        return cut

    def refresh(self, lo: int, hi: int) -> None:
        if self.counting:
            self.active[lo:hi] &= self.count[lo:hi] < self.cap
        self.thr[lo:hi] = self.bound(self.kth_val[lo:hi], slice(lo, hi))
        self.seen[lo:hi] = True

    def take(self, owner: np.ndarray, other: np.ndarray, v: np.ndarray, lo: int, hi: int) -> None:
        """Offer candidates (list ``owner``, item ``other``, similarity ``v``); owners in [lo, hi)."""
        if self.counting:
            act = self.active[owner]
            if act.any():
                s = self.s_star[owner]
                before = act & ((v > s) | ((v == s) & (other < self.j_star[owner])))
                if before.any():
                    self.count[lo:hi] += np.bincount(owner[before] - lo, minlength=hi - lo)
            keep = v >= self.kth_val[owner]  # the others were only counted
            owner, other, v = owner[keep], other[keep], v[keep]
        keys = _sortable(v, other)
        keep = keys > self.kth_key[owner]  # thresholds read before the last merge may be stale
        if not keep.all():
            owner, keys = owner[keep], keys[keep]
        if len(owner) == 0:
            return
        # group by owner (any order within an owner: the merge sorts); uint16: radix sort
        loc = owner - lo
        order = np.argsort(loc.astype(np.uint16) if hi - lo <= 2**16 else loc, kind="stable")
        loc, keys = loc[order], keys[order]
        counts = np.bincount(loc, minlength=hi - lo)
        rank = np.arange(len(loc)) - (np.cumsum(counts) - counts)[loc]
        k = self.k
        width = k + int(counts.max())
        rows = np.flatnonzero(counts)
        if 2 * len(rows) >= hi - lo:  # most lists change: work on the whole range
            merged = np.full((hi - lo, width), _INT64_MIN, dtype=np.int64)
            merged[:, :k] = self.keys[lo:hi]
            merged[loc, k + rank] = keys
            merged.sort(axis=1)
            at = slice(lo, hi)
        else:
            slot = np.cumsum(counts > 0) - 1
            merged = np.full((len(rows), width), _INT64_MIN, dtype=np.int64)
            merged[:, :k] = self.keys[lo + rows]
            merged[slot[loc], k + rank] = keys
            merged.sort(axis=1)
            at = lo + rows
        best = merged[:, : -k - 1 : -1]
        self.keys[at] = best
        kth = best[:, -1] if self.last is None else best[np.arange(len(best)), self.last[at]]
        self.kth_key[at] = kth
        self.kth_val[at] = np.where(kth == _INT64_MIN, np.float32(-np.inf), _unsortable(kth)[0])


def symmetric_topk(
    x: np.ndarray,
    k: int,
    *,
    tile: int | None = None,
    first_hit: tuple[np.ndarray, np.ndarray, int] | None = None,
    depth: np.ndarray | None = None,
    floor: np.ndarray | None = None,
    group: int | None = None,
    workers: int | None = None,
    _order: list[tuple[int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Leave-one-out k nearest neighbours of the rows of ``x`` (float32 [n, d]), each tile pair once.

    Returns ``(sims [n, k] float32, indices [n, k] int64, count)``: the same lists as a stable
    sort of every similarity row (query excluded by index), values bit for bit those of the
    per-row search. With ``first_hit = (s_star, j_star, cap)`` (from :func:`best_relevant`),
    ``count[i]`` is the number of items ranked before item ``j_star[i]`` in row i (similarity
    above ``s_star[i]``, or equal with a lower index), exact below ``cap`` (at least ``cap``
    otherwise); else ``count`` is None. With ``depth`` (int [n], each in 1..k), only the first
    ``depth[i]`` entries of list i are exact (the rest hold similar items, not necessarily the
    right ones): a list whose metrics read fewer than k entries (R-Precision and MAP@R read R_i)
    keeps a higher threshold, and fewer candidates reach it. ``floor`` (float32 [n]): a lower
    bound of each list's final k-th (or ``depth``-th) similarity known beforehand
    (:func:`class_floor`), the lists' thresholds from the first tile on. Raises :class:`NotReproducibleError`
    if the BLAS gave a checked pair another value than a per-row block does (the caller then
    searches per row).

    Per tile pair (I, J): the product ``[|I|, |J|]`` (rows of I ordered by their threshold) in
    slabs of rows; while a slab is in cache, the max over each group of ``group`` rows, a
    comparison of these maxima with the columns' and the groups' thresholds, and a gather of the
    few cells that pass; candidates at or above their list's threshold are merged by key.
    Thresholds are lower bounds of each list's final k-th similarity (or of the first relevant
    similarity while that is counted), so nothing that belongs to a list is filtered out, in
    whatever order the tiles are processed. ``workers`` threads (default
    ``torch.get_num_threads()``) process tiles concurrently, each with a one-thread BLAS; merges
    into the lists are serialised.
    """
    n = x.shape[0]
    g = SYMMETRIC_GROUP if group is None else group
    if tile is None:
        tile = symmetric_tile_size(x.itemsize, workers=workers)
    bounds = _tile_bounds(n, tile)
    t = len(bounds) - 1
    pairs = [(i, j) for i in range(t) for j in range(i, t)]
    if _order is not None:  # tests: any order gives the same lists
        if sorted(_order) != pairs:
            raise ValueError("_order must list every tile pair (i, j), i <= j, once")
        pairs = list(_order)
    nw = max(1, min(torch.get_num_threads() if workers is None else workers, len(pairs)))
    size = int(np.diff(bounds).max())
    if depth is not None:
        depth = np.asarray(depth)
        if depth.shape != (n,) or depth.dtype.kind not in "iu" or n and (depth.min() < 1 or depth.max() > k):
            raise ValueError(f"depth must hold {n} integers in 1..k={k}")
    if floor is not None:
        floor = np.asarray(floor)
        if floor.shape != (n,) or floor.dtype != np.float32:
            raise ValueError(f"floor must be float32 of shape ({n},)")
    lists = _Lists(n, k, first_hit, depth, floor)
    probe = np.unique(np.linspace(0, n - 1, min(n, _PROBE_ROWS)).astype(np.int64))
    with blas_threads_like_torch(len(probe) * n * x.shape[1]):
        probe_sims = np.matmul(x[probe], x.T)  # a per-row block: what the per-row search computes
    # the slabs of each tile height (in groups)
    slabs = {ng: slab_bounds(ng, g) for ng in {-(-int(h) // g) for h in np.diff(bounds)}}
    strips: dict[int, tuple] = {}
    left = {i: 0 for i in range(t)}  # tiles of each strip not done yet (its cache is then freed)
    for i, _ in pairs:
        left[i] += 1
    lock = threading.Lock()
    feed = iter(pairs)
    failed: list[BaseException] = []

    def strip(i_t: int) -> tuple:
        with lock:
            if i_t not in strips:
                a0, a1 = int(bounds[i_t]), int(bounds[i_t + 1])
                bi = a1 - a0
                ng = -(-bi // g)
                perm = a0 + np.argsort(lists.thr[a0:a1], kind="stable")  # like thresholds grouped
                perm_pad = np.full(ng * g, -1, dtype=np.int64)
                perm_pad[:bi] = perm
                inv = np.empty(bi, dtype=np.int64)
                inv[perm - a0] = np.arange(bi)
                strips[i_t] = (a0, a1, bi, ng, perm, perm_pad, inv, x[perm])
            return strips[i_t]

    def _buffers() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.empty(-(-size // g) * g * size, dtype=np.float32),
                np.empty(-(-size // g) * size, dtype=np.float32),
                np.empty(-(-size // g) * size, dtype=bool))

    def work() -> None:
        buf, mc_buf, cand_buf = _buffers()
        while not failed:
            with lock:
                pair = next(feed, None)
            if pair is None:
                return
            try:
                _tile(*pair, buf, mc_buf, cand_buf)
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller
                failed.append(e)
                return
            done(pair[0])

    def done(i_t: int) -> None:
        with lock:
            left[i_t] -= 1
            if left[i_t] == 0:
                strips.pop(i_t, None)

    def _tile(i_t: int, j_t: int, buf: np.ndarray, mc_buf: np.ndarray, cand_buf: np.ndarray):
        a0, a1, bi, ng, perm, perm_pad, inv, xi = strip(i_t)
        c0, c1 = int(bounds[j_t]), int(bounds[j_t + 1])
        bj = c1 - c0
        s = buf[: ng * g * bj].reshape(ng * g, bj)
        s3 = s.reshape(ng, g, bj)
        mc = mc_buf[: ng * bj].reshape(ng, bj)
        cand = cand_buf[: ng * bj].reshape(ng, bj)
        f_col = lists.thr[c0:c1].copy()
        # lists that have not taken a tile yet (their threshold: at most their class floor)
        empty = np.flatnonzero(~lists.seen[c0:c1])
        # rows whose list is still empty (only while the tile that fills them is in flight)
        empty_rows = (np.flatnonzero(~lists.seen[perm]) if i_t != j_t else empty[:0])
        # a list's first tile (empty...): its threshold comes from the whole tile, so the tile is
        # reduced first and searched after; otherwise each slab is searched while in cache
        fused = len(empty) == 0 and len(empty_rows) == 0
        # a diagonal tile: its upper triangle feeds both sides (rows in index order, each slab
        # from its first row's column on), or, for lists' first tile, the whole tile feeds the
        # columns' lists
        tri = i_t == j_t and fused
        diag = i_t == j_t and not tri
        if tri:
            perm = np.arange(a0, a1)
            perm_pad = np.full(ng * g, -1, dtype=np.int64)
            perm_pad[:bi] = perm
            inv, xi = perm - a0, x[a0:a1]
        perm2 = perm_pad.reshape(ng, g)
        if not diag:
            f_row2 = np.full(ng * g, np.inf, dtype=np.float32)
            f_row2[:bi] = lists.thr[perm]
            f_row2 = f_row2.reshape(ng, g)
            f_grp = f_row2.min(axis=1)
        found_col: list[tuple] = []
        found_row: list[tuple] = []

        def collect(q0: int, q1: int) -> None:
            """Candidates of groups q0..q1 (their maxima in mc, their rows in s)."""
            if diag:
                np.greater_equal(mc[q0:q1], f_col, out=cand[q0:q1])
            else:  # bands of groups (rows ordered by threshold): one comparison per cell
                for b0 in range(q0, q1, _BAND_GROUPS):
                    b1 = min(q1, b0 + _BAND_GROUPS)
                    np.greater_equal(mc[b0:b1], np.minimum(f_col, f_grp[b0:b1].min()),
                                     out=cand[b0:b1])
            flat = np.flatnonzero(cand[q0:q1])
            if len(flat) == 0:
                return
            cg, col = np.divmod(flat, bj)
            cg += q0
            v = s3[cg, :, col]  # [cells, g]: the cells' similarities
            other = perm2[cg]  # their rows' items (-1: padding)
            if diag:
                u, w = np.nonzero((v >= f_col[col][:, None]) & (other >= 0)
                                  & (other != (c0 + col)[:, None]))
                found_col.append((c0 + col[u], other[u, w], v[u, w]))
                return
            # padding rows hold -inf: excluded by index for the columns (an empty list's
            # threshold can be -inf), by their +inf threshold for the rows
            in_col = v >= f_col[col][:, None]
            in_row = v >= f_row2[cg]
            u, w = np.nonzero(in_col | in_row)
            c, o, vv = c0 + col[u], other[u, w], v[u, w]
            sel = in_col[u, w] & (o >= 0)
            found_col.append((c[sel], o[sel], vv[sel]))
            sel = in_row[u, w]
            found_row.append((o[sel], c[sel], vv[sel]))

        xj_t = x[c0:c1].T
        for q0, q1 in zip(slabs[ng][:-1], slabs[ng][1:], strict=True):
            r0, r1 = q0 * g, q1 * g
            m1 = min(r1, bi)
            if tri:
                np.matmul(xi[r0:m1], xj_t[:, r0:], out=s[r0:m1, r0:])
                if r1 > bi:
                    s[bi:r1, r0:] = -np.inf  # padding of the last group
                block = s[r0:m1, r0:r1]
                block[np.tri(*block.shape, dtype=bool)] = -np.inf  # self and the lower half
                mc[q0:q1, :r0] = -np.inf
                np.max(s3[q0:q1, :, r0:], axis=1, out=mc[q0:q1, r0:])
                collect(q0, q1)
                continue
            np.matmul(xi[r0:m1], xj_t, out=s[r0:m1])
            if r1 > bi:
                s[bi:r1] = -np.inf  # padding of the last group
            if diag:
                rr = np.arange(r0, m1)
                s[rr, perm[rr] - a0] = -np.inf  # the query itself, by index
            np.max(s3[q0:q1], axis=1, out=mc[q0:q1])
            if fused:
                collect(q0, q1)
        # canaries: the probe rows and each list's best relevant pair, as computed per row
        for p in probe[(probe >= a0) & (probe < a1)]:
            want = probe_sims[np.searchsorted(probe, p)]
            if tri:
                same = np.array_equal(s[p - a0, p - a0 + 1 :], want[p + 1 : c1]) and (
                    np.array_equal(s[: p - a0, p - a0], want[a0:p]))
            else:
                want = want[c0:c1].copy()
                if diag:
                    want[p - c0] = -np.inf
                same = np.array_equal(s[inv[p - a0]], want)
            if not same:
                raise NotReproducibleError(f"item {p}: tile and per-row products differ")
        if not diag and not tri:
            for p in probe[(probe >= c0) & (probe < c1)]:
                if not np.array_equal(s[:bi, p - c0], probe_sims[np.searchsorted(probe, p), perm]):
                    raise NotReproducibleError(f"item {p}: tile and per-row products differ")
        if lists.counting:
            js = lists.j_star[perm]
            r = np.flatnonzero((js >= c0) & (js < c1))
            if tri:  # the pair's value sits in the upper triangle
                lo, hi = np.minimum(r, js[r] - c0), np.maximum(r, js[r] - c0)
                if not np.array_equal(s[lo, hi], lists.s_star[perm[r]]):
                    raise NotReproducibleError("a best same-class similarity differs in a tile")
            elif not np.array_equal(s[r, js[r] - c0], lists.s_star[perm[r]]):
                raise NotReproducibleError("a best same-class similarity differs in a tile")
            if not diag and not tri:
                js = lists.j_star[c0:c1]
                r = np.flatnonzero((js >= a0) & (js < a1))
                if not np.array_equal(s[inv[js[r] - a0], r], lists.s_star[c0 + r]):
                    raise NotReproducibleError("a best same-class similarity differs in a tile")
        if not fused:
            # the k-th largest of maxima over disjoint sets of rows bounds the k-th best of the
            # column from below
            m = min(ng, 4 * k)
            if m >= k:
                q = ng // m
                sup = np.max(mc[: q * m].reshape(m, q, bj), axis=1)
                bound = np.partition(sup.T[empty], m - k, axis=1)[:, m - k]
                f_col[empty] = lists.bound(np.maximum(lists.kth_val[c0 + empty], bound), c0 + empty)
            if len(empty_rows) and bj >= k:  # such a row's k-th best in this tile
                bound = np.partition(s[empty_rows], bj - k, axis=1)[:, bj - k]
                at = perm[empty_rows]
                f_row2.reshape(-1)[empty_rows] = lists.bound(np.maximum(lists.kth_val[at], bound), at)
                f_grp = f_row2.min(axis=1)
            collect(0, ng)
        with lock:
            if found_col:
                lists.take(*(np.concatenate(a) for a in zip(*found_col, strict=True)), c0, c1)
                lists.refresh(c0, c1)
            if found_row:
                lists.take(*(np.concatenate(a) for a in zip(*found_row, strict=True)), a0, a1)
                lists.refresh(a0, a1)

    if nw == 1:
        with blas_threads_like_torch(float(n) * n * x.shape[1]):
            work()
    else:
        # the first diagonal tile fills block 0's lists, which all of strip 0 reads: alone first
        first = next(feed)
        with blas_threads_like_torch(float(size) * size * x.shape[1]):
            _tile(*first, *_buffers())
        done(first[0])
        with _blas_threads(1):
            threads = [threading.Thread(target=work, daemon=True) for _ in range(nw)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    if failed:
        raise failed[0]
    sims, idx = _unsortable(lists.keys)
    return sims, idx, (lists.count if lists.counting else None)


def _blas_threads(limit: int) -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


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
    symmetric: bool | None = None,
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
        Queries per block; default from a memory budget of :data:`KNN_BLOCK_BYTES`. In the
        symmetric leave-one-out search: rows (and columns) per tile.
    normalize : bool, default True
        L2-normalise both sets first (cosine similarity); False uses raw dot products.
    symmetric : bool, optional
        Leave-one-out (``reference=None``) only: compute each pair of tiles of the similarity
        matrix once (:func:`symmetric_topk`, same results). None (default): when it applies
        (:func:`symmetric_applicable`), falling back to per-row blocks if the BLAS is caught
        giving a pair another value in a tile than in a row block; True: require it
        (ValueError if it does not apply, RuntimeError instead of the fallback); False: per-row
        blocks.

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
    if symmetric and not (same and exclude_self):
        raise ValueError("symmetric=True is for leave-one-out search (reference=None)")
    if same and exclude_self and symmetric is not False:
        if symmetric_applicable(q, k, chunk_size, forced=bool(symmetric)):
            try:
                s, i, _ = symmetric_topk(q.numpy(), k, tile=chunk_size)
                return torch.from_numpy(s), torch.from_numpy(i)
            except NotReproducibleError as e:
                if symmetric:
                    raise RuntimeError(f"symmetric search not reproducible here: {e}") from e
        elif symmetric:
            raise ValueError(
                "symmetric=True needs float32 embeddings on the CPU, more than one tile "
                f"(n={q.shape[0]}, tile={chunk_size or 'default'}) and n x k lists within "
                "the memory budget"
            )
    sims = torch.empty(q.shape[0], k, dtype=q.dtype, device=q.device)
    idx = torch.empty(q.shape[0], k, dtype=torch.int64, device=q.device)
    with blas_threads_like_torch(q.shape[0] * r.shape[0] * q.shape[1]):
        for start, v, i in iter_knn(q, r, k, exclude_self=exclude_self, chunk_size=chunk_size):
            sims[start : start + len(v)] = v
            idx[start : start + len(v)] = i
    return sims, idx
