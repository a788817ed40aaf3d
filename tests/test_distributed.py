"""Multistaged training on 2 processes (gloo on 127.0.0.1) == the same global batch in one.

One pair of worker processes (this file run as a script, with torchrun's environment
variables) runs every distributed scenario once; the tests compare what each rank saved with
single-process references computed here.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apretrieval.distributed import (
    DistContext,
    broadcast_model,
    distributed_multistage_backward,
    init_distributed,
    shard_bounds,
    sync_stop,
)
from apretrieval.losses.ap import APLoss, TieAwareAPLoss
from apretrieval.losses.baselines import ContrastiveLoss
from apretrieval.losses.memory_bank import MemoryBank, ap_loss_with_memory
from apretrieval.losses.recall_at_k import RecallAtKLoss
from apretrieval.losses.smooth_ap import SmoothAPLoss
from apretrieval.losses.supap import RoadmapLoss, SupAPLoss
from apretrieval.model_config import ModelConfig
from apretrieval.models import RetrievalNet, load_checkpoint
from apretrieval.multistage import multistage_backward
from apretrieval.train_config import TrainConfig
from test_training import tiny_config

WORLD = 2
CHUNK = 2
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])  # global batch of 10
# The rank-based listwise losses (a mild temperature: the tiny model's scores are close).
RANK_LOSSES = {
    "smooth_ap": lambda: SmoothAPLoss(tau=0.1),
    "sup_ap": lambda: SupAPLoss(tau=0.1),
    "roadmap": lambda: RoadmapLoss(tau=0.1),
    "recall_at_k": lambda: RecallAtKLoss(k=(1, 2), tau=0.1),
}


# --------------------------------------------------------------------------------------------
# Shared by the workers and the references.


def tiny_model(seed: int = 0) -> RetrievalNet:
    """Conv + frozen BatchNorm trunk -> GeM -> whitening, float64 (exact comparisons)."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    )
    with torch.no_grad():
        for m in trunk:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = RetrievalNet(trunk, 8, ModelConfig(name="tiny", out_dim=6))
    return model.double().train()  # BatchNorm stays frozen (ModelConfig.frozen_bn)


def images(step: int, n: int = 10) -> list[torch.Tensor]:
    """n float64 images of different sizes, a function of ``step`` only."""
    g = torch.Generator().manual_seed(1000 + step)
    return [
        torch.rand(3, 12 + i % 4, 14 + i % 3, generator=g, dtype=torch.float64) for i in range(n)
    ]


def loaders(imgs: list[torch.Tensor], unreadable: set[int] = frozenset()) -> list:
    """Per-image loaders; those in ``unreadable`` return None (a corrupt file)."""
    return [(lambda: None) if i in unreadable else (lambda x=x: x) for i, x in enumerate(imgs)]


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        k: None if p.grad is None else p.grad.detach().clone() for k, p in model.named_parameters()
    }


def tiny_train_config(folder: Path, out: Path, **kw) -> TrainConfig:
    """test_training's tiny run (random ResNet-18, 32 px, identity whitening), as the
    distributed tests take it: chunks of 2, a memory bank, gloo on CPU."""
    base = dict(
        chunk_size=2,
        schedule="exponential",
        lr_decay=0.9,
        warmup_steps=0,
        memory_batches=2,
        dist_backend="gloo",
        dist_timeout=60.0,
        device="cpu",
    )
    base.update(kw)
    return tiny_config(folder, out, **base)


