"""dmlnb.metrics: evaluate / knn / retrieval / clustering against slow loop references and PML."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dmlnb.metrics import (
    class_means,
    cluster_scores,
    evaluate,
    kmeans,
    knn,
    pair_f1,
    per_class_scores,
    retrieval_scores,
)
from dmlnb.metrics.neighbors import topk_stable

# ----------------------------------------------------------------------------- loop references


def ref_similarity(q, r, normalize):
    """Full similarity matrix, one pair at a time (float64)."""
    q = np.asarray(q, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    s = np.empty((len(q), len(r)))
    for i in range(len(q)):
        for j in range(len(r)):
            s[i, j] = float(np.dot(q[i], r[j]))
    return s


def ref_order(s_row, exclude=None):
    """Reference indices sorted by similarity desc, then index asc, query excluded by index."""
    cand = [j for j in range(len(s_row)) if j != exclude]
    return sorted(cand, key=lambda j: (-s_row[j], j))


def ref_metrics(q, yq, r=None, yr=None, ks=(1, 2, 4, 8), normalize=True):
    loo = r is None
    if loo:
        r, yr = q, yq
    s = ref_similarity(q, r, normalize)
    per = {f"recall@{k}": [] for k in ks}
    per["r_precision"], per["map@r"] = [], []
    lone = 0
    for i in range(len(q)):
        order = ref_order(s[i], exclude=i if loo else None)
        rel = [int(yr[j] == yq[i]) for j in order]
        big_r = sum(int(yr[j] == yq[i]) for j in range(len(r))) - int(loo)
        for k in ks:
            per[f"recall@{k}"].append(float(any(rel[:k])))
        if big_r == 0:
            lone += 1
            per["r_precision"].append(math.nan)
            per["map@r"].append(math.nan)
            continue
        per["r_precision"].append(sum(rel[:big_r]) / big_r)
        ap, hits = 0.0, 0
        for pos in range(big_r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        per["map@r"].append(ap / big_r)
    return {key: np.array(v) for key, v in per.items()}, lone


def ref_summary(per, lone):
    out = {}
    for key, v in per.items():
        ok = ~np.isnan(v)
        out[key] = float(v[ok].mean()) if ok.any() else math.nan
    out["lone_queries"] = lone
    return out


def assert_same(a, b, tol=1e-12):
    assert set(a) == set(b), (set(a), set(b))
    for key in a:
        if isinstance(b[key], float) and math.isnan(b[key]):
            assert math.isnan(a[key]), key
        else:
            assert a[key] == pytest.approx(b[key], abs=tol), key


# ----------------------------------------------------------------------------- inputs


def gaussian_classes(n_classes, per_class, dim, seed, spread=0.7):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def tied_integers(n, dim, n_classes, seed, n_dup=20):
    """Small-integer embeddings (dot products exact in float32): many ties and exact duplicates."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    y = rng.integers(0, n_classes, size=n)
    dup = rng.integers(0, n, size=n_dup)
    x = np.concatenate([x, x[dup]])
    y = np.concatenate([y, rng.integers(0, n_classes, size=n_dup)])  # duplicates, other labels too
    return x, y


# ----------------------------------------------------------------------------- knn


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_knn_matches_stable_full_sort_with_ties_and_duplicates(chunk):
    x, _ = tied_integers(90, 5, 4, seed=1)
    s = ref_similarity(x, x, normalize=False)
    k = 40
    sims, idx = knn(x, None, k, chunk_size=chunk, normalize=False)
    for i in range(len(x)):
        order = ref_order(s[i], exclude=i)[:k]
        assert idx[i].tolist() == order
        np.testing.assert_array_equal(sims[i].numpy(), s[i, order].astype(np.float32))


@pytest.mark.parametrize(("n", "k", "distinct"), [(90, 40, 9), (1000, 10, 3), (1000, 300, 3),
                                                   (5000, 50, 2), (64, 64, 1)])
def test_topk_stable_equals_stable_sort(n, k, distinct):
    # plain torch.topk orders ties arbitrarily on exactly these inputs
    g = torch.Generator().manual_seed(n + k)
    s = torch.randint(0, distinct, (20, n), generator=g).float()
    s[0, :] = -0.0  # -0.0 and 0.0 are equal
    s[0, ::2] = 0.0
    vals, idx = topk_stable(s, k)
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    assert torch.equal(idx, ref.indices[:, :k])
    assert torch.equal(vals, ref.values[:, :k])


