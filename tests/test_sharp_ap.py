"""The sharp AP_Q estimator: dense reference, gradients, invariances and accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apretrieval import APLoss, TieAwareAPLoss, average_precision, quantized_ap


@pytest.fixture(autouse=True)
def _float64_default():
    """Every tensor built in this module is float64 (1e-10 comparisons); restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --- dense reference: autograd through explicit (Q, N, M) kernels, written from the math ----


def dense_sharp_ap(scores, relevance, num_bins=20, score_range=(-1.0, 1.0), valid=None):
    """AP_Q of the sharp estimator, (Q,); no positive -> 0. ``valid`` (Q, N): items ranked."""
    s = scores.clamp(*score_range)
    rel = relevance.clone()
    if valid is not None:
        rel &= valid
        s = torch.where(valid, s, torch.full_like(s, -1e3))  # far below: dropped
    relf = rel.to(s.dtype)
    hi = s.max(1).values
    p = s.masked_fill(~rel, math.inf).min(1).values
    t = ((hi[:, None] - s) / ((hi - p) / (num_bins - 3))[:, None]).clamp(0, num_bins - 1)
    w = torch.relu(1 - (t[:, :, None] - torch.arange(num_bins)).abs())  # (Q, N, M)

    def counts_above(h):  # (Q, M) -> mid-tie cumulative with the clamped slope correction
        hp = F.pad(h, (1, 1))
        corr = torch.minimum(torch.maximum((hp[:, 2:] - hp[:, :-2]) / 12, -h / 2), h / 2)
        return h.cumsum(1) - h / 2 - corr

    cq = counts_above((w * relf[:, :, None]).sum(1))
    cn = counts_above((w * (1 - relf)[:, :, None]).sum(1))
    num = (w * cq[:, None, :]).sum(2) + 0.5
    den = (w * cn[:, None, :]).sum(2) + num
    n_pos = relf.sum(1)
    ap = (torch.where(rel, num / den, 0.0)).sum(1) / n_pos.clamp(min=1)
    return torch.where(n_pos > 0, ap, 0.0)


def random_case(q, n, seed, spread=1.0, frac_pos=0.3):
    g = torch.Generator().manual_seed(seed)
    scores = spread * (2 * torch.rand(q, n, generator=g) - 1)
    rel = torch.rand(q, n, generator=g) < frac_pos
    rel[:, 0] = True
    rel[0] = False  # a query without a positive
    return scores, rel


def unit_batch(b, d, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    desc = F.normalize(torch.randn(b, d, generator=g), dim=1)
    return desc, torch.randint(0, classes, (b,), generator=g)


def sharp(scores, rel, num_bins=20, score_range=(-1.0, 1.0)):
    return quantized_ap(scores, rel, num_bins, score_range, estimator="sharp")


# --- value and gradient ----------------------------------------------------------------------


@pytest.mark.parametrize("num_bins", [4, 7, 20])
@pytest.mark.parametrize("spread", [0.8, 1.3])  # 1.3: some scores beyond the range, clamped
def test_fast_equals_dense_values_and_gradients(num_bins, spread):
    scores, rel = random_case(7, 60, seed=num_bins, spread=spread)
    s1, s2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    fast = sharp(s1, rel, num_bins)
    dense = dense_sharp_ap(s2, rel, num_bins)
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)
    w = torch.rand(7, generator=torch.Generator().manual_seed(1))  # any dL/dAP_Q per query
    (fast * w).sum().backward()
    (dense * w).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-10, rtol=0)
    assert s1.grad[0].abs().max() == 0  # the query without a positive


def test_gradcheck():
    scores, rel = random_case(4, 25, seed=3, spread=0.9)
    s = scores.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sharp(x, rel, 8), (s,), eps=1e-6, atol=1e-7)


def test_gradcheck_loss_form():
    desc, labels = unit_batch(10, 4, 3, seed=2)
    d = desc.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: APLoss(num_bins=6, estimator="sharp")(x, labels), (d,), eps=1e-6, atol=1e-7
    )


def test_grid_endpoints_are_differentiated():
    """The estimate is invariant to a positive affine map of a query's scores (the grid follows
    the top score and the lowest positive), so its gradient sums to zero along 1 and along s;
    a gradient that held the grid fixed would not."""
    scores, rel = random_case(5, 50, seed=4, spread=0.5)
    ap = sharp(scores, rel)
    torch.testing.assert_close(sharp(0.3 * scores + 0.2, rel), ap, atol=1e-12, rtol=0)
    s = scores.clone().requires_grad_()
    sharp(s, rel).sum().backward()
    assert s.grad[1:].abs().sum(1).min() > 1e-3
    torch.testing.assert_close(s.grad.sum(1), torch.zeros(5), atol=1e-12, rtol=0)
    torch.testing.assert_close((s.grad * scores).sum(1), torch.zeros(5), atol=1e-12, rtol=0)


# --- properties ------------------------------------------------------------------------------


