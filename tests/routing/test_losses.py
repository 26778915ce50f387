"""Auxiliary losses against values computed by hand."""

import math

import pytest
import torch

from visionmoe.routing import balance_kl_loss, importance_loss, load_loss, switch_loss, z_loss

T = torch.tensor


def test_importance_loss():
    # Gates t0 = [0.7, 0.3], t1 = [0.5, 0.5]: importance = [1.2, 0.8], mean 1, population std 0.2,
    # CV² = 0.04. Uniform gates give 0.
    gates = T([[[0.7, 0.3], [0.5, 0.5]]])
    assert math.isclose(float(importance_loss(gates)), 0.04, rel_tol=1e-5)
    assert float(importance_loss(torch.full((1, 4, 2), 0.5))) == 0.0


def test_load_loss():
    # One token, E=2, k=1, σ=1. Clean logits [1, 0]; noisy [1.5, 0.2]: threshold = 1.5 (top-1).
    # p_e = 1 - Φ(1.5 - logit_e): p_0 = 1 - Φ(0.5) = 0.30854, p_1 = 1 - Φ(1.5) = 0.06681.
    # Load = p (one token): mean 0.18767, std 0.12087, CV² = 0.41476.
    logits, noisy = T([[[1.0, 0.0]]]), T([[[1.5, 0.2]]])
    p = torch.tensor([0.308538, 0.0668072])
    expected = float(p.var(unbiased=False) / p.mean() ** 2)
    assert math.isclose(expected, 0.41476, rel_tol=1e-3)
    assert math.isclose(float(load_loss(logits, noisy, 1.0, 1)), expected, rel_tol=1e-4)
    # It is differentiable in the clean logits (the point of the smooth estimate).
    logits.requires_grad_(True)
    load_loss(logits, noisy, 1.0, 1).backward()
    assert logits.grad is not None and bool((logits.grad != 0).all())


def test_switch_loss():
    # Two tokens both choosing e0: f = [1, 0]; mean gates P = [0.6, 0.4]; E·Σ f·P = 2·0.6 = 1.2.
    gates = T([[[0.7, 0.3], [0.5, 0.5]]])
    assert math.isclose(float(switch_loss(gates, T([[0, 0]]))), 1.2, rel_tol=1e-6)
    # Perfect balance gives 1: f = [0.5, 0.5], P = [0.5, 0.5] -> 2·(0.25 + 0.25).
    assert math.isclose(float(switch_loss(torch.full((1, 2, 2), 0.5), T([[0, 1]]))), 1.0, rel_tol=1e-6)


def test_z_loss():
    # logits [0, 0]: logsumexp = ln 2, z = (ln 2)² = 0.480453; [ln 3, 0]: ln 4, (ln 4)² = 1.921812.
    logits = T([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert math.isclose(float(z_loss(logits)), expected, rel_tol=1e-6)


def test_balance_kl_loss():
    # Mean gate p̄ = [0.6, 0.4]: KL(p̄ ‖ U) = 0.6 ln 1.2 + 0.4 ln 0.8 = 0.109393 - 0.089257 = 0.020136.
    gates = T([[[0.7, 0.3], [0.5, 0.5]]])
    expected = 0.6 * math.log(1.2) + 0.4 * math.log(0.8)
    assert math.isclose(float(balance_kl_loss(gates)), expected, rel_tol=1e-5)
    # A collapsed router (all mass on one expert of 4): KL = ln 4.
    collapsed = torch.zeros(1, 3, 4)
    collapsed[..., 0] = 1
    assert math.isclose(float(balance_kl_loss(collapsed)), math.log(4), rel_tol=1e-6)


@pytest.mark.parametrize("name", ["importance", "load", "switch", "z", "balance_kl"])
def test_a_loss_over_two_shards_joined_by_reduce_is_the_whole_batch_loss(name):
    # Two "processes" of 6 and 4 tokens: the second's sums are recorded, then added to the first's by
    # its reduce. The value must be the whole batch's loss, and the gradient on the first shard's
    # tokens the whole-batch gradient there (the distributed tests check the real all-reduce).
    torch.manual_seed(0)
    logits = torch.randn(1, 10, 4, requires_grad=True)
    noisy = logits + 0.3 * torch.randn(1, 10, 4)

    def loss(rows, reduce=None):
        lg, nz = logits[:, rows], noisy[:, rows]
        gates = nz.softmax(dim=-1)
        if name == "importance":
            return importance_loss(gates, reduce)
        if name == "load":
            return load_loss(lg, nz, 0.3, 2, reduce)
        if name == "switch":
            return switch_loss(gates, gates.argmax(dim=-1), reduce)
        if name == "z":
            return z_loss(lg, reduce)
        return balance_kl_loss(gates, reduce)

    recorded = []
    loss(slice(6, 10), lambda t: recorded.append(t.detach()) or t)
    part = loss(slice(0, 6), lambda t: t + recorded.pop(0))
    whole = loss(slice(None))
    assert not recorded and math.isclose(float(part.detach()), float(whole.detach()), rel_tol=1e-6)
    (grad_part,) = torch.autograd.grad(part, logits)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    assert grad_part[:, 6:].abs().max() == 0  # the other shard's tokens are the other process's to differentiate
    torch.testing.assert_close(grad_part[:, :6], grad_whole[:, :6], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(1, 8), (3, 8), (2, 3, 5), (1, 1)])
def test_small_cv_squared_is_the_aten_formula_with_its_first_and_second_derivatives(shape):
    # CPU tensors of up to SMALL_CV_VALUES values take the Python-float path (one autograd node); its value
    # and gradient are the ATen formula's to rounding, and its gradient of the gradient is the formula's own.
    from visionmoe.routing import losses

    torch.manual_seed(0)
    x = (torch.rand(shape) + 0.1).requires_grad_()
    small, aten = losses._cv_squared(x), losses._cv_squared_aten(x)
    assert type(small.grad_fn).__name__ == "_SmallCVSquaredBackward"
    torch.testing.assert_close(small, aten, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(small, x)[0], torch.autograd.grad(aten, x)[0], rtol=1e-5, atol=1e-7)
    x64 = x.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(losses._cv_squared, (x64,))
    assert torch.autograd.gradgradcheck(losses._cv_squared, (x64,))
    # by hand: [1.2, 0.8] has mean 1 and population variance 0.04; ∂/∂x = 2 (x - m) / (E m²) - 2 var / (E m³)
    pair = T([[1.2, 0.8]], requires_grad=True)
    loss = losses._cv_squared(pair)
    (grad,) = torch.autograd.grad(loss, pair)
    assert math.isclose(float(loss.detach()), 0.04, rel_tol=1e-6)
    torch.testing.assert_close(grad, T([[0.2 - 0.04, -0.2 - 0.04]]), rtol=1e-5, atol=1e-7)
    # zeros (every gate sum 0): the clamp keeps both at 0, as the ATen formula does
    zeros = torch.zeros(1, 8, requires_grad=True)
    assert float(losses._cv_squared(zeros).detach()) == 0.0
    assert not torch.autograd.grad(losses._cv_squared(zeros), zeros)[0].any()
    # larger tensors and other devices keep the ATen formula
    big = torch.rand(2, losses.SMALL_CV_VALUES)
    assert type(losses._cv_squared(big.requires_grad_()).grad_fn).__name__ != "_SmallCVSquaredBackward"
