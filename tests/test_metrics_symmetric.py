"""The symmetric leave-one-out search (each tile pair once) against per-row blocks and brute force.

Exactness is checked bit for bit: neighbour indices, similarities (as float32 bit patterns) and
every per-query score (Recall@K, R-Precision, MAP@R as float64 arrays). Integer-valued
embeddings make every dot product exact, whatever the BLAS kernel, so ties and duplicates are
real ties; dyadic embeddings (Gaussian, rounded to multiples of 1/64) are exact too, with few
ties, so they check the search's logic on any machine. Gaussian float embeddings check that
tiles reproduce the per-row block values; they run only where the BLAS rounds a pair alike in
products of every shape (some kernels do not: OpenBLAS's AVX2 kernels, for one, round by the
position of the pair in the product and by the thread count; there the automatic search falls
back to per-row blocks, checked by the tests that run everywhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dmlnb.metrics.neighbors as nb
from dmlnb.metrics import evaluate, knn, retrieval_scores
from dmlnb.metrics.neighbors import (
    _sortable,
    _unsortable,
    best_relevant,
    symmetric_topk,
)

# ----------------------------------------------------------------------------- inputs


def gaussian(n, dim, n_classes, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = rng.standard_normal((n_classes, dim))[y] + spread * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


def dyadic(n, dim, n_classes, seed, spread=1.0):
    """Gaussian embeddings (unit rows) on the lattice of multiples of 1/64
    (:func:`dmlnb.metrics.neighbors.exact_lattice`): exact products in any order, few ties."""
    x, y = gaussian(n, dim, n_classes, seed, spread)
    return nb.exact_lattice(x, 64), y


def _blas_rounds_pairs_alike() -> bool:
    """Does this machine's BLAS give each pair one float32 value in products of every shape
    (slabs, tiles, transposed, per-row blocks of all items, one or several threads)?"""
    x = gaussian(1300, 32, 200, seed=99)[0]
    with nb._blas_threads(1):
        full = np.matmul(x, x.T.copy())
    for a0, a1, b0, b1 in ((0, 256, 0, 1300), (300, 600, 0, 1300), (0, 256, 256, 512),
                           (100, 433, 433, 766), (0, 400, 800, 1200), (1000, 1300, 0, 1300)):
        if not (np.array_equal(np.matmul(x[a0:a1], x[b0:b1].T), full[a0:a1, b0:b1])
                and np.array_equal(np.matmul(x[b0:b1], x[a0:a1].T).T, full[a0:a1, b0:b1])):
            return False
    with nb._blas_threads(2):
        return bool(np.array_equal(np.matmul(x, x.T.copy()), full))


ALIKE = _blas_rounds_pairs_alike()
needs_alike = pytest.mark.skipif(
    not ALIKE, reason="this BLAS rounds a pair by the product's shape: float tiles cannot "
    "reproduce per-row blocks (the automatic search falls back; dyadic cases test the logic)")
FLOAT = pytest.param("gaussian", marks=needs_alike)


def float_data(kind, n, dim, n_classes, seed):
    """(x, y, normalize): Gaussian unit rows, or their dyadic rounding (exact products)."""
    if kind == "gaussian":
        return (*gaussian(n, dim, n_classes, seed), True)
    return (*dyadic(n, dim, n_classes, seed), False)


def ties(n, dim, n_classes, seed, n_dup=60):
    """Entries in {-1, 0, 1}: exact dot products, many equal similarities, exact duplicates
    (some with another label), and zero rows (similarity +-0 to everything)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    dup = rng.integers(0, n, n_dup)
    x = np.concatenate([x, x[dup], np.zeros((3, dim), np.float32)])
    y = np.concatenate([y, np.where(np.arange(n_dup) % 2 == 0, y[dup], rng.integers(0, n_classes, n_dup)),
                        [0, 1, 1]])
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def sizes_1_2_and_large(seed):
    """Classes of 1 and 2 items, one of 70, the rest 3-9; labels sorted (contiguous classes),
    so tile boundaries cut classes."""
    rng = np.random.default_rng(seed)
    counts = [1] * 9 + [2] * 15 + [70] + list(rng.integers(3, 10, 60))
    y = np.repeat(np.arange(len(counts)), counts)
    x = rng.standard_normal((len(counts), 12))[y] + 1.2 * rng.standard_normal((len(y), 12))
    return x.astype(np.float32), y


def brute_force(x, k):
    """Stable sort of each full similarity row (self at -inf), by descending similarity."""
    s = np.matmul(x, x.T.copy())  # one large product (per-row search's kind of values)
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def bits(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.int32)


# ----------------------------------------------------------------------------- keys


