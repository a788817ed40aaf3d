"""Smooth-AP, SupAP, ROADMAP and Recall@k equal dense float64 autograd references (the
B x B x B formulation, written here from the formulas), in every form of the listwise
machinery: whole or chunked batch, query/database, memory bank, multistage."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from apretrieval.losses.ap import ListwiseLoss
from apretrieval.losses.memory_bank import ap_loss_with_memory
from apretrieval.losses.recall_at_k import RecallAtKLoss
from apretrieval.losses.smooth_ap import SmoothAPLoss
from apretrieval.losses.supap import RoadmapLoss, SupAPLoss
from apretrieval.multistage import multistage_backward
from test_multistage import assert_grad_equal, plain_grads, tiny_model

# --------------------------------------------------------------------------------------------
# Dense references: d[i, p, j] = s_ij - s_ip, the whole (Q, N, N) tensor.


def _differences(s, valid):
    """d (Q, N, N) and ``others`` (Q, N, N): j is ranked by the query and j != p."""
    n = s.shape[1]
    d = s[:, None, :] - s[:, :, None]
    others = valid[:, None, :] & ~torch.eye(n, dtype=torch.bool)[None]
    return d, others


def _mean_over_queries(per_p, pos):
    has = pos.any(1)
    per_query = (per_p * pos).sum(1) / pos.sum(1).clamp(min=1)
    return 1.0 - per_query[has].mean()


def ref_smooth_ap(s, rel, valid, tau=0.01):
    pos = rel & valid
    d, others = _differences(s, valid)
    g = torch.sigmoid(d / tau)
    rank = 1 + (g * others).sum(-1)
    rank_pos = 1 + (g * (others & pos[:, None, :])).sum(-1)
    return _mean_over_queries(rank_pos / rank, pos)


def ref_sup_ap(s, rel, valid, tau=0.01, rho=100.0, delta=0.05, start=0.5, offset=None):
    if offset is None:
        offset = start + 1 / (1 + math.exp(-delta / tau))
    pos = rel & valid
    neg = valid & ~rel
    d, others = _differences(s, valid)
    step = (d >= 0).to(s.dtype)  # no gradient
    sig = torch.sigmoid(d / tau)
    r_neg = torch.where(d > delta, rho * (d - delta) + offset, torch.where(d > 0, start + sig, sig))
    rank_pos = 1 + (step * (others & pos[:, None, :])).sum(-1)
    rank = rank_pos + (r_neg * (others & neg[:, None, :])).sum(-1)
    return _mean_over_queries(rank_pos / rank, pos)


def ref_calibration(s, rel, valid, pos_margin=0.9, neg_margin=0.6):
    hinge_pos = torch.relu(pos_margin - s[rel & valid])
    hinge_neg = torch.relu(s[valid & ~rel] - neg_margin)
    terms = [h[h > 0].mean() if (h > 0).any() else s.new_zeros(()) for h in (hinge_pos, hinge_neg)]
    return terms[0] + terms[1]


def ref_roadmap(s, rel, valid, weight=1.0):
    return ref_sup_ap(s, rel, valid) + weight * ref_calibration(s, rel, valid)


def ref_recall_at_k(s, rel, valid, ks=(1, 2, 4, 8, 16), tau=0.01, tau_k=1.0):
    pos = rel & valid
    d, others = _differences(s, valid)
    rank = 1 + (torch.sigmoid(d / tau) * others).sum(-1)  # (Q, N): rank of each p
    has = pos.any(1)
    recalls = []
    for k in ks:
        found = (torch.sigmoid((k - rank) / tau_k) * pos).sum(1)
        m = pos.sum(1).clamp(max=k).clamp(min=1).to(s.dtype)
        recalls.append(torch.clamp(found, max=m) / m)
    return 1.0 - torch.stack(recalls, 1)[has].mean()


LOSSES = {
    "smooth_ap": (SmoothAPLoss, ref_smooth_ap),
    "sup_ap": (SupAPLoss, ref_sup_ap),
    "roadmap": (RoadmapLoss, ref_roadmap),
    "recall_at_k": (RecallAtKLoss, ref_recall_at_k),
    # A flat top-k sigmoid: the count of positives within k exceeds min(k, |P|), capped.
    "recall_capped": (
        functools.partial(RecallAtKLoss, k=(1, 2, 3), tau_k=8.0),
        functools.partial(ref_recall_at_k, ks=(1, 2, 3), tau_k=8.0),
    ),
}


def ref_batch(ref, x, labels):
    s = x @ x.T
    return ref(s, labels[:, None] == labels[None, :], ~torch.eye(len(labels), dtype=torch.bool))


def ref_query_db(ref, q, ql, x, xl, query_index=None):
    valid = torch.ones(q.shape[0], x.shape[0], dtype=torch.bool)
    if query_index is not None:
        valid[torch.arange(q.shape[0]), query_index] = False
    return ref(q @ x.T, ql[:, None] == xl[None, :], valid)


# --------------------------------------------------------------------------------------------
# Data: continuous descriptors, and lattice ones (entries 0, +-1/2: exact scores, many ties).


def normed(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def lattice(n, d, seed):
    """Rows with four entries +-1/2 (norm exactly 1): every score is a multiple of 1/4."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        cols = torch.randperm(d, generator=g)[:4]
        x[i, cols] = torch.where(torch.rand(4, generator=g) < 0.7, 0.5, -0.5).double()
    return x


