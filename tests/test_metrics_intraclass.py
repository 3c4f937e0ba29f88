"""dmlnb.metrics intra-class measures against loop references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy, kendalltau

from dmlnb.metrics import (
    attribute_retrieval,
    density_ratio,
    intraclass_spread,
    nearest_same_class,
    original_retrieval,
    spectral_decay,
    view_ranking_consistency,
)


def test_view_ranking_consistency_equals_loops_and_scipy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(40, 5)).round(1)  # rounding makes ties
    s[0] = 0.3  # all equal: tau undefined
    s[1] = [0.9, 0.8, 0.7, 0.6, 0.5]  # perfectly falling
    s[2] = s[1][::-1]  # perfectly rising
    out = view_ranking_consistency(s)
    good = total = 0.0
    taus = []
    for row in s:
        for n, m in itertools.combinations(range(5), 2):
            good += 1.0 if row[n] > row[m] else 0.5 if row[n] == row[m] else 0.0
            total += 1
        taus.append(kendalltau(-np.arange(5), row).statistic)  # vs. the reversed strength order
    taus = np.array(taus)
    assert out["pair_order"] == pytest.approx(good / total, abs=1e-12)
    np.testing.assert_allclose(out["per_image_tau"], taus, atol=1e-12, equal_nan=True)
    assert out["kendall_tau"] == pytest.approx(np.nanmean(taus), abs=1e-12)
    assert out["tau_undefined"] == 1
    assert out["per_image_tau"][1] == 1.0 and out["per_image_tau"][2] == -1.0
    np.testing.assert_allclose(out["level_mean"], s.mean(axis=0))


def test_view_ranking_consistency_input_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        view_ranking_consistency(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="NaN or inf"):
        view_ranking_consistency(np.array([[1.0, np.nan]]))
    torch_in = view_ranking_consistency(torch.tensor([[0.9, 0.5, 0.7]]))
    assert torch_in["pair_order"] == pytest.approx(2 / 3)


def ref_nearest_same_class(x, y):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(len(x)):
        best, best_s = -1, -np.inf
        for j in range(len(x)):
            if j != i and y[j] == y[i]:
                s = float(np.dot(xn[i].astype(np.float64), xn[j].astype(np.float64)))
                if s > best_s + 1e-9:  # strictly better (exact-tie data below): lower index wins
                    best, best_s = j, s
        out.append(best)
    return np.array(out)


def tied_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(80, 3)).astype(np.float32)
    x[rng.random(80) < 0.05] = [1, 0, 0]
    x[np.all(x == 0, axis=1)] = [0, 1, 0]
    y = rng.integers(0, 5, 80)
    y[-1] = 99  # a singleton class
    return x, y


def test_nearest_same_class_equals_loop_with_ties():
    x, y = tied_data(1)
    got = nearest_same_class(x, y)
    np.testing.assert_array_equal(got, ref_nearest_same_class(x, y))
    assert got[-1] == -1


def test_attribute_retrieval_equals_loop():
    x, y = tied_data(2)
    rng = np.random.default_rng(3)
    attrs = {"family": rng.choice(["a", "b", "c"], size=80), "italic": rng.random(80) < 0.3}
    got = attribute_retrieval(x, y, attrs)
    nn = ref_nearest_same_class(x, y)
    for name, a in attrs.items():
        agree, chance = [], []
        for i in range(len(x)):
            if nn[i] < 0:
                continue
            agree.append(a[nn[i]] == a[i])
            others = [j for j in range(len(x)) if j != i and y[j] == y[i]]
            chance.append(np.mean([a[j] == a[i] for j in others]))
        assert got[name]["agreement"] == pytest.approx(np.mean(agree), abs=1e-12)
        assert got[name]["chance"] == pytest.approx(np.mean(chance), abs=1e-12)
        assert got[name]["lift"] == pytest.approx(np.mean(agree) - np.mean(chance), abs=1e-12)
        assert got[name]["n_queries"] == len(agree)


def test_attribute_retrieval_sees_kept_and_collapsed_structure():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(4), 30)
    fam = np.tile(np.repeat([0, 1, 2], 10), 4)
    centre = rng.normal(size=(4, 8)) * 5
    offset = rng.normal(size=(3, 8))
    kept = centre[y] + offset[fam] + 0.05 * rng.normal(size=(120, 8))
    collapsed = centre[y] + 0.05 * rng.normal(size=(120, 8))
    a = attribute_retrieval(kept, y, {"family": fam})["family"]
    b = attribute_retrieval(collapsed, y, {"family": fam})["family"]
    assert a["chance"] == pytest.approx(9 / 29) and b["chance"] == pytest.approx(9 / 29)
    assert a["agreement"] == 1.0
    assert abs(b["lift"]) < 0.25


def test_attribute_retrieval_errors():
    x = np.eye(4)
    with pytest.raises(ValueError, match="non-empty dict"):
        attribute_retrieval(x, [0, 0, 1, 1], {})
    with pytest.raises(ValueError, match="4 entries"):
        attribute_retrieval(x, [0, 0, 1, 1], {"w": [1, 2, 3]})


@pytest.mark.parametrize("normalize", [True, False])
def test_intraclass_spread_equals_pair_loop(normalize):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(70, 6)).astype(np.float32)
    y = rng.integers(0, 6, 70)
    got = intraclass_spread(x, y, normalize=normalize, chunk_size=9)
    xr = x.astype(np.float64)
    if normalize:
        xr = xr / np.linalg.norm(xr, axis=1, keepdims=True)
    w, b = [], []
    for i, j in itertools.combinations(range(70), 2):
        (w if y[i] == y[j] else b).append(np.linalg.norm(xr[i] - xr[j]))
    assert got["within"] == pytest.approx(np.mean(w), abs=1e-5)
    assert got["between"] == pytest.approx(np.mean(b), abs=1e-5)
    assert got["ratio"] == pytest.approx(np.mean(w) / np.mean(b), abs=1e-5)
    assert (got["within_pairs"], got["between_pairs"]) == (len(w), len(b))


def test_intraclass_spread_edge_cases():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = intraclass_spread(x, [0, 0, 1])
    assert got["within"] == pytest.approx(0.0, abs=1e-3)  # duplicates: distance 0 (float32)
    assert got["between"] == pytest.approx(math.sqrt(2), abs=1e-6)
    single = intraclass_spread(x, [0, 1, 2])
    assert math.isnan(single["within"]) and single["within_pairs"] == 0


# --- spectral decay rho (Roth et al. 2020) ---------------------------------------------------------
def ref_rho(x, skip, normalize):
    x = np.asarray(x, dtype=np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)[skip:]
    p = s / s.sum()
    m = len(s)
    rho = 0.0
    for pi in p:
        rho += (1 / m) * math.log((1 / m) / pi)
    return rho, p


@pytest.mark.parametrize("skip", [0, 1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_spectral_decay_equals_hand_computation(skip, normalize):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(30, 6)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.2])
    rho, p = ref_rho(x, skip, normalize)
    assert spectral_decay(x, skip=skip, normalize=normalize) == pytest.approx(rho, abs=1e-10)
    # the authors' computation, scipy.stats.entropy(uniform, s_norm) = KL(U || S)
    assert rho == pytest.approx(entropy(np.full(len(p), 1 / len(p)), p), abs=1e-12)
    # float32 input, fewer items than dimensions (min(n, d) singular values)
    few = x[:4].T.copy()  # [6, 4]
    assert spectral_decay(few.astype(np.float32), skip=skip, normalize=normalize) == \
        pytest.approx(ref_rho(few.astype(np.float32), skip, normalize)[0], abs=1e-5)


def test_spectral_decay_is_near_zero_for_isotropic_and_large_for_few_directions():
    rng = np.random.default_rng(7)
    iso = rng.normal(size=(20000, 16))
    assert spectral_decay(iso) < 1e-3
    decay = iso * (0.6 ** np.arange(16))  # a geometrically decaying spectrum
    assert spectral_decay(decay) > 1.0
    rank1 = np.outer(rng.normal(size=500), rng.normal(size=16)).astype(np.float32)
    assert spectral_decay(rank1, skip=0) == math.inf  # zero singular values: KL(U || S) infinite
    assert spectral_decay(rank1) == math.inf
    two = np.zeros((500, 16))
    two[:, :3] = rng.normal(size=(500, 3)) * [5.0, 3.0, 2.0]
    nearly = two + 1e-3 * rng.normal(size=two.shape)
    assert 1.0 < spectral_decay(nearly) < math.inf


def test_spectral_decay_errors():
    with pytest.raises(ValueError, match="skip"):
        spectral_decay(np.eye(4), skip=-1)
    with pytest.raises(ValueError, match="singular values"):
        spectral_decay(np.ones((5, 2)), skip=1)


# --- density ratio -------------------------------------------------------------------------------
def test_density_ratio_equals_pair_loop():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    y[-1] = 9  # a singleton class: no within-class pair, but a class mean
    xr = x.astype(np.float64)
    xr = xr / np.linalg.norm(xr, axis=1, keepdims=True)
    within = [np.linalg.norm(xr[i] - xr[j]) for i, j in itertools.combinations(range(40), 2)
              if y[i] == y[j]]
    classes = sorted(set(y.tolist()))
    means = [xr[y == c].mean(axis=0) for c in classes]
    between = [np.linalg.norm(a - b) for a, b in itertools.combinations(means, 2)]
    want = np.mean(within) / np.mean(between)
    assert density_ratio(x, y) == pytest.approx(want, abs=1e-5)
    assert density_ratio(x, y, chunk_size=3) == pytest.approx(want, abs=1e-5)


def test_density_ratio_small_for_tight_separated_clusters():
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(6), 15)
    centre = rng.normal(size=(6, 16)) * 10
    tight = centre[y] + 0.01 * rng.normal(size=(90, 16))
    loose = centre[y] + 10 * rng.normal(size=(90, 16))
    assert density_ratio(tight, y) < 0.01
    assert density_ratio(loose, y) > 10 * density_ratio(tight, y)


def test_density_ratio_undefined_cases():
    x = np.eye(3)
    assert math.isnan(density_ratio(x, [0, 1, 2]))  # only singletons: no within-class pair
    assert math.isnan(density_ratio(x, [0, 0, 0]))  # one class: no pair of class means


# --- retrieval of the original from its view ------------------------------------------------------
def ref_original_retrieval(views, gallery, own):
    g = gallery.astype(np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    b, n_levels, _ = views.shape
    hits = np.zeros(n_levels)
    for n in range(n_levels):
        for i in range(b):
            q = views[i, n].astype(np.float64)
            q = q / np.linalg.norm(q)
            best, best_s = -1, -np.inf
            for j in range(len(g)):
                s = float(np.dot(q, g[j]))
                if s > best_s + 1e-9:  # strictly better (exact-tie data): lower index wins
                    best, best_s = j, s
            hits[n] += best == own[i]
    return hits / b


def test_original_retrieval_equals_brute_force_with_ties():
    gallery, _ = tied_data(10)  # integer-valued rows, many exact duplicates
    rng = np.random.default_rng(11)
    own = rng.choice(len(gallery), 25, replace=False)
    views = np.stack([gallery[own],  # the original itself: a hit unless a lower duplicate exists
                      gallery[rng.integers(0, len(gallery), 25)],
                      gallery[own] + rng.integers(-1, 2, size=(25, 3))], axis=1)
    views[np.all(views == 0, axis=2)] = [0, 0, 1]
    views = views.astype(np.float32)
    got = original_retrieval(views, gallery, own)
    want = ref_original_retrieval(views, gallery, own)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got.shape == (3,) and 0 < got[0] < 1  # duplicates at a lower index take some
    torch_in = original_retrieval(torch.from_numpy(views), torch.from_numpy(gallery), own)
    np.testing.assert_allclose(torch_in, want, atol=1e-12)


def test_original_retrieval_identity_model_on_strength_zero_views():
    from dmlnb.views import make_views

    gen = torch.Generator().manual_seed(0)
    gallery_images = torch.rand(10, 1, 16, 16, generator=gen)
    own = np.array([1, 4, 5, 8])
    views = make_views(gallery_images[own], levels=2, families=("crop", "color"),
                       schedule=[0.0, 0.6], generator=gen)
    assert torch.equal(views[:, 0], gallery_images[own])  # strength 0 is the identity
    z = views.flatten(2)  # the identity "model": pixels as the embedding
    hits = original_retrieval(z, gallery_images.flatten(1), own)
    assert hits[0] == 1.0 and 0.0 <= hits[1] <= 1.0


def test_original_retrieval_errors():
    g = np.eye(4)
    with pytest.raises(ValueError, match="3-D"):
        original_retrieval(np.eye(4), g, [0])
    with pytest.raises(ValueError, match="dim"):
        original_retrieval(np.ones((2, 1, 3)), g, [0, 1])
    with pytest.raises(ValueError, match="gallery"):
        original_retrieval(np.ones((2, 1, 4)), g, [0, 4])