def test_exact_lattice_makes_every_summation_order_agree():
    rng = np.random.default_rng(23)
    x = nb.exact_lattice(rng.standard_normal((300, 1040)).astype(np.float32) * 0.5, 64)
    assert np.array_equal(x * 64, np.round(x * 64)) and np.abs(x).max() <= 127 / 64
    exact = x.astype(np.float64) @ x.T.astype(np.float64)  # exact: below 2**53
    np.testing.assert_array_equal(np.matmul(x, x.T).astype(np.float64), exact)
    np.testing.assert_array_equal(np.matmul(x[:7], x[3:250].T).astype(np.float64), exact[:7, 3:250])
    assert float(np.cumsum(x[0] * x[1], dtype=np.float32)[-1]) == exact[0, 1]  # sequential order
    assert float(np.cumsum((x[0] * x[1])[::-1], dtype=np.float32)[-1]) == exact[0, 1]  # reversed
    with pytest.raises(ValueError, match="1,040 columns"):
        nb.exact_lattice(np.zeros((2, 1041), np.float32))
    with pytest.raises(ValueError, match="power of two"):
        nb.exact_lattice(np.zeros((2, 4), np.float32), 10)


def test_sortable_keys_order_and_round_trip():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal(500), [0.0, -0.0, -np.inf, np.inf, 1e-45, -1e-45,
                                                   3.0, 3.0, -0.0, 0.0]]).astype(np.float32)
    v = np.concatenate([v, v[::3]])  # equal values at other indices
    idx = rng.permutation(len(v)).astype(np.int64)
    keys = _sortable(v, idx)
    order = np.argsort(-keys, kind="stable")
    want = sorted(range(len(v)), key=lambda i: (-float(v[i]), int(idx[i])))  # -0.0 == 0.0
    assert order.tolist() == want
    back_v, back_i = _unsortable(keys)
    np.testing.assert_array_equal(bits(back_v), bits(v))  # -0.0 stays -0.0
    np.testing.assert_array_equal(back_i, idx)


# ----------------------------------------------------------------------------- knn


@pytest.mark.parametrize(
    ("data", "tile", "k"),
    [
        pytest.param("gaussian", 256, 11, marks=needs_alike),
        pytest.param("gaussian", 333, 40, marks=needs_alike),  # n not a multiple of the tile
        pytest.param("gaussian", 1000, 1, marks=needs_alike),
        ("dyadic", 256, 11),
        ("dyadic", 333, 40),
        ("dyadic", 1000, 1),
        ("ties", 13, 30),  # tiny tiles, k > tile: lists fill over several tiles
        ("ties", 64, 7),
        ("ties", 200, 50),
    ],
)
def test_knn_symmetric_equals_per_row_and_brute_force(data, tile, k):
    x = float_data(data, 1200, 32, 200, seed=1)[0] if data != "ties" else ties(400, 4, 5, seed=2)[0]
    sims, idx = knn(x, None, k, chunk_size=tile, normalize=False, symmetric=True)
    row_s, row_i = knn(x, None, k, normalize=False, symmetric=False)  # today's per-row search
    ref_s, ref_i = brute_force(x, k)
    np.testing.assert_array_equal(idx.numpy(), row_i.numpy())
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_array_equal(bits(sims), bits(row_s))
    np.testing.assert_array_equal(bits(sims), bits(ref_s))


@pytest.mark.parametrize("data", [FLOAT, "dyadic"])
def test_knn_symmetric_per_row_blocks_and_workers_agree(data):
    x, _, normalize = float_data(data, 1500, 24, 300, seed=3)
    a = knn(x, None, 12, chunk_size=300, normalize=normalize, symmetric=False)  # blocks of 300
    xs = nb.l2_normalize(torch.from_numpy(x)).numpy() if normalize else x
    for workers in (1, 2, 3):
        s, i, _ = symmetric_topk(xs, 12, tile=400, workers=workers)
        np.testing.assert_array_equal(i, a[1].numpy())
        np.testing.assert_array_equal(bits(s), bits(a[0]))