def make_folder(root: Path) -> Path:
    """4 classes x 4 small images; class 0 also holds a corrupt file (unequal shards)."""
    rng = np.random.default_rng(0)
    for c in range(4):
        base = rng.random(3) * 255
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            arr = np.clip(base + rng.normal(0, 40, (24 + 2 * i, 30, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / f"class{c}" / f"{i}.jpg")
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


# Unreadable images of the scenarios: unequal shards, and a rank with nothing at all.
UNEQUAL = {6, 8}
RANK1_EMPTY = {5, 6, 7, 8, 9}


def memory_run(ctx: DistContext | None, steps: int = 3, loss_fn=None) -> dict:
    """SGD steps with a 2-batch memory bank; per step loss, images, gradients."""
    model = tiny_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bank = MemoryBank(2)
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    out: dict = {"loss": [], "grads": [], "bank": []}
    for step in range(steps):
        lo, hi = shard_bounds(10, rank, world)
        opt.zero_grad(set_to_none=True)
        res = distributed_multistage_backward(
            model,
            loaders(images(step))[lo:hi],
            LABELS[lo:hi],
            loss_fn or APLoss(num_bins=10),
            CHUNK,
            ctx=ctx,
            memory=bank,
        )
        out["loss"].append(res.loss)
        out["grads"].append(grads(model))
        out["bank"].append(len(bank))
        opt.step()
    return out


# --------------------------------------------------------------------------------------------
# The worker (one per rank).


def _error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as err:
        return type(err).__name__, str(err)
    return None


def _worker(out: Path, folder: Path) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("auto", timeout_s=60.0, device="cpu")
    assert ctx.world_size == WORLD and ctx.backend == "gloo"
    r = ctx.rank
    res: dict = {"rank": r}

    def save() -> None:
        torch.save(res, out / f".rank{r}.tmp")
        os.replace(out / f".rank{r}.tmp", out / f"rank{r}.pt")

    lo, hi = shard_bounds(10, r, WORLD)
    for name, bad in (("unequal", UNEQUAL), ("empty_rank", RANK1_EMPTY)):
        model = tiny_model(0)
        step = distributed_multistage_backward(
            model,
            loaders(images(0), bad)[lo:hi],
            LABELS[lo:hi],
            APLoss(num_bins=10),
            CHUNK,
            ctx=ctx,
        )
        res[name] = {
            "loss": step.loss,
            "images": step.images,
            "grads": grads(model),
            "labels": step.labels,
        }
    for name, make in RANK_LOSSES.items():
        model = tiny_model(0)
        step = distributed_multistage_backward(
            model, loaders(images(0))[lo:hi], LABELS[lo:hi], make(), CHUNK, ctx=ctx
        )
        res[name] = {"loss": step.loss, "grads": grads(model)}
    res["memory_roadmap"] = memory_run(ctx, steps=2, loss_fn=RoadmapLoss(tau=0.1))
    save()

    # A rank that raises in stage 1 / stage 3: every rank raises at once.
    bad1 = loaders(images(0))
    if r == 1:

        def broken():
            raise OSError("cannot decode img-6.jpg")

        bad1[6] = broken
    res["stage1_error"] = _error(
        lambda: distributed_multistage_backward(
            tiny_model(0), bad1[lo:hi], LABELS[lo:hi], APLoss(num_bins=10), CHUNK, ctx=ctx
        )
    )
    bad3 = loaders(images(0))
    if r == 1:
        calls = []

        def changes():  # a different image on the replay: stage 3 detects it
            calls.append(1)
            return images(0)[7] * (1.0 if len(calls) == 1 else 0.5)

        bad3[7] = changes
    res["stage3_error"] = _error(
        lambda: distributed_multistage_backward(
            tiny_model(0), bad3[lo:hi], LABELS[lo:hi], APLoss(num_bins=10), CHUNK, ctx=ctx
        )
    )
    save()

    res["memory"] = memory_run(ctx)  # the group still works after the errors
    save()

    # One start state: each rank builds a different model, rank 0's reaches every rank.
    model = tiny_model(r)
    broadcast_model(ctx, model)
    res["broadcast"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # A signal received by any rank stops all of them (the highest number wins).
    res["sync_stop"] = [
        sync_stop(ctx, None),
        sync_stop(ctx, signal.SIGTERM if r == 1 else None),
        sync_stop(ctx, r + 1),
    ]
    save()

    # train(): uninterrupted 4 steps; 2 steps then resumed to 4 (on 2 ranks, and a copy
    # of the step-2 run directory for a 1-process resume in the test).
    from apretrieval.training import train

    train(tiny_train_config(folder, out / "A"))
    train(tiny_train_config(folder, out / "B", steps=2))
    if r == 0:
        shutil.copytree(out / "B", out / "B1")
    train(tiny_train_config(folder, out / "B", steps=4), resume=True)
    # a run of one process (stopped at step 2 by the test) resumed on two ranks
    train(tiny_train_config(folder, out / "C", steps=4), resume=True)
    res["train_done"] = True
    save()

    # A rank that hangs (here: a loader that sleeps) makes the other fail after the timeout.
    group = torch.distributed.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=3))
    short = dataclasses.replace(ctx, group=group, timeout_s=3.0)
    hang = loaders(images(0))
    if r == 1:
        hang[5] = lambda: (time.sleep(12), images(0)[5])[1]
    t0 = time.perf_counter()
    res["hang"] = (
        _error(
            lambda: distributed_multistage_backward(
                tiny_model(0), hang[lo:hi], LABELS[lo:hi], APLoss(num_bins=10), CHUNK, ctx=short
            )
        ),
        time.perf_counter() - t0,
    )
    save()
    os._exit(0)  # the group is broken on purpose: skip its teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, folder: Path, timeout: float = 900.0) -> list[dict]:
    """Run the workers as torchrun would (env://), return each rank's results."""
    port = _free_port()
    procs = []
    for r in range(WORLD):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(WORLD),
            RANK=str(r),
            LOCAL_RANK=str(r),
            OMP_NUM_THREADS="1",
        )
        log = open(out / f"rank{r}.log", "w")  # closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(out), str(folder)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        for p, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join(
        f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD)
    )
    results = []
    for r, (p, _) in enumerate(procs):
        assert p.returncode == 0 and (out / f"rank{r}.pt").exists(), logs
        results.append(torch.load(out / f"rank{r}.pt", weights_only=False))
    return results