def test_perfect_ranking_gives_one():
    """All positives above all negatives, with one bin of gap: every count is exact."""
    g = torch.Generator().manual_seed(5)
    pos = 0.5 + 0.4 * torch.rand(3, 10, generator=g)
    gap = (pos.max(1, keepdim=True).values - 0.5) / (20 - 3)  # one bin of this query's grid
    neg = 0.5 - gap - 1.4 * torch.rand(3, 30, generator=g)
    scores = torch.cat([pos, neg], 1)
    rel = torch.cat([torch.ones(3, 10), torch.zeros(3, 30)], 1).bool()
    torch.testing.assert_close(sharp(scores, rel), torch.ones(3), atol=1e-12, rtol=0)
    # a single positive ranked first: 1 as well, whatever lies below
    one = torch.zeros_like(rel)
    one[:, 0] = True
    scores[:, 0] = 0.95
    torch.testing.assert_close(sharp(scores, one), torch.ones(3), atol=1e-12, rtol=0)


def test_permutation_invariance():
    scores, rel = random_case(4, 40, seed=6)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    s1, s2 = scores.clone().requires_grad_(), scores[:, perm].clone().requires_grad_()
    a1, a2 = sharp(s1, rel), sharp(s2, rel[:, perm])
    torch.testing.assert_close(a1, a2, atol=1e-12, rtol=0)
    a1.sum().backward()
    a2.sum().backward()
    torch.testing.assert_close(s1.grad[:, perm], s2.grad, atol=1e-12, rtol=0)


def test_items_below_the_lowest_positive_do_not_matter_beyond_two_bins():
    scores, rel = random_case(3, 40, seed=7, spread=0.5)
    scores = scores + 0.3  # all within [-0.2, 0.8]
    extra = torch.full((3, 25), -0.9)
    ap = sharp(scores, rel)
    more = sharp(torch.cat([scores, extra], 1), torch.cat([rel, torch.zeros(3, 25).bool()], 1))
    torch.testing.assert_close(more, ap, atol=1e-12, rtol=0)


def test_closer_to_exact_ap_than_the_binned_estimators():
    g = np.random.default_rng(0)
    q, n = 40, 1500
    scores = g.normal(g.uniform(0.05, 0.15, (q, 1)), 0.1, (q, n))
    rel = np.zeros((q, n), dtype=bool)
    rel[:, :60] = True
    scores[:, :60] = g.normal(g.uniform(0.2, 0.7, (q, 1)), 0.15, (q, 60))
    s, r = torch.from_numpy(np.clip(scores, -1, 1)), torch.from_numpy(rel)
    exact = average_precision(s, r)
    err = {
        e: (quantized_ap(s, r, 20, estimator=e) - exact).abs().mean().item()
        for e in ("plain", "tie_aware", "sharp")
    }
    assert err["sharp"] < 0.01 < err["tie_aware"] < err["plain"]


def test_float32_follows_float64():
    scores, rel = random_case(5, 200, seed=8)
    a64 = sharp(scores, rel)
    a32 = sharp(scores.float(), rel)
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32.double(), a64, atol=1e-5, rtol=0)


# --- the loss --------------------------------------------------------------------------------


def test_loss_equals_dense_in_batch_and_query_index_forms():
    desc, labels = unit_batch(30, 8, 5, seed=9)
    bank, bank_labels = unit_batch(20, 8, 5, seed=10)
    d1, d2 = desc.clone().requires_grad_(), desc.clone().requires_grad_()
    db_labels = torch.cat([labels, bank_labels])
    fast = APLoss(estimator="sharp", chunk_size=7)(
        d1, labels, torch.cat([d1, bank]), db_labels, query_index=torch.arange(30)
    )
    rel = labels[:, None] == db_labels[None]
    valid = torch.ones_like(rel)
    valid[torch.arange(30), torch.arange(30)] = False
    ap = dense_sharp_ap(d2 @ torch.cat([d2, bank]).T, rel, valid=valid)
    dense = 1 - ap[(rel & valid).any(1)].mean()
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)
    fast.backward()
    dense.backward()
    torch.testing.assert_close(d1.grad, d2.grad, atol=1e-10, rtol=0)
    # with an empty bank it is the batch form
    batch = APLoss(estimator="sharp")(desc, labels)
    same = APLoss(estimator="sharp")(desc, labels, desc, labels, query_index=torch.arange(30))
    torch.testing.assert_close(batch, same, atol=1e-12, rtol=0)


def test_chunked_equals_unchunked():
    desc, labels = unit_batch(25, 8, 4, seed=11)
    d1, d2 = desc.clone().requires_grad_(), desc.clone().requires_grad_()
    a = APLoss(estimator="sharp", chunk_size=3)(d1, labels)
    b = APLoss(estimator="sharp", chunk_size=1000)(d2, labels)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    a.backward()
    b.backward()
    torch.testing.assert_close(d1.grad, d2.grad, atol=1e-12, rtol=0)