# Classes of 4, 3, 2 and 1, and two singletons: queries without a positive.
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 1, 2, 0, 6])
DATA = {"continuous": lambda: normed(16, 6, 0), "ties": lambda: lattice(16, 5, 1)}


def loss_and_grad(fn, *args, **kwargs):
    leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    loss = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(loss, [a for a in leaves if a.requires_grad])
    return loss.detach(), grads


def assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert abs(float(loss - ref_loss)) <= 1e-10, (float(loss), float(ref_loss))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize(
    "options",
    [{}, {"memory_budget_mb": 0, "chunk_size": 5}, {"chunk_size": 3, "pair_budget_mb": 1e-4}],
    ids=["whole", "chunked", "one-pair-blocks"],
)
def test_batch_form_equals_dense_reference(name, data, options):
    cls, ref = LOSSES[name]
    x = DATA[data]()
    got = loss_and_grad(cls(**options), x, LABELS)
    want = loss_and_grad(lambda x, labels: ref_batch(ref, x, labels), x, LABELS)
    assert_same(got, want)
    assert torch.isfinite(got[1][0]).all() and got[1][0].abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("chunk", [None, 4])
def test_query_database_form_equals_dense_reference(name, data, chunk):
    cls, ref = LOSSES[name]
    x = DATA[data]()
    q, ql = x[:7], LABELS[:7]
    db, dbl = x[4:], LABELS[4:]
    got = loss_and_grad(cls(chunk_size=chunk), q, ql, db, dbl)
    want = loss_and_grad(lambda *a: ref_query_db(ref, *a), q, ql, db, dbl)
    assert_same(got, want)
    # With the queries in the database at known columns (a batch against a memory bank).
    index = torch.arange(4, 7) - 4
    got = loss_and_grad(cls(chunk_size=chunk), x[4:7], LABELS[4:7], db, dbl, query_index=index)
    want = loss_and_grad(
        lambda *a: ref_query_db(ref, *a, query_index=index), x[4:7], LABELS[4:7], db, dbl
    )
    assert_same(got, want)