def test_knn_query_gallery_and_exclude_self_defaults():
    x, _ = tied_integers(50, 4, 3, seed=2)
    g, _ = tied_integers(70, 4, 3, seed=3)
    s = ref_similarity(x, g, normalize=True)
    n_g = len(g)
    # the whole gallery, so every position is checked; ties judged on the float32 values that
    # dmlnb computed itself (normalised: not exact, so not compared with float64 for ties)
    sims32, idx = knn(x, g, n_g, chunk_size=11)
    assert (sims32[:, :-1] >= sims32[:, 1:]).all()
    for i in range(len(x)):
        assert sorted(idx[i].tolist()) == list(range(n_g))
        # within runs of equal similarity, indices ascend
        for a, b in itertools.pairwise(range(n_g)):
            if sims32[i, a] == sims32[i, b]:
                assert idx[i, a] < idx[i, b]
    np.testing.assert_allclose(sims32.numpy(), np.take_along_axis(s, idx.numpy(), 1), atol=1e-6)
    # reference given explicitly but equal to the query: no exclusion unless asked
    _, self_idx = knn(x, x, 1, normalize=False)
    s_self = ref_similarity(x, x, normalize=False)
    assert [ref_order(s_self[i])[0] for i in range(len(x))] == self_idx[:, 0].tolist()
    _, loo = knn(x, x, 3, exclude_self=True, normalize=False)
    assert not (loo == torch.arange(len(x))[:, None]).any()


def test_knn_input_errors():
    x = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="k=5 is larger"):
        knn(x, None, 5)
    with pytest.raises(ValueError, match="k=0"):
        knn(x, None, 0)
    with pytest.raises(ValueError, match="exclude_self"):
        knn(x, np.zeros((6, 3)), 2, exclude_self=True)
    with pytest.raises(ValueError, match="dimension"):
        knn(x, np.zeros((6, 4)), 2)


# ----------------------------------------------------------------------------- retrieval exactness


