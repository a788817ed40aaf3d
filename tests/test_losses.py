"""Properties of the AP losses: the fast path equals the dense definition, values and gradients."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apretrieval import APLoss, TieAwareAPLoss, average_precision, quantized_ap
from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss


@pytest.fixture(autouse=True)
def _float64_default():
    """Every tensor built in this module is float64 (1e-10 comparisons); restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --- dense reference: autograd through the explicit (Q, M, N) soft assignment ---------------


def dense_quantized_ap(
    scores, relevance, num_bins=20, score_range=(-1.0, 1.0), tie_aware=False, valid=None
):
    low, high = score_range
    delta = (high - low) / (num_bins - 1)
    centres = torch.linspace(high, low, num_bins, dtype=scores.dtype)
    s = scores.clamp(low, high)
    soft = torch.relu(1 - (s[:, None, :] - centres[None, :, None]).abs() / delta)  # (Q, M, N)
    rel = relevance.to(scores.dtype)
    if valid is not None:
        soft = soft * valid[:, None, :].to(scores.dtype)
        rel = rel * valid.to(scores.dtype)
    pos = (soft * rel[:, None, :]).sum(2)
    alls = soft.sum(2)
    a, c = (0.5, 0.5) if tie_aware else (0.0, 0.0)
    num = pos.cumsum(1) - a * pos + c
    den = alls.cumsum(1) - a * alls + c
    prec = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(den))
    n_pos = rel.sum(1, keepdim=True)
    d_rec = torch.where(n_pos > 0, pos / n_pos.clamp(min=1), torch.zeros_like(pos))
    return (prec * d_rec).sum(1)


def dense_ap_loss(desc, labels, num_bins=20, tie_aware=False, db=None, db_labels=None):
    if db is None:
        scores = desc @ desc.T
        rel = labels[:, None] == labels[None, :]
        valid = ~torch.eye(len(labels), dtype=torch.bool)
    else:
        scores = desc @ db.T
        rel = labels[:, None] == db_labels[None, :]
        valid = None
    ap = dense_quantized_ap(scores, rel, num_bins, tie_aware=tie_aware, valid=valid)
    has_pos = (rel if valid is None else rel & valid).any(1)
    return 1 - ap[has_pos].mean()


def away_from_centres(x, num_bins, score_range, margin=1e-3):
    """Nudge values off bin centres and range ends, where the kernel has kinks."""
    low, high = score_range
    delta = (high - low) / (num_bins - 1)
    t = (high - x) / delta
    near = (t - t.round()).abs() < margin
    return torch.where(near, x + 3 * margin * delta, x)


def random_case(q, n, num_bins, score_range, seed, spread=1.3, ties=False):
    g = torch.Generator().manual_seed(seed)
    low, high = score_range
    mid, half = (low + high) / 2, (high - low) / 2
    scores = mid + spread * half * (2 * torch.rand(q, n, generator=g) - 1)
    if ties:  # repeat some values exactly
        scores[:, n // 2 :] = scores[:, : n - n // 2]
    scores = away_from_centres(scores, num_bins, score_range)
    rel = torch.rand(q, n, generator=g) < 0.3
    rel[0] = False  # no positive
    rel[1] = False
    rel[1, 3] = True  # exactly one
    rel[2] = True  # all positives
    return scores, rel


CASES = [(20, (-1.0, 1.0)), (2, (-1.0, 1.0)), (7, (0.0, 1.0)), (50, (-0.3, 0.8))]


@pytest.mark.parametrize("tie_aware", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("num_bins", "score_range"), CASES)
def test_fast_equals_dense_values_and_gradients(num_bins, score_range, ties, tie_aware):
    scores, rel = random_case(6, 40, num_bins, score_range, seed=num_bins, ties=ties)
    s1 = scores.clone().requires_grad_()
    s2 = scores.clone().requires_grad_()
    fast = quantized_ap(s1, rel, num_bins, score_range, tie_aware=tie_aware)
    dense = dense_quantized_ap(s2, rel, num_bins, score_range, tie_aware=tie_aware)
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)
    w = torch.linspace(0.5, 1.5, len(fast))  # a non-uniform upstream gradient
    (fast * w).sum().backward()
    (dense * w).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-10, rtol=0)
    assert fast[0] == 0 and (s1.grad[0] == 0).all()  # no positive: AP 0, no gradient