# --------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("dist_folder"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, folder) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("dist_run")
    from apretrieval.training import train

    train(tiny_train_config(folder, out / "C", steps=2))  # one process, resumed by the ranks
    return out, launch(out, folder)


def assert_grads_close(got: dict, ref: dict) -> None:
    """float64 gradients equal to rounding (relative 1e-9; the reduction order differs)."""
    assert got.keys() == ref.keys()
    for k in ref:
        assert (got[k] is None) == (ref[k] is None), k
        if ref[k] is not None:
            torch.testing.assert_close(
                got[k], ref[k], rtol=1e-9, atol=1e-15, msg=lambda m, k=k: f"{k}: {m}"
            )


def test_shard_bounds_partition_the_batch():
    for n in (0, 1, 7, 10, 4096):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(10, 2, 2)


@pytest.mark.parametrize("name,bad", [("unequal", UNEQUAL), ("empty_rank", RANK1_EMPTY)])
def test_two_ranks_gradients_equal_single_process(cluster, name, bad):
    _, results = cluster
    model = tiny_model(0)
    ref_loss = multistage_backward(
        model, loaders(images(0), bad), LABELS, APLoss(num_bins=10), CHUNK
    )
    ref = grads(model)
    kept = [i for i in range(10) if i not in bad]
    for res in results:
        got = res[name]
        assert got["images"] == len(kept)
        assert torch.equal(got["labels"], LABELS[kept])  # gathered in the single-process order
        assert got["loss"] == pytest.approx(ref_loss, abs=1e-12)
        assert_grads_close(got["grads"], ref)


def test_losses_equal_on_every_rank(cluster):
    _, results = cluster
    for name in ("unequal", "empty_rank"):
        assert results[0][name]["loss"] == results[1][name]["loss"]
    assert results[0]["memory"]["loss"] == results[1]["memory"]["loss"]


