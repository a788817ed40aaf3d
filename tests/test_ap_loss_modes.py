"""APLoss strategies and input checks: the whole-matrix batch form equals the chunked form,
out-of-range inputs are reported or normalised, the memory bank lives with the losses."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import apretrieval
from apretrieval import distributed
from apretrieval.losses import ap as ap_module
from apretrieval.losses.ap import APLoss, TieAwareAPLoss
from apretrieval.losses.memory_bank import MemoryBank
from apretrieval.multistage import multistage_step


def unit(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def loss_and_grad(fn: APLoss, x: torch.Tensor, labels: torch.Tensor):
    leaf = x.clone().requires_grad_()
    loss = fn(leaf, labels)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.fixture
def whole_calls(monkeypatch):
    """Counts the calls of the whole-matrix path (so a test knows which path ran)."""
    calls = []
    original = ap_module._whole_batch_loss_and_grad

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(ap_module, "_whole_batch_loss_and_grad", counted)
    return calls


@pytest.mark.parametrize("cls", [APLoss, TieAwareAPLoss])
@pytest.mark.parametrize(("n", "chunk"), [(300, None), (300, 37), (130, 1), (129, 200)])
def test_whole_matrix_equals_chunked_in_float64(cls, n, chunk, whole_calls):
    """Symmetric half product + one (G + G^T) D product == three products per chunk."""
    x, labels = unit(n, 12, n), torch.randint(0, n // 5, (n,), generator=torch.Generator())
    x[3] = x[5]  # an exact tie between two items
    chunked = loss_and_grad(cls(num_bins=15, chunk_size=chunk, memory_budget_mb=0), x, labels)
    assert whole_calls == []
    whole = loss_and_grad(cls(num_bins=15, chunk_size=chunk), x, labels)
    assert whole_calls == [n]
    assert abs(float(whole[0] - chunked[0])) <= 1e-10
    torch.testing.assert_close(whole[1], chunked[1], rtol=1e-9, atol=1e-14)
    assert chunked[1].abs().max() > 1e-4  # a gradient worth comparing


def test_whole_matrix_gradcheck():
    x, labels = unit(20, 4, 1), torch.tensor([0, 1, 2, 3] * 5)
    fn = APLoss(num_bins=8)
    assert torch.autograd.gradcheck(lambda d: fn(d, labels), x.clone().requires_grad_())


def test_memory_budget_picks_the_mode(whole_calls):
    x, labels = unit(64, 8, 2, torch.float32), torch.arange(64) // 4
    APLoss(memory_budget_mb=64 * 64 * 4 / 2**20)(x, labels)  # exactly fits
    APLoss(memory_budget_mb=64 * 63 * 4 / 2**20)(x, labels)  # does not
    APLoss()(x, labels, x, labels)  # query/database form: always chunked
    assert whole_calls == [64]
    with pytest.raises(ValueError, match="memory_budget_mb"):
        APLoss(memory_budget_mb=-1)


def test_unnormalised_inputs_warn_once():
    x, labels = unit(32, 6, 3), torch.arange(32) // 4
    fn = APLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(x, labels)  # unit rows: silent
    big = (10 * x).requires_grad_()
    with pytest.warns(UserWarning, match=r"not L2-normalised.*normalize=True"):
        loss = fn(big, labels)
    loss.backward()
    assert big.grad.abs().max() < 1e-3 * x.shape[1]  # what the warning is about: almost no signal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(10 * x, labels)  # once per loss object


def test_normalize_equals_loss_on_normalised_inputs_with_the_chain_rule():
    x, labels = unit(40, 6, 4), torch.arange(40) // 4
    raw = (x * torch.linspace(0.5, 7.0, 40, dtype=x.dtype)[:, None]).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = APLoss(normalize=True)(raw, labels)
    loss.backward()
    ref_in = raw.detach().clone().requires_grad_()
    ref = APLoss()(nn.functional.normalize(ref_in, dim=1), labels)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), abs=1e-12)
    torch.testing.assert_close(raw.grad, ref_in.grad, rtol=1e-9, atol=1e-14)
    # scale invariance: the radial component of the gradient vanishes
    radial = (raw.grad * raw.detach()).sum(1)
    assert radial.abs().max() < 1e-12


def test_memory_bank_has_one_home():
    assert apretrieval.MemoryBank is MemoryBank
    assert "MemoryBank" not in distributed.__all__  # the losses own it, nothing re-exports it


def test_single_process_step_with_a_bank_equals_plain_backprop():
    """multistage_step with a bank: the loss of ap_loss_with_memory, its chain rule through the
    network, and the batch pushed into the bank afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    images = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    bank = MemoryBank(2)
    bank.push(unit(6, 5, 5), torch.tensor([0, 1, 4, 4, 5, 3]))
    fn = APLoss(num_bins=10)

    # reference: autograd through the network with the bank as a constant database
    out = nn.functional.normalize(model(images), dim=1)
    mem, mem_labels = bank.tensors()
    db = torch.cat([out, mem])
    db_labels = torch.cat([labels, mem_labels])
    ref_loss = fn(out, labels, db, db_labels, query_index=torch.arange(8))
    ref_loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    normed = nn.Sequential(model, _Normalize())
    step = multistage_step(normed, images, labels, fn, 3, memory=bank)
    assert step.loss == pytest.approx(float(ref_loss), abs=1e-12) and step.images == 8
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-9, atol=1e-15)
    assert len(bank) == 14 and torch.equal(bank.tensors()[1][6:], labels)


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1)
