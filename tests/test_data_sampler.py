"""Class-balanced batches and the exactly restorable sampler state."""

from __future__ import annotations

import numpy as np
import pytest

from apretrieval.data.sampler import ClassBalancedBatchSampler

LABELS = np.repeat(np.arange(10), [5, 6, 2, 3, 8, 4, 1, 5, 7, 9])  # class 6 has 1 image


def test_batches_hold_c_classes_with_k_images_each():
    s = ClassBalancedBatchSampler(LABELS, batch_size=12, images_per_class=3, seed=1)
    for step in range(20):
        b = s.batch(step)
        assert b.shape == (12,)
        groups = LABELS[b].reshape(4, 3)
        assert (groups == groups[:, :1]).all()  # K consecutive images of one class
        assert 6 not in LABELS[b]  # a class with one image would have no positive
        for g, idx in zip(groups[:, 0], b.reshape(4, 3), strict=True):
            if (LABELS == g).sum() >= 3:
                assert len(set(idx.tolist())) == 3  # without replacement when possible


def test_every_class_once_per_epoch():
    s = ClassBalancedBatchSampler(LABELS, batch_size=6, images_per_class=2, seed=3)
    assert s.num_classes == 9
    # 3 batches x 3 classes = one epoch of the 9 eligible classes.
    seen = np.concatenate([s.batch_classes(t) for t in range(3)])
    assert sorted(seen.tolist()) == list(range(9))


def test_epoch_boundary_never_repeats_a_class_and_rotates_who_sits_out():
    # 9 drawable classes, 4 per batch: 2 batches per epoch, one class sits out each epoch.
    s = ClassBalancedBatchSampler(LABELS, batch_size=8, images_per_class=2, seed=7)
    drawable = np.array([c for c in range(10) if c != 6])  # batch_classes indexes these
    out = []
    for epoch in range(12):
        steps = [s.batch_classes(2 * epoch + j) for j in range(2)]
        for cls in steps:
            assert len(set(cls.tolist())) == 4  # no class twice in a batch
        in_epoch = np.concatenate(steps)
        assert len(set(in_epoch.tolist())) == 8  # distinct within the epoch, boundary included
        (missing,) = set(range(9)) - {int(c) for c in in_epoch}
        out.append(missing)
        for t in (2 * epoch, 2 * epoch + 1):  # the images follow the classes
            want = np.sort(drawable[s.batch_classes(t)])
            assert np.array_equal(np.unique(LABELS[s.batch(t)]), want)
    assert len(set(out)) > 3  # a different class sits out from epoch to epoch


def test_deterministic_and_seed_dependent():
    a = ClassBalancedBatchSampler(LABELS, 8, 2, seed=0)
    b = ClassBalancedBatchSampler(LABELS, 8, 2, seed=0)
    c = ClassBalancedBatchSampler(LABELS, 8, 2, seed=1)
    assert all(np.array_equal(a.batch(t), b.batch(t)) for t in range(10))
    assert any(not np.array_equal(a.batch(t), c.batch(t)) for t in range(10))


def test_state_restore_continues_the_exact_stream():
    full = list(ClassBalancedBatchSampler(LABELS, 8, 2, seed=5, steps=12))
    first = ClassBalancedBatchSampler(LABELS, 8, 2, seed=5, steps=12)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    assert state["step"] == 5 and all(isinstance(v, int) for v in state.values())
    second = ClassBalancedBatchSampler(LABELS, 8, 2, seed=0, steps=12)
    second.load_state_dict(state)
    assert len(second) == 7
    assert head + list(second) == full
    other = ClassBalancedBatchSampler(LABELS, 12, 2, seed=5)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_more_classes_per_batch_than_classes():
    s = ClassBalancedBatchSampler([0, 0, 1, 1, 1], batch_size=8, images_per_class=2)
    b = s.batch(0)
    assert b.shape == (8,) and set(np.asarray([0, 0, 1, 1, 1])[b].tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 7, "images_per_class": 2}, {"batch_size": 4, "images_per_class": 0}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ClassBalancedBatchSampler(LABELS, **kwargs)
    with pytest.raises(ValueError, match="no class"):
        ClassBalancedBatchSampler([0, 1, 2], 4, 2)