def test_failing_rank_is_reported_on_every_rank(cluster):
    _, (r0, r1) = cluster
    assert r1["stage1_error"] == ("OSError", "cannot decode img-6.jpg")
    kind, msg = r0["stage1_error"]
    assert kind == "DistributedError"
    assert "rank(s) [1] failed in stage 1" in msg and "cannot decode img-6.jpg" in msg
    assert r1["stage3_error"][0] == "RuntimeError" and "stage 3" in r1["stage3_error"][1]
    kind, msg = r0["stage3_error"]
    assert kind == "DistributedError" and "rank(s) [1] failed in stage 3" in msg


def test_hung_rank_makes_the_other_fail_after_the_timeout(cluster):
    _, (r0, r1) = cluster
    (kind, msg), elapsed = r0["hang"]
    assert kind == "DistributedError"
    assert "rank 0/2" in msg and "3 s timeout" in msg
    assert elapsed < 11.0  # the 3 s timeout, not the 12 s hang (nor forever)
    assert r1["hang"][0] is not None and r1["hang"][0][0] == "DistributedError"


def test_memory_bank_two_ranks_equal_single_process(cluster):
    _, results = cluster
    ref = memory_run(None)
    assert ref["bank"] == [10, 20, 20]  # K = 2 batches of 10
    for res in results:
        got = res["memory"]
        assert got["bank"] == ref["bank"]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-12)
        for g, r in zip(got["grads"], ref["grads"], strict=True):
            assert_grads_close(g, r)
    # The bank changes the loss: step 2 without it is a different number.
    model = tiny_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    multistage_backward(model, loaders(images(0)), LABELS, APLoss(num_bins=10), CHUNK)
    opt.step()
    plain = multistage_backward(model, loaders(images(1)), LABELS, APLoss(num_bins=10), CHUNK)
    assert abs(plain - ref["loss"][1]) > 1e-4


@pytest.mark.parametrize("name", RANK_LOSSES)
def test_rank_losses_two_ranks_equal_single_process(cluster, name):
    _, results = cluster
    model = tiny_model(0)
    ref_loss = multistage_backward(model, loaders(images(0)), LABELS, RANK_LOSSES[name](), CHUNK)
    ref = grads(model)
    for res in results:
        assert res[name]["loss"] == pytest.approx(ref_loss, abs=1e-12)
        assert_grads_close(res[name]["grads"], ref)


def test_rank_loss_with_memory_bank_two_ranks_equal_single_process(cluster):
    _, results = cluster
    ref = memory_run(None, steps=2, loss_fn=RoadmapLoss(tau=0.1))
    for res in results:
        got = res["memory_roadmap"]
        assert got["bank"] == ref["bank"] == [10, 20]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-12)
        for g, r in zip(got["grads"], ref["grads"], strict=True):
            assert_grads_close(g, r)


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "model.pt")["state_dict"]


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_resume_continues_identically(cluster):
    out, results = cluster
    assert all(r.get("train_done") for r in results)
    a, b = out / "A", out / "B"
    records = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once (rank 0)
    assert all(r["images"] + r["skipped"] == 8 for r in records)
    assert len(load_checkpoint(a / "checkpoint.pt")["memory"]["descriptors"]) == 2
    assert _losses(a) == _losses(b)
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert sorted(p.name for p in a.iterdir()) == [
        "checkpoint.pt",
        "config.yaml",
        "metrics.jsonl",
        "model.pt",
    ]


def test_resume_with_one_process(cluster, folder):
    from apretrieval.training import train

    out, _ = cluster
    b1 = out / "B1"
    assert load_checkpoint(b1 / "checkpoint.pt")["step"] == 2
    train(tiny_train_config(folder, b1, steps=4), resume=True)
    # Same batches, bank and update; only the summation order of the gradient differs.
    assert _losses(b1)[:2] == _losses(out / "A")[:2]
    assert _losses(b1)[2:] == pytest.approx(_losses(out / "A")[2:], rel=1e-5, abs=1e-6)
    sa, s1 = _state(out / "A"), _state(b1)
    for k in sa:
        assert torch.allclose(sa[k], s1[k], rtol=1e-4, atol=1e-5), k  # measured: 1.5e-7