@pytest.mark.parametrize("data", [FLOAT, "dyadic", "ties"])
def test_any_tile_order_gives_the_same_lists(data):
    # lists whose rows or columns are still empty when a tile arrives (another worker has not
    # merged their first tile yet) take their thresholds from the tile itself
    x, y = float_data(data, 1300, 16, 300, seed=15)[:2] if data != "ties" else ties(500, 4, 6, seed=16)
    tile = 300 if data != "ties" else 90
    want_s, want_i, _ = symmetric_topk(x, 9, tile=tile, workers=1)
    s_star, j_star, _ = best_relevant(x, y)
    want_c = symmetric_topk(x, 9, tile=tile, workers=1, first_hit=(s_star, j_star, 60))[2]
    t = len(nb._tile_bounds(len(x), tile)) - 1
    pairs = [(i, j) for i in range(t) for j in range(i, t)]
    rng = np.random.default_rng(17)
    for order in (pairs[::-1], [pairs[k] for k in rng.permutation(len(pairs))]):
        for workers in (1, 3):
            s, i, c = symmetric_topk(x, 9, tile=tile, workers=workers, _order=order,
                                     first_hit=(s_star, j_star, 60))
            np.testing.assert_array_equal(i, want_i)
            np.testing.assert_array_equal(bits(s), bits(want_s))
            np.testing.assert_array_equal(np.minimum(c, 60), np.minimum(want_c, 60))
    with pytest.raises(ValueError, match="_order"):
        symmetric_topk(x, 9, tile=tile, _order=pairs[1:])