CASES = {
    "gaussian": lambda: gaussian_classes(12, 9, 8, seed=0),
    "ties_duplicates": lambda: tied_integers(120, 4, 6, seed=4),
    "sizes_1_2_and_large": lambda: (
        np.random.default_rng(5).normal(size=(1 + 2 * 3 + 40 + 5, 6)).astype(np.float32),
        np.array([0] + [1, 1, 2, 2, 3, 3] + [4] * 40 + [5, 6, 7, 8, 9]),
    ),
    "single_class": lambda: (np.random.default_rng(6).normal(size=(30, 5)).astype(np.float32),
                             np.zeros(30, dtype=np.int64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_evaluate_equals_brute_force_leave_one_out(case):
    x, y = CASES[case]()
    normalize = case != "ties_duplicates"  # integer data: exact dot products, exact ties
    ks = (1, 2, 4, 8, 16, 1000)  # K above some class sizes and above n
    got = evaluate(x, y, ks=ks, include=["recall", "r_precision", "map@r"], normalize=normalize,
                   chunk_size=13)
    per, lone = ref_metrics(x, y, ks=ks, normalize=normalize)
    assert_same(got, ref_summary(per, lone))
    if case == "sizes_1_2_and_large":
        assert got["lone_queries"] == 1 + 5
        assert got["recall@1000"] == pytest.approx((len(y) - 6) / len(y))


def test_evaluate_query_gallery_equals_brute_force():
    x, y = tied_integers(60, 4, 5, seed=7)
    g, gy = tied_integers(80, 4, 6, seed=8)  # class 5 only in the gallery
    y = y.copy()
    y[:3] = 9  # lone queries: class 9 is not in the gallery
    got = evaluate(x, y, reference=g, reference_labels=gy, ks=(1, 3, 100),
                   include=["recall", "r_precision", "map@r"], normalize=False)
    per, lone = ref_metrics(x, y, g, gy, ks=(1, 3, 100), normalize=False)
    assert lone >= 3
    assert_same(got, ref_summary(per, lone))


def test_map_at_r_exact_for_classes_larger_than_max_k():
    x, y = gaussian_classes(3, 50, 4, seed=9, spread=2.0)
    got = evaluate(x, y, ks=(1,), include=["map@r", "r_precision"])
    per, lone = ref_metrics(x, y, ks=(1,))
    assert got["map@r"] == pytest.approx(np.mean(per["map@r"]), abs=1e-12)
    assert got["r_precision"] == pytest.approx(np.mean(per["r_precision"]), abs=1e-12)


def test_chunk_size_and_input_type_do_not_change_results():
    x, y = gaussian_classes(10, 6, 8, seed=10)
    a = evaluate(x, y, include=["recall", "r_precision", "map@r"], chunk_size=1)
    b = evaluate(torch.from_numpy(x), torch.from_numpy(y),
                 include=["recall", "r_precision", "map@r"])
    c = evaluate(x.astype(np.float64), y, include=["recall", "r_precision", "map@r"], chunk_size=17)
    assert a == b
    assert_same(a, c, tol=1e-12)


def test_class_average_and_per_class_equal_loops():
    x, y = CASES["sizes_1_2_and_large"]()
    per, _ = ref_metrics(x, y, ks=(1, 4))
    classes = np.unique(y)
    expect = {}
    for key, v in per.items():
        vals = []
        for c in classes:
            vc = v[y == c]
            vc = vc[~np.isnan(vc)]
            vals.append(vc.mean() if len(vc) else np.nan)
        expect[key] = np.array(vals)
    pc = per_class_scores(x, y, ks=(1, 4))
    np.testing.assert_array_equal(pc["label"], classes)
    np.testing.assert_array_equal(pc["n_queries"], np.bincount(y)[classes])
    for key in expect:
        np.testing.assert_allclose(pc[key], expect[key], atol=1e-12, equal_nan=True)
    got = evaluate(x, y, ks=(1, 4), include=["recall", "r_precision", "map@r"], average="class")
    for key in expect:
        assert got[key] == pytest.approx(np.nanmean(expect[key]), abs=1e-12)
    assert got["recall@1"] != pytest.approx(
        evaluate(x, y, ks=(1,), include=["recall@1"])["recall@1"], abs=1e-9
    )


def test_retrieval_scores_per_query_and_class_means():
    x, y = gaussian_classes(5, 4, 6, seed=11)
    s = retrieval_scores(x, y, ks=(1, 2))
    per, _ = ref_metrics(x, y, ks=(1, 2))
    for key in per:
        np.testing.assert_allclose(s[key], per[key], atol=1e-12)
    np.testing.assert_array_equal(s["r"], np.bincount(y)[y] - 1)
    classes, means = class_means({"v": np.array([1.0, np.nan, 3.0, 5.0])}, [2, 2, 7, 7])
    np.testing.assert_array_equal(classes, [2, 7])
    np.testing.assert_allclose(means["v"], [1.0, 4.0])


# ----------------------------------------------------------------------------- clustering


def ref_pair_f1(y, c):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(y)), 2):
        same_class, same_cluster = y[i] == y[j], c[i] == c[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    p = tp / (tp + fp) if tp + fp else float(tp + fn == 0)
    r = tp / (tp + fn) if tp + fn else float(tp + fp == 0)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_pair_f1_equals_pair_loop():
    rng = np.random.default_rng(12)
    for _ in range(5):
        y = rng.integers(0, 5, 60)
        c = rng.integers(0, 7, 60)
        assert pair_f1(y, c) == pytest.approx(ref_pair_f1(y, c), abs=1e-12)
    assert pair_f1([0, 0, 1, 1], [5, 5, 3, 3]) == 1.0
    assert pair_f1([0, 1, 2], [0, 1, 2]) == 1.0  # no pairs anywhere: perfect by convention
    assert pair_f1([0, 0, 0], [0, 1, 2]) == 0.0


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_kmeans_seeded_and_nmi_f1(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    from sklearn.metrics import normalized_mutual_info_score

    x, y = gaussian_classes(6, 20, 8, seed=13, spread=0.3)
    a = kmeans(x, 6, seed=3, backend=backend)
    b = kmeans(x, 6, seed=3, backend=backend)
    np.testing.assert_array_equal(a, b)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cs = cluster_scores(x, y, kmeans_seed=3, kmeans_backend=backend)
    np.testing.assert_array_equal(cs["clusters"], kmeans(xn, 6, seed=3, backend=backend))
    assert cs["nmi"] == pytest.approx(normalized_mutual_info_score(y, cs["clusters"]), abs=1e-12)
    assert cs["f1"] == pytest.approx(ref_pair_f1(y, cs["clusters"]), abs=1e-12)
    geo = cluster_scores(x, y, kmeans_seed=3, kmeans_backend=backend, nmi_average="geometric")
    assert geo["nmi"] == pytest.approx(
        normalized_mutual_info_score(y, cs["clusters"], average_method="geometric"), abs=1e-12
    )
    ev = evaluate(x, y, include=["nmi", "f1"], kmeans_seed=3, kmeans_backend=backend)
    assert ev == {"nmi": cs["nmi"], "f1": cs["f1"]}


def test_include_without_clustering_skips_kmeans(monkeypatch):
    import dmlnb.metrics.evaluation as ev_mod

    def boom(*a, **k):
        raise AssertionError("KMeans ran although nmi/f1 were not asked for")

    monkeypatch.setattr(ev_mod, "cluster_scores", boom)
    x, y = gaussian_classes(4, 5, 3, seed=14)
    out = evaluate(x, y, include=["recall@1", "map@r"])
    assert set(out) == {"recall@1", "map@r", "lone_queries"}


def test_evaluate_default_keys():
    x, y = gaussian_classes(4, 5, 3, seed=15)
    out = evaluate(x, y)
    assert set(out) == {"recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r",
                        "lone_queries", "nmi", "f1"}


# ----------------------------------------------------------------------- pytorch-metric-learning


def test_agrees_with_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    x, y = gaussian_classes(15, 8, 16, seed=16)
    ours = evaluate(x, y, ks=(1,), kmeans_backend="sklearn", kmeans_seed=0)
    clusters = cluster_scores(x, y, kmeans_backend="sklearn", kmeans_seed=0)["clusters"]
    calc = pml.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count", device=torch.device("cpu"), knn_func=CustomKNN(CosineSimilarity()),
        kmeans_func=lambda q, n: torch.as_tensor(clusters),  # the same KMeans assignment
    )
    theirs = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["nmi"] == pytest.approx(theirs["NMI"], abs=1e-12)

    # documented difference: PML drops lone queries from precision_at_1, dmlnb counts them as 0
    y2 = y.copy()
    y2[:4] = 100 + np.arange(4)
    ours2 = evaluate(x, y2, ks=(1,), include=["recall@1", "r_precision"])
    theirs2 = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y2),
                                include=("precision_at_1", "r_precision"))
    n = len(y2)
    assert ours2["lone_queries"] == 4
    assert ours2["recall@1"] * n / (n - 4) == pytest.approx(theirs2["precision_at_1"], abs=1e-6)
    assert ours2["r_precision"] == pytest.approx(theirs2["r_precision"], abs=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"labels": np.zeros(9, dtype=int)}, ValueError, "9 entries but the embeddings have 10"),
        ({"embeddings": np.full((10, 3), np.nan)}, ValueError, "NaN or inf"),
        ({"embeddings": np.full((10, 3), np.inf)}, ValueError, "NaN or inf"),
        ({"embeddings": np.zeros((0, 3)), "labels": np.zeros(0, dtype=int)}, ValueError, "empty"),
        ({"ks": (1, 0)}, ValueError, "K in ks=0"),
        ({"ks": ()}, ValueError, "ks is empty"),
        ({"ks": (1.5,)}, TypeError, "K in ks must be an integer"),
        ({"labels": np.linspace(0, 1, 10)}, ValueError, "integer class labels"),
        ({"labels": torch.zeros(10)}, ValueError, "integer class labels"),
        ({"include": ["recall@3"]}, ValueError, "valid metrics in include are"),
        ({"average": "macro"}, ValueError, "'micro', 'class'"),
        ({"kmeans_backend": "cuml"}, ValueError, "'auto', 'sklearn', 'faiss'"),
        ({"nmi_average": "harmonic"}, ValueError, "'arithmetic', 'geometric'"),
        ({"embeddings": np.zeros(10)}, ValueError, "2-D"),
        ({"reference": np.zeros((4, 3))}, ValueError, "reference_labels"),
    ],
)
def test_bad_input_raises_named_errors(kwargs, exc, match):
    args = {"embeddings": np.random.default_rng(0).normal(size=(10, 3)),
            "labels": np.arange(10) % 3}
    args.update(kwargs)
    e, lab = args.pop("embeddings"), args.pop("labels")
    with pytest.raises(exc, match=match):
        evaluate(e, lab, **args)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_equals_cpu():
    x, y = gaussian_classes(20, 10, 32, seed=17)
    xc = torch.from_numpy(x).cuda()
    yc = torch.from_numpy(y).cuda()
    _, idx = knn(xc, None, 5)
    assert idx.is_cuda
    cpu = evaluate(x, y, ks=(1, 4), include=["recall", "r_precision", "map@r"])
    gpu = evaluate(xc, yc, ks=(1, 4), include=["recall", "r_precision", "map@r"])
    assert_same(gpu, cpu, tol=1e-6)
    assert evaluate(xc, yc, include=["nmi"], kmeans_backend="sklearn") == evaluate(
        x, y, include=["nmi"], kmeans_backend="sklearn")


