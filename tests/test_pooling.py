"""GeM pooling: closed forms, limits, gradients."""

from __future__ import annotations

import pytest
import torch

from apretrieval.pooling import GeM, gem


def test_p1_is_average_pooling():
    x = torch.rand(2, 5, 4, 3, dtype=torch.float64) + 0.1
    assert torch.allclose(gem(x, 1.0), x.mean((-2, -1)))


def test_large_p_tends_to_max_pooling():
    x = torch.rand(2, 5, 4, 3, dtype=torch.float64) + 0.1
    # (mean x^p)^(1/p) = max * (count-of-max / HW)^(1/p) -> max as p grows
    assert torch.allclose(gem(x, 200.0), x.amax((-2, -1)), rtol=0.02)


def test_closed_form_p3():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    assert gem(x, 3.0).item() == pytest.approx(expected)


def test_constant_map_is_fixed_point_and_eps_clamps():
    x = torch.full((1, 2, 3, 3), 0.7, dtype=torch.float64)
    assert torch.allclose(gem(x, 4.5), torch.full((1, 2), 0.7, dtype=torch.float64))
    neg = -torch.ones(1, 1, 2, 2, dtype=torch.float64)
    assert gem(neg, 3.0, eps=1e-3).item() == pytest.approx(1e-3)


def test_gradcheck_input_and_power():
    x = (torch.rand(2, 3, 3, 2, dtype=torch.float64) + 0.1).requires_grad_()
    p = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gem(a, b), (x, p))


def test_module_learns_p_and_repr():
    pool = GeM(p=3.0)
    assert pool.p.requires_grad and pool.p.item() == 3.0
    pool(torch.rand(2, 4, 3, 3)).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0
    fixed = GeM(p=2.0, learnable=False)
    assert not any(True for _ in fixed.parameters())
    assert "p=2.0000" in repr(fixed)


@pytest.mark.parametrize("bad", [{"p": 0.0}, {"p": -1.0}, {"eps": 0.0}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        GeM(**bad)


def test_bad_shape():
    with pytest.raises(ValueError, match="feature map"):
        gem(torch.rand(3, 4))