def test_resume_from_one_process_on_two_ranks(cluster):
    out, _ = cluster
    c = out / "C"
    assert load_checkpoint(c / "checkpoint.pt")["step"] == 4
    assert [json.loads(ln)["step"] for ln in (c / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    # Same batches and updates as the two-rank run; only the gradient's summation order differs.
    assert _losses(c) == pytest.approx(_losses(out / "A"), rel=1e-5, abs=1e-6)
    sa, sc = _state(out / "A"), _state(c)
    diff = torch.cat([(sa[k].double() - sc[k].double()).abs().flatten() for k in sa])
    # Adam divides each gradient by its running RMS: an entry whose gradient is ~0 (its sign
    # set by rounding) can move by up to lr per step either way; every other entry agrees to
    # rounding. So: no entry beyond 2 lr x 4 steps, and the mean far below one such move.
    assert diff.max() <= 2 * 1e-3 * 4
    assert diff.mean() < 1e-6, diff.mean()  # i.e. at most ~0.1 % of the entries moved apart


def test_broadcast_model_gives_every_rank_rank_0s_weights(cluster):
    _, results = cluster
    want, other = tiny_model(0).state_dict(), tiny_model(1).state_dict()
    assert any(not torch.equal(want[k], other[k]) for k in want)  # the ranks did start apart
    for res in results:
        got = res["broadcast"]
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (res["rank"], k)


def test_sync_stop_shares_any_ranks_signal(cluster):
    _, results = cluster
    for res in results:
        assert res["sync_stop"] == [None, int(signal.SIGTERM), 2]


# --------------------------------------------------------------------------------------------
# In-process: the memory-bank loss, the bank, the single-process path, configuration.


def _normed(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("loss_cls", [APLoss, TieAwareAPLoss])
@pytest.mark.parametrize("chunk", [None, 5])
def test_memory_loss_equals_per_query_query_database_form(loss_cls, chunk):
    """Reference: for each query, APLoss's query/database form against (the batch without the
    query) + bank; its query gradient and its database gradient (batch part) summed per item."""
    d, bank = _normed(12, 5, 0), _normed(9, 5, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6])
    bank_labels = torch.tensor([0, 1, 2, 7, 7, 3, 8, 6, 9])  # query 11 (6) only has a bank match
    loss, g = ap_loss_with_memory(
        loss_cls(num_bins=10, chunk_size=chunk), d, labels, bank, bank_labels
    )
    ref, total, valid = torch.zeros_like(d), 0.0, 0
    for i in range(12):
        others = [j for j in range(12) if j != i]
        db_labels = torch.cat([labels[others], bank_labels])
        if not (db_labels == labels[i]).any():
            continue  # query 10 (5): no positive, excluded as in the batch form
        valid += 1
        q = d[i : i + 1].clone().requires_grad_(True)
        x = d[others].clone().requires_grad_(True)
        li = loss_cls(num_bins=10)(q, labels[i : i + 1], torch.cat([x, bank]), db_labels)
        li.backward()
        total += float(li.detach())
        ref[i] += q.grad[0]
        ref[others] += x.grad
    assert valid == 11
    assert loss == pytest.approx(total / valid, abs=1e-12)
    assert torch.allclose(g, ref / valid, rtol=0, atol=1e-12)


def test_memory_loss_with_an_empty_bank_is_the_batch_loss():
    d, labels = _normed(8, 4, 2), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    fn = APLoss(num_bins=10)
    loss, g = ap_loss_with_memory(fn, d, labels, d[:0], labels[:0])
    x = d.clone().requires_grad_(True)
    ref = fn(x, labels)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), abs=1e-12)
    assert torch.allclose(g, x.grad, atol=1e-12)
    with pytest.raises(ValueError, match="listwise loss"):
        ap_loss_with_memory(ContrastiveLoss(), d, labels, d, labels)
    with pytest.raises(ValueError, match="no query has a positive"):
        ap_loss_with_memory(fn, d, torch.arange(8), d, torch.arange(8) + 100)