@pytest.mark.parametrize("data", [FLOAT, "dyadic", "ties"])
def test_lists_are_exact_to_their_depth_in_any_tile_order(data):
    # a list read only to depth d (R_q for R-Precision and MAP@R) keeps its d-th similarity as
    # threshold: those entries stay exact, whatever the tiles' order and workers
    x, y = float_data(data, 1300, 16, 300, seed=18)[:2] if data != "ties" else ties(500, 4, 6, seed=19)
    tile = 300 if data != "ties" else 90
    k = 9
    ref_s, ref_i = brute_force(x, k)
    depth = np.random.default_rng(20).integers(1, k + 1, size=len(x))
    depth[:5] = k
    s_star, j_star, _ = best_relevant(x, y)
    want_c = symmetric_topk(x, k, tile=tile, workers=1, first_hit=(s_star, j_star, 60))[2]
    t = len(nb._tile_bounds(len(x), tile)) - 1
    pairs = [(i, j) for i in range(t) for j in range(i, t)]
    inside = np.arange(k) < depth[:, None]
    # any grouping gives a valid floor (the depth-th largest of a subset); groups of 7 give many
    floor = nb.class_floor(x, np.arange(len(x)) // 7, depth)
    assert np.isfinite(floor).mean() > 0.5
    for order, fl in ((None, None), (None, floor), (pairs[::-1], floor)):
        for workers in (1, 3):
            s, i, c = symmetric_topk(x, k, tile=tile, workers=workers, _order=order, depth=depth,
                                     first_hit=(s_star, j_star, 60), floor=fl)
            np.testing.assert_array_equal(np.where(inside, i, -1), np.where(inside, ref_i, -1))
            np.testing.assert_array_equal(np.where(inside, bits(s), 0), np.where(inside, bits(ref_s), 0))
            np.testing.assert_array_equal(np.minimum(c, 60), np.minimum(want_c, 60))
    for bad in (depth[:-1], np.zeros_like(depth), depth + k, depth.astype(float)):
        with pytest.raises(ValueError, match="depth"):
            symmetric_topk(x, k, tile=tile, depth=bad)
    with pytest.raises(ValueError, match="floor"):
        symmetric_topk(x, k, tile=tile, floor=floor.astype(np.float64))


def test_class_floor_bounds_the_depth_th_similarity_from_the_class():
    x, y = sizes_1_2_and_large(seed=21)
    x = x * np.float32(3.0)  # not normalised: the rounding margin scales with the norms
    n, d = x.shape
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    depth = np.random.default_rng(22).integers(1, 6, size=n)
    floor = nb.class_floor(x, y, depth)
    assert floor.dtype == np.float32
    sizes = np.bincount(y)[y]
    for i in range(n):
        mates = np.sort(s[i, y == y[i]])[::-1]  # itself is -inf, last
        if sizes[i] - 1 < depth[i] or sizes[i] > nb.FLOOR_MAX_CLASS:
            assert floor[i] == -np.inf
            continue
        want = mates[depth[i] - 1]
        # below the class mate's similarity by at most the rounding margin, and below the
        # depth-th similarity among all items (what the list's entries must reach)
        margin = 2 * d * 2.0**-24 * np.linalg.norm(x[i]) * np.linalg.norm(x, axis=1).max() * 1.01
        assert want - 2 * margin <= floor[i] <= want
        assert floor[i] <= np.sort(s[i])[::-1][depth[i] - 1]


def test_knn_default_uses_symmetric_search_beyond_one_tile(monkeypatch):
    x, _ = gaussian(700, 16, 100, seed=4)
    calls = []
    real = nb.symmetric_topk
    monkeypatch.setattr(nb, "symmetric_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(nb, "KNN_BLOCK_BYTES", 2 * 4 * 300**2)  # tiles of 300 rows
    monkeypatch.setattr(nb, "_MIN_TILE", 64)
    s, i = knn(x, None, 9)
    assert calls
    r_s, r_i = knn(x, None, 9, symmetric=False)
    np.testing.assert_array_equal(i.numpy(), r_i.numpy())
    np.testing.assert_array_equal(bits(s), bits(r_s))
    # float64 and query/gallery searches stay per row
    calls.clear()
    knn(x.astype(np.float64), None, 9)
    knn(x, x[:50], 9)
    assert not calls


def test_symmetric_refused_where_it_does_not_apply():
    x, _ = gaussian(100, 8, 10, seed=5)
    with pytest.raises(ValueError, match="symmetric=True"):
        knn(x, x, 3, symmetric=True)
    with pytest.raises(ValueError, match="symmetric=True"):
        knn(x.astype(np.float64), None, 3, chunk_size=30, symmetric=True)
    with pytest.raises(ValueError, match="more than one tile"):
        knn(x, None, 3, symmetric=True)  # one tile of the default size


class _PerturbedTiles:
    """numpy whose matmul rounds the tiles' products (fewer than n columns; not the per-row
    blocks against all n items) one ulp up: a BLAS whose rounding depends on the shape."""

    def __init__(self, n):
        self.n = n

    def __getattr__(self, name):
        return getattr(np, name)

    def matmul(self, a, b, out=None):
        c = np.matmul(a, b, out=out)
        if c.ndim == 2 and c.shape[1] < self.n:
            np.nextafter(c, np.float32(np.inf), out=c)
        return c


def test_canary_falls_back_to_per_row_blocks(monkeypatch):
    # dyadic data: exact products in any shape, so the perturbation is the only difference
    x, y = dyadic(600, 16, 80, seed=6)
    want_s, want_i = knn(x, None, 5, normalize=False, symmetric=False)
    want = retrieval_scores(x, y, ks=(1, 2, 50), normalize=False, symmetric=False)
    monkeypatch.setattr(nb, "np", _PerturbedTiles(len(x)))
    with pytest.raises(RuntimeError, match="not reproducible"):
        knn(x, None, 5, chunk_size=150, normalize=False, symmetric=True)
    monkeypatch.setattr(nb, "np", _PerturbedTiles(len(x)))
    monkeypatch.setattr(nb, "_MIN_TILE", 64)
    s, i = knn(x, None, 5, chunk_size=150, normalize=False)  # automatic: falls back, same results
    np.testing.assert_array_equal(i.numpy(), want_i.numpy())
    np.testing.assert_array_equal(bits(s), bits(want_s))
    monkeypatch.setattr(nb, "np", _PerturbedTiles(len(x)))
    got = retrieval_scores(x, y, ks=(1, 2, 50), normalize=False, chunk_size=150)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_tiny_float_tiles_are_exact_or_refused():
    # products this small may take the BLAS's small-matrix kernel, whose rounding differs from
    # a large product's: the canary must catch that (or the values agree)
    x, _ = gaussian(300, 8, 40, seed=7)
    want_s, want_i = knn(x, None, 6, symmetric=False)
    try:
        s, i = knn(x, None, 6, chunk_size=9, symmetric=True)
    except RuntimeError:
        return
    np.testing.assert_array_equal(i.numpy(), want_i.numpy())
    np.testing.assert_array_equal(bits(s), bits(want_s))


# ----------------------------------------------------------------------------- first hits


@pytest.mark.parametrize("data", ["ties", "dyadic", FLOAT])
def test_first_hit_counts_equal_brute_force(data):
    x, y = ties(300, 3, 6, seed=8) if data == "ties" else float_data(data, 900, 16, 300, seed=9)[:2]
    n = len(y)
    s_star, j_star, _ = best_relevant(x, y)
    s = np.matmul(x, x.T.copy())
    np.fill_diagonal(s, -np.inf)
    for cap in (5, 40, n - 1):
        _, _, count = symmetric_topk(x, 4, tile=70 if data == "ties" else 256,
                                     first_hit=(s_star, j_star, cap))
        for i in range(0, n, 7):
            same = np.flatnonzero((y == y[i]) & (np.arange(n) != i))
            if len(same) == 0:
                assert s_star[i] == -np.inf and j_star[i] == n
                continue
            order = np.argsort(-s[i], kind="stable")
            first = int(np.flatnonzero(np.isin(order, same))[0])
            assert j_star[i] == order[first]
            assert (count[i] == first) if first < cap else (count[i] >= cap)


# ----------------------------------------------------------------------------- retrieval


CASES = {  # (x, y, normalize)
    "gaussian": lambda: (*gaussian(1100, 24, 250, seed=10), True),
    "dyadic": lambda: (*dyadic(1100, 24, 250, seed=10), False),
    "ties": lambda: (*ties(500, 4, 8, seed=11), False),
    "sizes_1_2_and_large": lambda: (*sizes_1_2_and_large(seed=12), True),
    "sizes_1_2_and_large_dyadic": lambda: (*exact(sizes_1_2_and_large(seed=12)), False),
}
FLOAT_CASES = {"gaussian", "sizes_1_2_and_large"}  # float products: need a BLAS that rounds alike


def exact(xy):
    """Float embeddings (entries up to ~8) on the lattice of multiples of 1/16: exact products."""
    x, y = xy
    return nb.exact_lattice(x, 16), y
KS = [(1,), (1, 2, 4, 8), (1, 10, 100, 1000), (3, 100000)]


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_alike) if c in FLOAT_CASES else c
                                  for c in sorted(CASES)])
