"""The class-balanced batch sampler: its guarantees, checked against brute force on small inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dmlnb.data.sampler import ClassBalancedBatchSampler, epoch_coverage, max_full_batches
from dmlnb.defaults import CLASSES_PER_BATCH, SAMPLES_PER_CLASS


def _labels(counts, seed=0):
    """Labels with counts[c] items of class 10 * c (non-contiguous ids), shuffled positions."""
    labels = np.repeat(np.arange(len(counts)) * 10, counts)
    return np.random.default_rng(seed).permutation(labels)


def _check_batches(batches, labels, p, m):
    for b in batches:
        assert len(b) == p * m
        blocks = np.asarray(b).reshape(p, m)
        cls = labels[blocks]
        assert (cls == cls[:, :1]).all(), "each block of m indices is one class"
        assert len(set(cls[:, 0])) == p, "classes within a batch are distinct"


def test_defaults_come_from_dmlnb_defaults():
    s = ClassBalancedBatchSampler(_labels([8] * 40))
    assert (s.classes_per_batch, s.samples_per_class) == (CLASSES_PER_BATCH, SAMPLES_PER_CLASS)
    assert s.batch_size == 120


@pytest.mark.parametrize("counts", [[8] * 12, [5, 9, 4, 13, 2, 7, 8, 6, 11, 3], [1, 2, 3, 40, 4, 4, 5, 6]])
def test_distinct_classes_and_block_structure(counts):
    labels = _labels(counts)
    s = ClassBalancedBatchSampler(labels, 4, 3, seed=1)
    batches = list(s)
    assert len(batches) == len(s) > 0
    _check_batches(batches, labels, 4, 3)


def _brute_max_batches(groups, p):
    best = 0
    for k in range(sum(groups) // p + 1):
        if sum(min(g, k) for g in groups) >= k * p:
            best = k
    return best


def test_max_full_batches_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        groups = rng.integers(1, 9, size=rng.integers(1, 12))
        p = int(rng.integers(1, 6))
        assert max_full_batches(groups, p) == _brute_max_batches(groups.tolist(), p)


def test_max_full_batches_is_really_achievable_by_exhaustive_search():
    # tiny cases: the number of batches the sampler yields is the true optimum
    for groups in ([3, 1, 1], [2, 2, 2], [5, 1, 1, 1], [4, 4, 1]):
        p = 2
        k = max_full_batches(groups, p)
        assert _feasible(groups, p, k) and not _feasible(groups, p, k + 1)


def _feasible(groups, p, k):
    """Exhaustive: can k batches of p distinct classes be filled from `groups` groups per class?"""
    if k == 0:
        return True
    for combo in itertools.combinations([c for c, g in enumerate(groups) if g > 0], p):
        rest = list(groups)
        for c in combo:
            rest[c] -= 1
        if _feasible(rest, p, k - 1):
            return True
    return False


def test_every_image_drawn_about_once_per_epoch():
    counts = np.random.default_rng(3).integers(3, 15, size=37)
    labels = _labels(counts)
    p, m = 6, 4
    s = ClassBalancedBatchSampler(labels, p, m, seed=5)
    groups = -(-counts // m)
    set_aside = groups.sum() - len(s) * p
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        cov = np.bincount(np.concatenate(batches), minlength=len(labels))
        assert np.array_equal(cov, epoch_coverage(s))
        # only images of set-aside groups are missing; repeats only from padding of short groups
        assert (cov == 0).sum() <= set_aside * m
        assert cov.max() <= 2
        assert cov.sum() == len(s) * p * m
    full = ClassBalancedBatchSampler(labels, p, m, seed=5, drop_last=False)
    batches = list(full)
    _check_batches(batches, labels, p, m)
    assert np.bincount(np.concatenate(batches), minlength=len(labels)).min() >= 1


def test_balanced_classes_lose_nothing():
    labels = _labels([8] * 12)  # 24 groups, P=4 -> 6 full batches, nothing set aside, no padding
    s = ClassBalancedBatchSampler(labels, 4, 4)
    assert len(s) == 6
    assert (epoch_coverage(s) == 1).all()


def test_small_classes_are_padded_by_repetition():
    labels = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    s = ClassBalancedBatchSampler(labels, 2, 4, seed=0)
    seen = {}
    for epoch in range(2):
        s.set_epoch(epoch)
        for b in s:
            for block in np.asarray(b).reshape(2, 4):
                seen.setdefault(int(labels[block[0]]), []).append(sorted(block.tolist()))
    assert all(g == [0, 0, 0, 0] for g in seen.get(0, []))
    assert all(g == [1, 1, 2, 2] for g in seen.get(1, []))  # two images: each twice
    for g in seen.get(2, []):  # three images: all present, one repeated
        assert set(g) == {3, 4, 5}


def test_deterministic_given_seed_and_epoch():
    labels = _labels(np.random.default_rng(1).integers(2, 12, size=30))
    a = ClassBalancedBatchSampler(labels, 5, 4, seed=7)
    b = ClassBalancedBatchSampler(labels, 5, 4, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    c = ClassBalancedBatchSampler(labels, 5, 4, seed=8)
    assert list(c) != first
    assert len(a) == len(c)  # the count depends on class sizes only


def test_ranks_get_disjoint_equal_shares_of_each_global_batch():
    labels = _labels(np.random.default_rng(2).integers(2, 10, size=40))
    p, m = 6, 2
    world = [ClassBalancedBatchSampler(labels, p, m, seed=3, num_replicas=3, rank=r) for r in range(3)]
    single = ClassBalancedBatchSampler(labels, p, m, seed=3)
    assert len({len(s) for s in world}) == 1 and len(world[0]) == len(single)
    for epoch in (0, 4):
        for s in (*world, single):
            s.set_epoch(epoch)
        for glob, *parts in zip(single, *world, strict=True):
            assert all(len(x) == p // 3 * m for x in parts)
            flat = [i for x in parts for i in x]
            assert flat == glob  # disjoint shares that together are the global batch
            classes = [set(labels[x]) for x in parts]
            assert all(not (a & b) for a, b in itertools.combinations(classes, 2))


def test_resume_mid_epoch_continues_identically():
    labels = _labels(np.random.default_rng(4).integers(2, 12, size=25))
    ref = ClassBalancedBatchSampler(labels, 4, 3, seed=11)
    ref.set_epoch(2)
    expected = list(ref)
    s = ClassBalancedBatchSampler(labels, 4, 3, seed=11)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["batch"] == 3
    resumed = ClassBalancedBatchSampler(labels, 4, 3, seed=11)
    resumed.load_state_dict(state)
    assert head + list(resumed) == expected
    resumed.set_epoch(3)
    ref.set_epoch(3)
    assert list(resumed) == list(ref)  # the next epoch is whole again


def test_resume_refuses_other_data_or_settings():
    labels = _labels([6] * 10)
    state = ClassBalancedBatchSampler(labels, 4, 3, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ClassBalancedBatchSampler(labels, 4, 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="labels_crc32"):
        ClassBalancedBatchSampler(_labels([6] * 11), 4, 3, seed=1).load_state_dict(state)


def test_bad_arguments_are_named():
    labels = _labels([4] * 5)
    with pytest.raises(ValueError, match=r"classes_per_batch=6 is larger than the number of classes in the data \(5\)"):
        ClassBalancedBatchSampler(labels, 6, 4)
    with pytest.raises(ValueError, match="divisible by num_replicas"):
        ClassBalancedBatchSampler(labels, 5, 2, num_replicas=2)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(labels, 4, 2, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="samples_per_class"):
        ClassBalancedBatchSampler(labels, 4, 2.5)
    with pytest.raises(TypeError, match="labels must be integers"):
        ClassBalancedBatchSampler(np.array([0.5, 1.5]), 1, 1)
    with pytest.raises(ValueError, match="epoch"):
        ClassBalancedBatchSampler(labels, 4, 2).set_epoch(-1)


def test_one_dominant_class_limits_the_epoch_but_keeps_batches_valid():
    labels = _labels([200, 4, 4, 4])
    s = ClassBalancedBatchSampler(labels, 2, 4, seed=0)
    # the three small classes hold one group each: every batch of 2 distinct classes needs one
    # of them or the big class twice, so 3 batches (big + small) are all there is
    assert len(s) == 3 == _brute_max_batches([50, 1, 1, 1], 2)
    _check_batches(list(s), labels, 2, 4)


def test_works_as_a_dataloader_batch_sampler():
    labels = _labels([5] * 9)
    data = TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    s = ClassBalancedBatchSampler(labels, 3, 2, seed=0)
    loader = DataLoader(data, batch_sampler=s)
    got = [idx.tolist() for idx, _ in loader]
    assert got == list(s)
    assert len(loader) == len(s)


def test_sop_sized_epoch_plans_quickly():
    counts = np.random.default_rng(0).integers(2, 13, size=11318)
    s = ClassBalancedBatchSampler(np.repeat(np.arange(11318), counts))
    batches = s.plan()
    assert batches.shape == (len(s), 120)