# ----------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ranking", [True, False])
def test_recall_counted_beyond_candidates_equals_brute_force(monkeypatch, case, ranking):
    # RECALL_CANDIDATES = 1: the first relevant position of most queries comes from the exact
    # count over their similarity row rather than from the top-k list
    import dmlnb.metrics.retrieval as ret

    monkeypatch.setattr(ret, "RECALL_CANDIDATES", 1)
    x, y = CASES[case]()
    normalize = case != "ties_duplicates"
    ks = (1, 2, 3, 5, 16, 1000)
    include = ["recall", "r_precision", "map@r"] if ranking else ["recall"]
    got = evaluate(x, y, ks=ks, include=include, normalize=normalize, chunk_size=13)
    per, lone = ref_metrics(x, y, ks=ks, normalize=normalize)
    want = ref_summary(per, lone)
    if not ranking:
        want = {key: v for key, v in want.items() if key.startswith("recall") or key == "lone_queries"}
    assert_same(got, want)


def test_first_relevant_position_equals_loop_query_gallery():
    from dmlnb.metrics.retrieval import ClassMembers

    x, y = tied_integers(40, 3, 4, seed=18)
    g, gy = tied_integers(70, 3, 5, seed=19)
    y = y.copy()
    y[:2] = 7  # not in the gallery
    s = ref_similarity(x, g, normalize=False)
    sims = torch.from_numpy(s.astype(np.float32))
    got = ClassMembers(torch.from_numpy(gy), torch.from_numpy(y)).first_relevant_position(
        sims, torch.arange(len(x)))
    for i in range(len(x)):
        rel = [gy[j] == y[i] for j in ref_order(s[i])]
        want = rel.index(True) if any(rel) else torch.iinfo(torch.int64).max
        assert int(got[i]) == want


@pytest.mark.parametrize(("n", "k"), [(50, 49), (50, 1), (3, 2)])
def test_topk_stable_boundary_cases(n, k):
    # k = n - 1: the (k+1)-th candidate is the last item; ties at the boundary on every row
    s = torch.zeros(6, n)
    s[1] = torch.arange(n).float() % 2
    s[2, -1] = 1.0
    s[3] = -torch.arange(n).float()
    s[4, ::3] = float("-inf")  # as a query's own column in leave-one-out search
    s[5] = torch.randn(n, generator=torch.Generator().manual_seed(n))
    vals, idx = topk_stable(s, k)
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    assert torch.equal(idx, ref.indices[:, :k])
    assert torch.equal(vals, ref.values[:, :k])


def test_knn_blocks_do_not_alias_results():
    # the similarity buffer is reused from block to block; results must not change with it
    x, _ = gaussian_classes(6, 10, 5, seed=20)
    a_s, a_i = knn(x, None, 7, chunk_size=4)
    b_s, b_i = knn(x, None, 7, chunk_size=len(x))
    assert torch.equal(a_i, b_i)
    np.testing.assert_allclose(a_s.numpy(), b_s.numpy(), rtol=0, atol=1e-6)
