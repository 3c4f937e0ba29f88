"""dmlnb.metrics intra-class measures against loop references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from dmlnb.metrics import (
    attribute_retrieval,
    intraclass_spread,
    nearest_same_class,
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