@pytest.mark.parametrize("tie_aware", [False, True])
def test_gradcheck(tie_aware):
    scores, rel = random_case(4, 12, 10, (-1.0, 1.0), seed=3, spread=0.95)
    scores = away_from_centres(scores, 10, (-1.0, 1.0), margin=1e-2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: quantized_ap(s, rel, 10, (-1.0, 1.0), tie_aware=tie_aware),
        (scores,),
        eps=1e-6,
        atol=1e-7,
    )


def test_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    desc = torch.nn.functional.normalize(torch.randn(10, 5, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    desc.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda d: APLoss(num_bins=8)(d, labels), (desc,), eps=1e-6, atol=1e-6
    )


def _separated_case(n=60, queries=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    # n distinct levels 2/n apart, shuffled per query
    levels = 1 - 2 * torch.arange(n) / n
    scores = torch.stack([levels[torch.randperm(n, generator=g)] for _ in range(queries)])
    rel = torch.rand(queries, n, generator=g) < 0.25
    rel[:, 0] = True
    return scores, rel, torch.as_tensor(average_precision(scores, rel))


def test_ap_q_equals_exact_ap_once_bins_separate_the_scores():
    scores, rel, exact = _separated_case()
    err = {m: (quantized_ap(scores, rel, m) - exact).abs().max().item() for m in (5, 16, 61, 121)}
    # levels sit on bin centres when (M - 1) is a multiple of 60: one item per bin, AP_Q = AP
    assert err[61] < 1e-12 and err[121] < 1e-12
    assert err[5] > err[16] > 1e-3


def test_tie_aware_ap_q_tends_to_exact_ap_with_more_bins():
    # Off bin centres an item is split over two bins; the tie-aware precision reads such a
    # split as a tie and converges, where the plain AP_Q keeps an O(1/rank) bias.
    scores, rel, exact = _separated_case()
    scores = scores + 0.37 / 60  # off every centre
    errors = [
        (quantized_ap(scores, rel, m, tie_aware=True) - exact).abs().mean().item()
        for m in (5, 20, 50, 1000)
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-3


@pytest.mark.parametrize("tie_aware", [False, True])
def test_perfect_ranking_gives_one(tie_aware):
    # positives in the top bins, negatives strictly lower bins: never sharing a bin
    pos = torch.tensor([0.99, 0.9, 0.75])
    neg = torch.tensor([0.2, -0.5, -0.99, 0.3])
    scores = torch.cat([neg, pos])[None]
    rel = torch.tensor([[False] * 4 + [True] * 3])
    ap = quantized_ap(scores, rel, 20, tie_aware=tie_aware)
    torch.testing.assert_close(ap, torch.ones(1))


def test_tie_aware_is_above_plain_when_a_bin_mixes_labels():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    rel = torch.tensor([[True, False, True, False]])
    plain = quantized_ap(scores, rel, 5)
    tied = quantized_ap(scores, rel, 5, tie_aware=True)
    torch.testing.assert_close(plain, torch.tensor([0.5]))  # every tied item counted before
    assert tied.item() > plain.item()


def test_permutation_invariance():
    scores, rel = random_case(5, 30, 20, (-1.0, 1.0), seed=7)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    permuted = quantized_ap(scores[:, perm], rel[:, perm])
    torch.testing.assert_close(quantized_ap(scores, rel), permuted)


def unit_batch(b, d, classes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    desc = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype)
    labels = torch.randint(0, classes, (b,), generator=g)
    return desc, labels


@pytest.mark.parametrize("loss_cls", [APLoss, TieAwareAPLoss])
def test_batch_loss_equals_dense(loss_cls):
    desc, labels = unit_batch(37, 16, 6)
    d1, d2 = desc.clone().requires_grad_(), desc.clone().requires_grad_()
    fast = loss_cls(num_bins=20, chunk_size=5)(d1, labels)
    dense = dense_ap_loss(d2, labels, 20, tie_aware=loss_cls.tie_aware)
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)
    fast.backward()
    dense.backward()
    torch.testing.assert_close(d1.grad, d2.grad, atol=1e-10, rtol=0)


def test_chunked_equals_unchunked():
    desc, labels = unit_batch(50, 8, 7, seed=2)
    results = []
    for chunk in (1, 7, 50, None):
        d = desc.clone().requires_grad_()
        loss = APLoss(chunk_size=chunk)(d, labels)
        loss.backward()
        results.append((loss.detach(), d.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-12, rtol=0)


def test_query_database_form_equals_dense_and_gradients_reach_both():
    q, ql = unit_batch(9, 12, 4, seed=3)
    x, xl = unit_batch(31, 12, 4, seed=4)
    q1, x1 = q.clone().requires_grad_(), x.clone().requires_grad_()
    q2, x2 = q.clone().requires_grad_(), x.clone().requires_grad_()
    fast = APLoss(chunk_size=4)(q1, ql, x1, xl)
    dense = dense_ap_loss(q2, ql, db=x2, db_labels=xl)
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)
    fast.backward()
    dense.backward()
    torch.testing.assert_close(q1.grad, q2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=0)


def test_query_database_form_equals_batch_form_minus_self():
    desc, labels = unit_batch(20, 6, 4, seed=5)
    batch = APLoss()(desc, labels)
    per_query = []
    for i in range(20):
        keep = torch.arange(20) != i
        one = desc[i : i + 1], labels[i : i + 1], desc[keep], labels[keep]
        if (labels[keep] == labels[i]).any():
            per_query.append(1 - APLoss()(*one))
    torch.testing.assert_close(batch, 1 - torch.stack(per_query).mean(), atol=1e-12, rtol=0)


def test_query_index_form_equals_batch_form_with_gradients_through_both_roles():
    desc, labels = unit_batch(24, 8, 5, seed=9)
    bank, bank_labels = unit_batch(30, 8, 5, seed=10)
    d1, d2 = desc.clone().requires_grad_(), desc.clone().requires_grad_()
    # batch + bank with each query's own column excluded == dense reference on the same sets
    db = torch.cat([d1, bank])
    fast = APLoss(chunk_size=7)(
        d1, labels, db, torch.cat([labels, bank_labels]), query_index=torch.arange(24)
    )
    scores = d2 @ torch.cat([d2, bank]).T
    rel = labels[:, None] == torch.cat([labels, bank_labels])[None]
    valid = torch.ones_like(rel)
    valid[torch.arange(24), torch.arange(24)] = False
    ap = dense_quantized_ap(scores, rel, valid=valid)
    dense = 1 - ap[(rel & valid).any(1)].mean()
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)
    fast.backward()
    dense.backward()
    torch.testing.assert_close(d1.grad, d2.grad, atol=1e-10, rtol=0)
    # with an empty bank it is exactly the batch form
    same = APLoss()(desc, labels, desc, labels, query_index=torch.arange(24))
    torch.testing.assert_close(same, APLoss()(desc, labels), atol=1e-12, rtol=0)


def test_queries_without_positive_are_left_out_and_all_missing_is_an_error():
    desc, _ = unit_batch(6, 4, 1)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])  # only queries 0 and 1 have a positive
    d = desc.clone().requires_grad_()
    loss = APLoss()(d, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(d.grad).all()
    torch.testing.assert_close(loss, dense_ap_loss(desc, labels))
    with pytest.raises(ValueError, match="no query has a positive"):
        APLoss()(desc, torch.arange(6))


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` (half precision) is ``want`` (float32) rounded once: at most one unit in the
    last place of ``got``'s dtype apart (subnormal spacing as the floor)."""
    info = torch.finfo(got.dtype)
    spacing = info.eps * want.abs() + info.smallest_normal * info.eps
    gap = (got.float() - want).abs()
    assert (gap <= spacing).all(), f"max gap {gap.max():.3g} ulps {(gap / spacing).max():.2f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    """Half-precision descriptors give the float32 loss and gradient of the same (rounded)
    inputs, rounded once to the input dtype. Accumulating the histograms in the half type
    would be many units in the last place away."""
    desc, labels = unit_batch(64, 32, 8, seed=6)
    rounded = desc.to(dtype)
    r = rounded.float().requires_grad_()
    ref = APLoss()(r, labels)
    ref.backward()
    d = rounded.clone().requires_grad_()
    loss = APLoss()(d, labels)
    loss.backward()
    assert loss.dtype == dtype and d.grad.dtype == dtype
    assert_within_one_ulp(loss.detach(), ref.detach())
    assert_within_one_ulp(d.grad, r.grad)


def test_no_grad_forward_skips_gradient_work(monkeypatch):
    import apretrieval.losses.ap as ap_module

    desc, labels = unit_batch(16, 4, 3)
    leaf = desc.clone().requires_grad_()
    asked = []  # need_grad of each loss computation (the gradient is computed with the loss)
    original = ap_module._ap_loss_and_grads

    def spy(*args, **kwargs):
        asked.append(args[7])
        return original(*args, **kwargs)

    monkeypatch.setattr(ap_module, "_ap_loss_and_grads", spy)
    with torch.no_grad():
        loss = APLoss()(leaf, labels)
    torch.testing.assert_close(loss, dense_ap_loss(desc, labels))
    assert loss.grad_fn is None and asked == [False]
    APLoss()(leaf, labels)
    assert asked == [False, True]  # the same probe sees the work when it is needed


def test_loss_decreases_under_gradient_descent():
    desc, labels = unit_batch(64, 16, 8, seed=8)
    w = desc.clone().requires_grad_()
    opt = torch.optim.SGD([w], lr=2.0)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = APLoss()(torch.nn.functional.normalize(w, dim=1), labels)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# --- bad input ------------------------------------------------------------------------------


def test_bad_input_raises_value_error():
    s, r = torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        quantized_ap(s, r[:, :3])
    with pytest.raises(ValueError, match="NaN/inf"):
        quantized_ap(torch.tensor([[0.1, float("nan")]]), r[:1, :2])
    with pytest.raises(ValueError, match="NaN/inf"):
        quantized_ap(torch.tensor([[0.1, float("inf")]]), r[:1, :2])
    with pytest.raises(ValueError, match="empty"):
        quantized_ap(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_bins"):
        quantized_ap(s, r, num_bins=1)
    with pytest.raises(ValueError, match="score_range"):
        quantized_ap(s, r, score_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="score_range"):
        APLoss(score_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="num_bins"):
        APLoss(num_bins=1)
    with pytest.raises(ValueError, match="empty"):
        APLoss()(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        APLoss()(torch.zeros(5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN/inf"):
        APLoss()(torch.full((5, 4), float("nan")), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dimension"):
        APLoss()(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, 5), torch.zeros(3))


def test_query_database_form_argument_errors():
    q, ql = F.normalize(torch.randn(3, 4), dim=1), torch.tensor([0, 1, 2])
    db, dbl = F.normalize(torch.randn(5, 4), dim=1), torch.tensor([0, 1, 2, 0, 1])
    loss = APLoss()
    with pytest.raises(ValueError, match="both database and database_labels"):
        loss(q, ql, db)  # a database without its labels
    with pytest.raises(ValueError, match="both database and database_labels"):
        loss(q, ql, None, dbl)
    for bad in ([0, 1, 5], [-1, 0, 1], [0, 1]):  # past the end, negative, wrong length
        with pytest.raises(ValueError, match="query_index"):
            loss(q, ql, db, dbl, query_index=torch.tensor(bad))
    with pytest.raises(ValueError, match="query/database form only"):
        loss(q, ql, query_index=torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss(q, ql, db, dbl, query_index=torch.tensor([0, 1, 4])))
    for bad in (0, -3, 2.5, "8"):
        with pytest.raises(ValueError, match="chunk_size"):
            APLoss(chunk_size=bad)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        APLoss(memory_budget_mb=-1)


# --- exact AP -------------------------------------------------------------------------------


def test_average_precision_reference_values_numpy_and_torch():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    rel = np.array([[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=bool)
    expected = np.array([(1 / 1 + 2 / 3) / 2, 1 / 5])
    np.testing.assert_allclose(average_precision(scores, rel), expected)
    out = average_precision(torch.tensor(scores), torch.tensor(rel))
    np.testing.assert_allclose(out.numpy(), expected)
    assert np.isnan(average_precision(scores[:1], np.zeros((1, 5), bool))[0])


# --- baselines ------------------------------------------------------------------------------


def test_baselines_zero_when_classes_are_perfectly_separated():
    labels = torch.tensor([0, 0, 1, 1])
    desc = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert ContrastiveLoss(margin=0.7)(desc, labels).item() == 0
    assert TripletLoss(margin=0.1)(desc, labels).item() == 0
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, -1.0]])
    assert ContrastiveLoss()(mixed, labels).item() > 0
    assert TripletLoss()(mixed, labels).item() > 0


# Five points on a plane, classes 0, 0, 0, 1, 1, with distances small enough to do by hand:
#   d(0,1)=1  d(0,2)=3  d(1,2)=2  d(3,4)=sqrt(20)             (positive pairs)
#   d(0,3)=2  d(0,4)=4  d(1,3)=sqrt(5)  d(1,4)=3  d(2,3)=sqrt(13)  d(2,4)=1   (negative pairs)
HAND = torch.tensor(
    [[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [4.0, 0.0]], dtype=torch.float64
)
HAND_LABELS = torch.tensor([0, 0, 0, 1, 1])


def test_triplet_hand_computed_batch_hard():
    r5, r20 = 5**0.5, 20**0.5
    # anchor: (farthest positive, nearest negative)
    hardest = [(3, 2), (2, r5), (3, 1), (r20, 2), (r20, 1)]
    for margin in (0.1, 0.5):
        want = sum(max(0.0, margin + p - n) for p, n in hardest) / 5
        got = TripletLoss(margin=margin)(HAND, HAND_LABELS)
        assert got.item() == pytest.approx(want, abs=1e-12)
    # anchor 1 is the one clamped at margin 0.1 (0.1 + 2 - sqrt 5 < 0): its term is 0
    assert TripletLoss(margin=0.1)(HAND, HAND_LABELS).item() == pytest.approx(
        (1.1 + 2.1 + (0.1 + r20 - 2) + (0.1 + r20 - 1)) / 5, abs=1e-12
    )


def test_contrastive_hand_computed_hard_negatives():
    r5 = 5**0.5
    pos = 2 * 0.5 * (1 + 9 + 4 + 20)  # every positive pair, both directions: 0.5 d^2
    # negatives of each anchor, nearest first
    negs = [(2, 4), (r5, 3), (1, 13**0.5), (2, r5, 13**0.5), (1, 3, 4)]
    margin = 2.5
    for num_hard in (1, 2, 3):
        chosen = [d for n in negs for d in n[:num_hard]]
        want = (pos + sum(0.5 * max(0.0, margin - d) ** 2 for d in chosen)) / (8 + len(chosen))
        got = ContrastiveLoss(margin=margin, num_hard=num_hard)(HAND, HAND_LABELS)
        assert got.item() == pytest.approx(want, abs=1e-12), num_hard
    # num_hard=1 by hand: anchors 0..4 take 2, sqrt 5, 1, 2, 1
    one = (pos + 0.5 * (0.5**2 + (2.5 - r5) ** 2 + 1.5**2 + 0.5**2 + 1.5**2)) / 13
    assert ContrastiveLoss(margin=2.5, num_hard=1)(HAND, HAND_LABELS).item() == pytest.approx(
        one, abs=1e-12
    )


def looped_contrastive(desc, labels, margin, num_hard):
    terms = []
    for i in range(len(labels)):
        negs = []
        for j in range(len(labels)):
            d = torch.linalg.vector_norm(desc[i] - desc[j])
            if j != i and labels[j] == labels[i]:
                terms.append(0.5 * d**2)
            elif labels[j] != labels[i]:
                negs.append(d)
        negs.sort(key=lambda t: t.item())
        terms += [0.5 * torch.clamp(margin - d, min=0) ** 2 for d in negs[:num_hard]]
    return torch.stack(terms).mean()


def looped_triplet(desc, labels, margin):
    terms = []
    for i in range(len(labels)):
        d = [torch.linalg.vector_norm(desc[i] - desc[j]) for j in range(len(labels))]
        p = [d[j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        n = [d[j] for j in range(len(labels)) if labels[j] != labels[i]]
        if p and n:
            terms.append(torch.clamp(margin + max(p, key=float) - min(n, key=float), min=0))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", range(4))
def test_baselines_equal_looped_references_values_and_gradients(seed):
    desc, labels = unit_batch(14, 6, 4, seed=20 + seed)
    labels[0] = 9  # an anchor without positive (skipped by triplet, only negatives otherwise)
    cases = [
        (
            ContrastiveLoss(margin=0.9, num_hard=3),
            partial(looped_contrastive, margin=0.9, num_hard=3),
        ),
        (
            ContrastiveLoss(margin=1.3, num_hard=20),
            partial(looped_contrastive, margin=1.3, num_hard=20),
        ),
        (TripletLoss(margin=0.3), partial(looped_triplet, margin=0.3)),
    ]
    for loss_fn, ref_fn in cases:
        d1, d2 = desc.clone().requires_grad_(), desc.clone().requires_grad_()
        got, want = loss_fn(d1, labels), ref_fn(d2, labels)
        assert want.item() > 0
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        got.backward()
        want.backward()
        torch.testing.assert_close(d1.grad, d2.grad, atol=1e-12, rtol=0)


def test_baselines_gradcheck():
    desc, labels = unit_batch(10, 5, 3, seed=30)
    desc.requires_grad_()
    for loss_fn in (ContrastiveLoss(margin=1.2, num_hard=2), TripletLoss(margin=0.4)):
        assert torch.autograd.gradcheck(
            lambda d, f=loss_fn: f(d, labels), (desc,), eps=1e-6, atol=1e-7
        )