def test_memory_bank_keeps_the_last_batches_and_round_trips():
    bank = MemoryBank(2)
    assert bank.tensors() is None and len(bank) == 0
    for t in range(3):
        bank.push(torch.full((t + 1, 3), float(t)), torch.full((t + 1,), t))
    d, lb = bank.tensors()
    assert lb.tolist() == [1, 1, 2, 2, 2] and d[:, 0].tolist() == [1, 1, 2, 2, 2]
    smaller = MemoryBank(1)
    smaller.load_state_dict(bank.state_dict())
    assert smaller.tensors()[1].tolist() == [2, 2, 2]  # the newest batch
    off = MemoryBank(0)
    off.push(d, lb)
    assert off.tensors() is None and off.state_dict()["descriptors"] == []
    with pytest.raises(ValueError, match="memory_batches"):
        MemoryBank(-1)


def test_single_process_step_is_multistage_backward():
    model = tiny_model(0)
    ref_loss = multistage_backward(
        model, loaders(images(0), UNEQUAL), LABELS, APLoss(num_bins=10), CHUNK
    )
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    step = distributed_multistage_backward(
        model, loaders(images(0), UNEQUAL), LABELS, APLoss(num_bins=10), CHUNK
    )
    assert step.loss == ref_loss and step.images == 8
    for k, g in grads(model).items():
        assert torch.equal(g, ref[k]), k
    with pytest.raises(ValueError, match="could be loaded"):
        distributed_multistage_backward(
            model, loaders(images(0), set(range(10))), LABELS, APLoss(num_bins=10), CHUNK
        )


def test_init_distributed_reads_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("auto", 10.0, "cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    with pytest.raises(ValueError, match="dist_backend"):
        init_distributed("mpi")
    with pytest.raises(ValueError, match="dist_timeout"):
        init_distributed("gloo", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK is not set"):
        init_distributed("gloo", 10.0, "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("gloo", 10.0, "cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="nccl backend needs a CUDA device"):
        init_distributed("nccl", 10.0, "cpu")


def test_config_rejects_bad_distributed_settings(tmp_path):
    with pytest.raises(ValueError, match="memory_batches needs an AP loss"):
        TrainConfig(data="x", loss="triplet", memory_batches=2).validate()
    with pytest.raises(ValueError, match="dist_backend"):
        TrainConfig(data="x", dist_backend="mpi").validate()
    with pytest.raises(ValueError, match="dist_timeout"):
        TrainConfig(data="x", dist_timeout=0).validate()
    with pytest.raises(ValueError, match="memory_batches must be >= 0"):
        TrainConfig(data="x", memory_batches=-1).validate()


@pytest.mark.slow
def test_cli_train_under_torchrun(folder, tmp_path):
    """`torchrun --nproc-per-node 2 apretrieval train ...`: unchanged command, one log."""
    exe = Path(sys.executable).with_name("apretrieval")
    if not exe.exists():
        pytest.skip(f"console script not found next to {sys.executable}")
    cfg = tiny_train_config(folder, tmp_path / "run", steps=2, memory_batches=0)
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        "--no-python",
        str(exe),
        "train",
        "--config",
        str(recipe),
        "--dist-backend",
        "auto",
        "--memory-batches",
        "1",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("model written to") == 1
    records = [json.loads(ln) for ln in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert TrainConfig.from_yaml(tmp_path / "run/config.yaml").memory_batches == 1
    assert load_checkpoint(tmp_path / "run/model.pt")["step"] == 2


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(Path(sys.argv[2]), Path(sys.argv[3]))