@pytest.mark.parametrize("tile", [37, 128, 400])
def test_retrieval_symmetric_equals_per_row(case, tile):
    x, y, normalize = CASES[case]()
    for ks in KS:
        for ranking in (True, False):
            want = retrieval_scores(x, y, ks=ks, normalize=normalize, ranking=ranking,
                                    symmetric=False)
            try:
                got = retrieval_scores(x, y, ks=ks, normalize=normalize, ranking=ranking,
                                       chunk_size=tile, symmetric=True)
            except RuntimeError:
                assert case in FLOAT_CASES and tile == 37  # only tiny float tiles may be refused
                continue
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{ks} {key}")


def test_retrieval_matches_brute_force_on_ties():
    # independent reference: full stable sort, lone queries and classes larger than the lists
    x, y = ties(500, 4, 8, seed=13)
    n = len(y)
    ks = (1, 3, 40, 1000)
    got = retrieval_scores(x, y, ks=ks, normalize=False, chunk_size=90, symmetric=True)
    s = x.astype(np.float64) @ x.T.astype(np.float64)  # exact for these entries
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, : n - 1]
    rel = y[order] == y[:, None]
    r = rel.sum(axis=1)
    np.testing.assert_array_equal(got["r"], r)
    for kk in ks:
        np.testing.assert_array_equal(got[f"recall@{kk}"], rel[:, :kk].any(axis=1))
    for i in range(n):
        if r[i] == 0:
            assert np.isnan(got["r_precision"][i]) and np.isnan(got["map@r"][i])
            continue
        hits = rel[i, : r[i]]
        prec = np.cumsum(hits) / np.arange(1, r[i] + 1)
        assert got["r_precision"][i] == pytest.approx(hits.mean(), abs=1e-12)
        assert got["map@r"][i] == pytest.approx((prec * hits).sum() / r[i], abs=1e-12)


def test_evaluate_default_path_is_symmetric_and_unchanged(monkeypatch):
    x, y = gaussian(900, 16, 200, seed=14)
    monkeypatch.setattr(nb, "KNN_BLOCK_BYTES", 2 * 4 * 320**2)  # default tiles of 320 rows
    monkeypatch.setattr(nb, "_MIN_TILE", 64)
    import dmlnb.metrics.retrieval as ret

    calls = []
    real = ret.symmetric_topk
    monkeypatch.setattr(ret, "symmetric_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    include = ["recall", "r_precision", "map@r"]
    for ks in [(1,), (1, 10, 100, 1000)]:
        got = evaluate(x, y, ks=ks, include=include)
        assert calls
        calls.clear()
        want = {key: v for key, v in evaluate(x, y, ks=ks, include=include, chunk_size=10**6)
                .items()}  # one block: the per-row search
        assert not calls
        assert got == want


@pytest.mark.parametrize("groups", [1, 3, 64, 65, 362, 1000])
def test_slab_bounds_cover_the_tile_in_whole_groups_of_about_the_slab_size(groups):
    g = nb.SYMMETRIC_GROUP
    b = nb.slab_bounds(groups, g)
    assert b[0] == 0 and b[-1] == groups
    sizes = np.diff(b) * g
    assert (sizes > 0).all()  # no empty slab
    assert sizes.max() - sizes.min() <= g  # near-equal, in whole groups
    if groups * g >= nb._SLAB_ROWS:  # none tiny: within a factor 2 of the slab size
        assert (sizes >= nb._SLAB_ROWS / 2).all() and (sizes <= 2 * nb._SLAB_ROWS).all()