@pytest.mark.parametrize("name", LOSSES)
def test_memory_bank_equals_dense_reference(name):
    cls, ref = LOSSES[name]
    d, bank = normed(10, 5, 3), normed(6, 5, 4)
    labels, bank_labels = LABELS[:10], torch.tensor([0, 2, 7, 9, 3, 1])
    loss, g = ap_loss_with_memory(cls(chunk_size=3), d, labels, bank, bank_labels)
    leaf = d.clone().requires_grad_()
    db = torch.cat([leaf, bank])
    ref_loss = ref_query_db(
        ref, leaf, labels, db, torch.cat([labels, bank_labels]), torch.arange(10)
    )
    (ref_g,) = torch.autograd.grad(ref_loss, leaf)
    assert abs(loss - float(ref_loss.detach())) <= 1e-10
    torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(name):
    cls, _ = LOSSES[name]
    # A milder temperature keeps finite differences meaningful; rho set to a moderate slope.
    kwargs = {"tau": 0.2} if name != "roadmap" else {"tau": 0.2, "rho": 3.0}
    fn = cls(**kwargs)
    x = normed(9, 4, 5).requires_grad_()
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 4])
    assert torch.autograd.gradcheck(lambda x: fn(x, labels), (x,), eps=1e-6, atol=1e-7)
    q, db = normed(4, 4, 6).requires_grad_(), normed(7, 4, 7).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, db: fn(q, labels[:4], db, labels[2:]), (q, db), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("name", LOSSES)
def test_multistage_equals_plain_backprop(name):
    loss_fn = LOSSES[name][0](tau=0.1, normalize=True)
    model = tiny_model()
    x = torch.rand(8, 3, 14, 14, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])  # one image without a positive
    ref_loss, ref = plain_grads(model, list(x), labels, loss_fn)
    model.zero_grad(set_to_none=True)
    loss = multistage_backward(model, x, labels, loss_fn, 3)
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    for p_name, p in model.named_parameters():
        assert_grad_equal(p.grad, ref[p_name], p_name)


@pytest.mark.parametrize("name", LOSSES)
def test_float32_and_no_grad(name):
    fn = LOSSES[name][0]()
    x = normed(16, 6, 8)
    loss64, g64 = loss_and_grad(fn, x, LABELS)
    loss32, g32 = loss_and_grad(fn, x.float(), LABELS)
    assert loss32.dtype == torch.float32 and g32[0].dtype == torch.float32
    assert abs(float(loss32) - float(loss64)) < 1e-5
    torch.testing.assert_close(g32[0].double(), g64[0], rtol=1e-3, atol=1e-4)
    with torch.no_grad():
        assert float(fn(x, LABELS)) == pytest.approx(float(loss64), abs=1e-12)


def test_queries_without_positives_are_ignored_and_none_at_all_is_an_error():
    x = normed(6, 4, 9)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    for cls, ref in LOSSES.values():
        loss = cls()(x, labels)
        assert torch.isfinite(loss)
        assert float(loss) == pytest.approx(float(ref_batch(ref, x, labels)), abs=1e-10)
        with pytest.raises(ValueError, match="no query has a positive"):
            cls()(x, torch.arange(6))