def test_queries_without_positive_are_left_out():
    desc, _ = unit_batch(6, 4, 1, seed=12)
    labels = torch.tensor([0, 0, 0, 1, 2, 3])  # only queries 0-2 have a positive
    d = desc.clone().requires_grad_()
    loss = APLoss(estimator="sharp")(d, labels)
    loss.backward()
    scores = desc @ desc.T
    rel = labels[:, None] == labels[None]
    valid = ~torch.eye(6, dtype=torch.bool)
    expected = 1 - dense_sharp_ap(scores, rel, valid=valid)[:3].mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-12, rtol=0)
    assert torch.isfinite(d.grad).all()


def test_loss_decreases_under_gradient_descent():
    desc, labels = unit_batch(64, 16, 8, seed=13)
    w = desc.clone().requires_grad_()
    opt = torch.optim.SGD([w], lr=2.0)
    loss_fn = APLoss(estimator="sharp")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(F.normalize(w, dim=1), labels)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


# --- selection of the estimator --------------------------------------------------------------


def test_estimator_selection_and_aliases():
    scores, rel = random_case(4, 30, seed=14)
    plain = quantized_ap(scores, rel)
    torch.testing.assert_close(quantized_ap(scores, rel, estimator="plain"), plain)
    tie = quantized_ap(scores, rel, tie_aware=True)
    torch.testing.assert_close(quantized_ap(scores, rel, estimator="tie_aware"), tie)
    assert (tie - plain).abs().max() > 1e-3
    desc, labels = unit_batch(20, 8, 4, seed=15)
    torch.testing.assert_close(
        APLoss(estimator="tie_aware")(desc, labels), TieAwareAPLoss()(desc, labels)
    )
    assert APLoss().estimator == "plain" and TieAwareAPLoss().estimator == "tie_aware"
    assert "estimator='sharp'" in repr(APLoss(estimator="sharp"))


def test_bad_estimator_raises_value_error_listing_the_choices():
    scores, rel = random_case(2, 10, seed=16)
    for call in (
        lambda: quantized_ap(scores, rel, estimator="sharpest"),
        lambda: APLoss(estimator="sharpest"),
    ):
        with pytest.raises(ValueError, match="sharpest") as info:
            call()
        for name in ("plain", "tie_aware", "sharp"):
            assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="num_bins"):
        quantized_ap(scores, rel, 3, estimator="sharp")
    with pytest.raises(ValueError, match="tie_aware"):
        quantized_ap(scores, rel, tie_aware=True, estimator="sharp")


# --- AP_Q and exact AP of a training batch (the training log) ---------------------------------


def exact_ap_leave_one_out(desc, labels):
    """Mean over images with a positive of the exact AP of ranking the others, by hand."""
    aps = []
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if j != i]
        order = sorted(others, key=lambda j: -float(desc[i] @ desc[j]))
        hits, ap = 0, 0.0
        for rank, j in enumerate(order, 1):
            if labels[j] == labels[i]:
                hits += 1
                ap += hits / rank
        if hits:
            aps.append(ap / hits)
    return sum(aps) / len(aps)


@pytest.mark.parametrize("estimator", ["plain", "sharp"])
def test_batch_metrics_are_the_exact_ap_and_the_loss_estimate(estimator):
    from apretrieval.losses.batch_ap import batch_ap_metrics

    desc, labels = unit_batch(24, 6, 5, seed=17)
    labels[0] = 99  # one image without a positive: left out of both
    loss_fn = APLoss(estimator=estimator)
    got = batch_ap_metrics(desc, labels, loss_fn)
    assert got["batch_ap"] == pytest.approx(exact_ap_leave_one_out(desc, labels), abs=1e-6)
    assert got["batch_ap_q"] == pytest.approx(1 - loss_fn(desc, labels).item(), abs=1e-6)
    from apretrieval.losses.baselines import ContrastiveLoss

    assert set(batch_ap_metrics(desc, labels, ContrastiveLoss())) == {"batch_ap"}
    assert batch_ap_metrics(desc, torch.arange(24), loss_fn) == {}


def test_training_logs_the_batch_ap_q_and_exact_ap(tmp_path):
    import json

    from PIL import Image

    from apretrieval.train_config import TrainConfig
    from apretrieval.training import train

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        base = rng.random(3) * 255
        for i in range(4):
            arr = np.clip(base + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / f"c{c}" / f"{i}.jpg")
    cfg = TrainConfig(
        data=str(tmp_path / "data"), backbone="resnet18", pretrained=None, out_dim=16,
        batch_size=6, images_per_class=2, chunk_size=6, max_side=24, steps=2, lr=1e-3,
        output_dir=str(tmp_path / "run"), num_workers=0, checkpoint_every=2, progress=False,
    )  # fmt: skip
    run = train(cfg).parent
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0 < r["batch_ap"] <= 1
        # the logged AP_Q is the loss's own estimate on the step's batch: loss = 1 - AP_Q
        assert r["batch_ap_q"] == pytest.approx(1 - r["loss"], abs=1e-5)
