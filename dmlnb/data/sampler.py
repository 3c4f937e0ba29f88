"""Class-balanced batches for deep metric learning: ``P`` classes x ``m`` images per batch.

:class:`ClassBalancedBatchSampler` is a batch sampler (pass it as ``DataLoader(batch_sampler=...)``).
A global batch holds ``classes_per_batch = P`` **distinct** classes with ``samples_per_class = m``
images each (defaults 30 x 4 = 120, docs/method.md; :mod:`dmlnb.defaults`).

The epoch rule (exact)
----------------------
For epoch ``e`` everything is drawn from ``numpy.random.default_rng([seed, e])``:

1. **Groups.** The ``n_c`` images of each class ``c`` are shuffled and cut into
   ``g_c = ceil(n_c / m)`` groups of ``m`` consecutive images of that order. The order is continued
   cyclically to fill the last group, i.e. a short group is padded by re-drawing images of the same
   class: with ``n_c >= m`` the padding images are the first ones of the shuffled order (distinct
   from the short group's own images, a uniform draw without replacement from the rest of the
   class); a class with ``n_c < m`` images repeats each of them ``floor(m / n_c)`` or
   ``ceil(m / n_c)`` times. Every image is thus in exactly one group, once (plus padding repeats).
2. **Number of batches.** ``K`` is the largest number of batches of ``P`` distinct classes that the
   groups can fill: the largest ``k <= G / P`` (``G = sum g_c``) with ``sum_c min(g_c, k) >= k P``.
   It depends only on the class sizes, so ``len(sampler)`` is the same every epoch.
3. **Kept groups.** A class cannot appear in more than ``K`` batches, so only its first
   ``min(g_c, K)`` groups can be used; of those, ``sum_c min(g_c, K) - K P`` groups chosen uniformly
   at random are set aside too. Each class keeps its first ``k_c`` groups (the padded, short group
   is its last, so it is the first to be set aside). With balanced data fewer than ``P`` groups
   (``< P m`` images) are set aside per epoch, and they differ from epoch to epoch.
4. **Packing.** Batch by batch, with ``R`` batches left (this one included): a class with ``R``
   groups left must be in every remaining batch and is taken; the other places are drawn from the
   classes with groups left, without replacement, with probability proportional to their number
   of groups left (Gumbel top-k). Every batch therefore has ``P`` distinct classes and all kept
   groups are used exactly once. The classes of a batch are then put in random order.
5. ``drop_last=False``: the groups set aside in step 3 are packed the same way into
   ``max(ceil(L / P), max_c l_c)`` extra batches (``L`` groups left, ``l_c`` per class), each short
   batch completed to ``P`` distinct classes with a random group of classes not yet in it (those
   images are then seen twice). All batches are shuffled together. Every image is seen at least
   once; the batch count may then vary by one or two between epochs.

Distributed data parallel
-------------------------
``classes_per_batch`` is the **global** batch, so results do not depend on the number of
processes. Every rank builds the same plan (the seed does not involve the rank) and takes a
disjoint share of every global batch: rank ``r`` of ``W`` gets the classes
``[r P / W, (r + 1) P / W)`` of the batch with all their ``m`` images (``P`` must be divisible by
``W``), so every rank has the same number of batches, per-rank losses see complete classes, and an
all-gather of the embeddings recovers the global batch.

Each batch lists its classes' images consecutively: ``[c1 x m, c2 x m, ...]``.

Call :meth:`~ClassBalancedBatchSampler.set_epoch` before each epoch (as with
``DistributedSampler``); the same ``(seed, epoch)`` gives the same batches.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from dmlnb._validate import check_positive_int
from dmlnb.defaults import CLASSES_PER_BATCH, SAMPLES_PER_CLASS


def max_full_batches(groups_per_class: np.ndarray, classes_per_batch: int) -> int:
    """Largest ``k`` with ``sum_c min(g_c, k) >= k * P``: batches of ``P`` distinct classes.

    Classic feasibility rule: ``k`` batches of ``P`` distinct classes can be filled from classes
    holding ``g_c`` groups iff each class contributes at most ``k`` groups and those suffice.
    """
    g = np.sort(np.asarray(groups_per_class, dtype=np.int64))
    total = int(g.sum())
    p = int(classes_per_batch)
    if total < p:
        return 0
    ks = np.arange(total // p + 1, dtype=np.int64)
    # sum_c min(g_c, k) = (sum of g_c < k) + k * #(g_c >= k), for every k at once
    below = np.searchsorted(g, ks, side="left")
    csum = np.concatenate([[0], np.cumsum(g)])
    filled = csum[below] + ks * (len(g) - below)
    ok = np.flatnonzero(filled >= ks * p)
    return int(ok.max())


def _pack(
    counts: np.ndarray, n_batches: int, per_batch: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Place ``counts[c]`` groups of each class into ``n_batches`` batches of distinct classes.

    Requires ``max(counts) <= n_batches`` and ``sum(counts) <= n_batches * per_batch``; every batch
    gets ``min(per_batch, classes with groups left)`` classes (step 4 of the module docstring).
    """
    remaining = counts.astype(np.int64).copy()
    batches = []
    for b in range(n_batches):
        left = n_batches - b
        forced = np.flatnonzero(remaining == left)
        free = np.flatnonzero((remaining > 0) & (remaining < left))
        need = min(per_batch - len(forced), len(free))
        if need > 0:
            # Gumbel top-k: sampling without replacement, probability proportional to groups left
            keys = np.log(remaining[free]) - np.log(-np.log(rng.random(len(free))))
            pick = free[np.argpartition(-keys, need - 1)[:need]] if need < len(free) else free
            chosen = np.concatenate([forced, pick])
        else:
            chosen = forced
        remaining[chosen] -= 1
        batches.append(rng.permutation(chosen))
    return batches


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` distinct classes x ``samples_per_class`` images.

    Parameters
    ----------
    labels : array-like of int, shape (N,)
        Class of every item of the data set (any integers; need not be contiguous).
    classes_per_batch : int, default 30
        ``P``, distinct classes per **global** batch (over all ranks). PAPER/REPRO: 30.
    samples_per_class : int, default 4
        ``m``, images per class in a batch (field convention). Classes with fewer images are
        padded by repeating their images (module docstring, step 1).
    seed : int, default 0
        With the epoch, the only source of randomness: ``numpy.random.default_rng([seed, epoch])``.
    num_replicas, rank : int, default 1, 0
        Data-parallel world size and this process's rank; each rank yields its disjoint share
        (``P / num_replicas`` classes) of every global batch.
    drop_last : bool, default True
        Set aside the groups that cannot fill a batch of ``P`` distinct classes (fewer than ``P``
        groups per epoch on balanced data). ``False`` packs them into extra, completed batches.

    Notes
    -----
    The exact epoch rule is in the module docstring. :meth:`state_dict` records how many batches
    this iterator has handed out in the current epoch; a DataLoader with workers prefetches
    batches, so a trainer that resumes mid-epoch should store the number of batches it has
    actually *consumed* in ``state["batch"]`` before saving.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        classes_per_batch: int = CLASSES_PER_BATCH,
        samples_per_class: int = SAMPLES_PER_CLASS,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        self.classes_per_batch = check_positive_int("classes_per_batch", classes_per_batch)
        self.samples_per_class = check_positive_int("samples_per_class", samples_per_class)
        self.num_replicas = check_positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} must be an integer in [0, num_replicas={num_replicas})")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {drop_last!r}")
        if classes_per_batch % num_replicas:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} must be divisible by "
                f"num_replicas={num_replicas}: each rank gets an equal share of the batch's classes"
            )
        self.rank, self.seed, self.drop_last = rank, int(seed), drop_last

        self.class_values, self._inverse, self._counts = np.unique(
            labels, return_inverse=True, return_counts=True
        )
        n_classes = len(self.class_values)
        if n_classes < classes_per_batch:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} is larger than the number of classes in "
                f"the data ({n_classes}); a batch needs that many distinct classes: lower "
                f"classes_per_batch to at most {n_classes}"
            )
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._groups = -(-self._counts // samples_per_class)  # ceil(n_c / m)
        self._gstarts = np.concatenate([[0], np.cumsum(self._groups)[:-1]])
        self._full = max_full_batches(self._groups, classes_per_batch)
        if self._full == 0:
            raise ValueError(
                f"the data cannot fill one batch of {classes_per_batch} distinct classes"
            )
        self._fingerprint = zlib.crc32(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        self.epoch = 0
        self._start = 0  # batch to start from at the next __iter__ (resume)
        self._yielded = 0
        self._cache: tuple[int, np.ndarray] | None = None

    # --- the plan ---------------------------------------------------------------------------------
    def _global_plan(self, epoch: int) -> np.ndarray:
        """All global batches of ``epoch`` as an int64 array ``[n_batches, P, m]`` of indices."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        p, m = self.classes_per_batch, self.samples_per_class
        rng = np.random.default_rng([self.seed, epoch])
        n_classes = len(self._counts)
        # 1. groups: each class's images shuffled, cut into groups of m, continued cyclically
        order = np.lexsort((rng.random(len(self._inverse)), self._inverse))
        group_class = np.repeat(np.arange(n_classes), self._groups)
        group_pos = np.arange(len(group_class)) - self._gstarts[group_class]
        slot = group_pos[:, None] * m + np.arange(m)[None, :]
        members = order[
            self._starts[group_class][:, None] + slot % self._counts[group_class][:, None]
        ]
        # 2-3. kept groups: at most K per class, then a uniform draw sets the surplus aside
        k = self._full
        cap = np.minimum(self._groups, k)
        owners = np.repeat(np.arange(n_classes), cap)
        surplus = len(owners) - k * p
        drop = rng.choice(len(owners), size=surplus, replace=False)
        kept = cap - np.bincount(owners[drop], minlength=n_classes)
        # 4. packing
        used = np.zeros(n_classes, dtype=np.int64)
        batches = []
        for chosen in _pack(kept, k, p, rng):
            batches.append(self._gstarts[chosen] + used[chosen])
            used[chosen] += 1
        # 5. leftovers
        if not self.drop_last:
            left = self._groups - kept
            total = int(left.sum())
            if total:
                n_extra = max(-(-total // p), int(left.max()))
                for chosen in _pack(left, n_extra, p, rng):
                    gids = self._gstarts[chosen] + used[chosen]
                    used[chosen] += 1
                    if len(chosen) < p:
                        absent = np.setdiff1d(np.arange(n_classes), chosen)
                        extra = rng.choice(absent, size=p - len(chosen), replace=False)
                        pick = self._gstarts[extra] + rng.integers(0, self._groups[extra])
                        gids = rng.permutation(np.concatenate([gids, pick]))
                    batches.append(gids)
        plan = members[np.stack(batches)]  # [n_batches, P, m]
        plan = plan[rng.permutation(len(plan))]
        self._cache = (epoch, plan)
        return plan

    def plan(self, epoch: int | None = None) -> np.ndarray:
        """This rank's batches of ``epoch`` (default: the current one) as ``[n_batches, B]``."""
        plan = self._global_plan(self.epoch if epoch is None else epoch)
        share = self.classes_per_batch // self.num_replicas
        mine = plan[:, self.rank * share : (self.rank + 1) * share, :]
        return mine.reshape(len(plan), share * self.samples_per_class)

    # --- Sampler protocol -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        batches = self.plan()
        start, self._start = self._start, 0
        for b in range(start, len(batches)):
            self._yielded = b + 1
            yield batches[b].tolist()

    def __len__(self) -> int:
        """Batches per epoch (per rank: the same on every rank)."""
        if self.drop_last:
            return self._full
        return len(self._global_plan(self.epoch))

    @property
    def batch_size(self) -> int:
        """Images per batch on this rank: ``P / num_replicas * m``."""
        return self.classes_per_batch // self.num_replicas * self.samples_per_class

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses (deterministic in seed, epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer")
        self.epoch = int(epoch)
        self._start = 0
        self._yielded = 0

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batch", ...}``: ``batch`` batches of ``epoch`` have been handed out."""
        return {
            "epoch": self.epoch,
            "batch": self._yielded,
            "seed": self.seed,
            "classes_per_batch": self.classes_per_batch,
            "samples_per_class": self.samples_per_class,
            "num_replicas": self.num_replicas,
            "drop_last": self.drop_last,
            "labels_crc32": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields batch ``state["batch"]`` of its epoch.

        The sampler must have been built with the same labels and settings; a mismatch raises a
        ValueError naming the differing fields (``rank`` may differ: each rank resumes its share).
        """
        fields = ("seed", "classes_per_batch", "samples_per_class", "num_replicas", "drop_last")
        mine = self.state_dict()
        differ = [f for f in (*fields, "labels_crc32") if f in state and state[f] != mine[f]]
        if differ:
            pairs = ", ".join(f"{f}: saved {state[f]!r} vs now {mine[f]!r}" for f in differ)
            raise ValueError(f"sampler state does not match this sampler ({pairs})")
        self.set_epoch(int(state["epoch"]))
        batch = int(state.get("batch", 0))
        if not 0 <= batch <= len(self):
            raise ValueError(f"state['batch']={batch} is out of range [0, {len(self)}]")
        self._start = self._yielded = batch


def epoch_coverage(sampler: ClassBalancedBatchSampler, epoch: int | None = None) -> np.ndarray:
    """How often each item index appears in ``epoch``'s global batches (a diagnostic)."""
    plan = sampler._global_plan(sampler.epoch if epoch is None else epoch)
    return np.bincount(plan.ravel(), minlength=len(sampler._inverse))


__all__ = ["ClassBalancedBatchSampler", "epoch_coverage", "max_full_batches"]