def test_perfect_ranking_gives_zero_ranking_loss():
    x = torch.eye(4, dtype=torch.float64).repeat_interleave(3, 0)  # 4 classes, identical items
    labels = torch.arange(4).repeat_interleave(3)
    assert float(SmoothAPLoss(tau=1e-3)(x, labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(SupAPLoss()(x, labels)) == pytest.approx(0.0, abs=1e-12)
    assert float(RecallAtKLoss(k=(2,), tau=1e-3, tau_k=0.01)(x, labels)) < 1e-6


def test_the_losses_are_listwise_and_validate_their_settings():
    for cls in (SmoothAPLoss, SupAPLoss, RoadmapLoss, RecallAtKLoss):
        assert issubclass(cls, ListwiseLoss)
    for bad in (
        lambda: SmoothAPLoss(tau=0),
        lambda: SupAPLoss(rho=-1.0),
        lambda: SupAPLoss(delta=math.nan),
        lambda: RoadmapLoss(calibration_weight=-1.0),
        lambda: RecallAtKLoss(k=()),
        lambda: RecallAtKLoss(k=(0, 2)),
        lambda: RecallAtKLoss(tau_k=-1.0),
        lambda: SmoothAPLoss(pair_budget_mb=0),
    ):
        with pytest.raises(ValueError):
            bad()
    assert SupAPLoss().offset == pytest.approx(0.5 + 1 / (1 + math.exp(-5.0)))


# --------------------------------------------------------------------------------------------
# Training: `--loss smooth_ap|sup_ap|roadmap|recall_at_k` and their settings.


def test_training_config_selects_the_rank_losses_with_their_settings(tmp_path):
    import yaml

    from apretrieval.train_config import TrainConfig
    from apretrieval.train_setup import make_loss

    cfg = TrainConfig(data="x", tau=0.05, memory_batches=2)
    assert isinstance(make_loss(cfg.replace(loss="smooth_ap")), SmoothAPLoss)
    sup = make_loss(cfg.replace(loss="sup_ap", sup_rho=10.0, sup_delta=0.1, sup_offset=2.0))
    assert type(sup) is SupAPLoss and (sup.tau, sup.rho, sup.delta, sup.offset) == (
        0.05,
        10.0,
        0.1,
        2.0,
    )
    road = make_loss(
        cfg.replace(loss="roadmap", calibration_weight=0.5, calibration_margins=(0.8, 0.5))
    )
    assert isinstance(road, RoadmapLoss)
    assert (road.calibration_weight, road.pos_margin, road.neg_margin) == (0.5, 0.8, 0.5)
    recall = make_loss(cfg.replace(loss="recall_at_k", recall_k=(1, 4), recall_tau=2.0))
    assert isinstance(recall, RecallAtKLoss) and (recall.k, recall.tau_k) == ((1, 4), 2.0)
    # YAML keys round-trip; a k list is read from YAML or from a flag's text.
    path = tmp_path / "c.yaml"
    custom = cfg.replace(loss="recall_at_k", recall_k=(2, 8))
    path.write_text(yaml.safe_dump(custom.to_dict()))
    assert TrainConfig.from_yaml(path) == custom
    assert TrainConfig.from_dict({"data": "x", "recall_k": "1,2,4"}).recall_k == (1, 2, 4)
    for bad in ({"tau": 0}, {"recall_k": "1.5,2"}, {"recall_k": [0]}, {"sup_rho": -1}):
        with pytest.raises(ValueError):
            TrainConfig.from_dict({"data": "x", **bad})


def test_train_help_lists_the_rank_loss_options(capsys):
    from apretrieval.cli import main

    try:
        main(["train", "--help"])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    out = capsys.readouterr().out
    for flag in ("--tau", "--sup-rho", "--calibration-weight", "--recall-k", "--recall-tau"):
        assert flag in out, flag
    assert "recall_at_k" in out


@pytest.mark.parametrize("name", ["smooth_ap", "roadmap"])
def test_half_precision_inputs_are_computed_in_float32(name):
    """Under mixed precision the loss works in float32 whatever the descriptors' dtype."""
    fn = LOSSES[name][0]()
    x = normed(16, 6, 10).to(torch.bfloat16)
    got = loss_and_grad(fn, x, LABELS)
    want = loss_and_grad(fn, x.float(), LABELS)
    assert got[1][0].dtype == torch.bfloat16
    assert abs(float(got[0]) - float(want[0])) < 1e-2  # the bfloat16 rounding of the value
    torch.testing.assert_close(got[1][0].float(), want[1][0].bfloat16().float())


def test_training_runs_with_a_rank_loss_and_a_memory_bank(tmp_path):
    import json

    from apretrieval.training import train
    from test_distributed import make_folder
    from test_training import tiny_config

    folder = make_folder(tmp_path / "data")
    cfg = tiny_config(folder, tmp_path / "run", loss="roadmap", tau=0.1, memory_batches=1)
    assert train(cfg).is_file()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == cfg.steps and all(math.isfinite(v) for v in losses)
