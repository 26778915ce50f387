"""visionmoe.native: the fused top-k router (the ATen router's plan, losses and gradients) and the row moves
(the ATen dispatch's output, bit for bit)."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from visionmoe import MoE, native
from visionmoe.layers import einsum_moe
from visionmoe.layers.dispatch import token_choice_moe
from visionmoe.layers.experts import Experts
from visionmoe.layers.routers import TopKRouter

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.unavailable_reason()}")

CASES = [
    {},  # the CNN default: E = 8, noisy top-2, capacity factor 1.25, importance and load losses
    {"k": 1, "capacity_factor": 0.5},
    {"k": 3, "capacity_factor": None},  # dropless
    {"k": 2, "router_options": {"noise_std": 0.0}},  # no noise: importance loss only
    {"k": 2, "router_options": {"renormalize": True}},
    {"k": 2, "aux_loss_weights": {"load": 0.3}},
    {"k": 2, "aux_loss_weights": {}},
    {"k": 2, "router_options": {"mlp_hidden_dim": 5}},
    {"k": 2, "groups": "batch"},
    {"k": 2, "groups": 12},
    {"num_experts": 16, "k": 2, "capacity_factor": 1.0},
]


def routed_twice(layer: MoE, x: torch.Tensor):
    """Forward and backward of ``layer`` with the fused router and with the ATen one, on the same noise."""
    runs = []
    for fused in (True, False):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            if fused:
                y = layer(x)
            else:
                with native.disabled():
                    y = layer(x)
        loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + 20 * layer.aux_loss
        grads = torch.autograd.grad(loss, [x, *layer.parameters()])
        runs.append((y, layer.aux_loss, dict(layer.last_aux_losses), layer.last_stats, grads))
    return runs


@needs_kernel
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fused_router_gives_the_aten_routers_results(case, training):
    torch.manual_seed(0)
    settings = {"num_experts": 8, **case}
    layer = MoE(8, settings.pop("num_experts"), 16, **settings).train(training)
    x = torch.randn(3, 8, 6, 4).to(memory_format=torch.channels_last).requires_grad_()
    assert layer.router.fused(torch.zeros(1, 1, layer.num_experts))
    (y, aux, losses, stats, grads), (y0, aux0, losses0, stats0, grads0) = routed_twice(layer, x)
    # the same plan (the kernel's gates differ from ATen's softmax by float rounding only)
    assert torch.equal(stats.tokens_per_expert, stats0.tokens_per_expert)
    assert (stats.dropped, stats.unrouted) == (stats0.dropped, stats0.unrouted)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, aux0, rtol=1e-5, atol=1e-7)
    assert losses.keys() == losses0.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], losses0[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.entropy_sum, stats0.entropy_sum, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(grads, grads0, strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("backend", ["padded", "sorted", "grouped"])
@pytest.mark.parametrize(("experts", "k", "capacity_factor"), [(8, 2, 1.25), (8, 1, 0.5), (4, 3, None), (16, 2, 1.0)])
def test_native_row_moves_give_the_aten_dispatch_bit_for_bit(backend, experts, k, capacity_factor):
    # The same plan through the layer's row moves, native and ATen: the same output bit for bit (the same
    # products and sums in the same order), the same gradients to rounding (the gates' row dot products).
    torch.manual_seed(0)
    layer = MoE(8, experts, 16, k=k, capacity_factor=capacity_factor)
    x = torch.randn(3, 8, 6, 6).to(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(3, 36, 8)
    x.requires_grad_()
    plan = layer.router(x).plan
    runs = []
    for on in (True, False):
        with contextlib.nullcontext() if on else native.disabled():
            y = token_choice_moe(x, plan, layer.experts, backend)
            inputs = [x, plan.weight, *layer.experts.parameters()]
            runs.append((y, torch.autograd.grad((y * y.detach().sign()).sum(), inputs, retain_graph=True)))
    (y, grads), (y0, grads0) = runs
    assert torch.equal(y, y0)
    for g, g0 in zip(grads, grads0, strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, einsum_moe(x, plan, layer.experts), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize(("groups", "k", "tokens"), [(1, 1, 5), (3, 2, 37), (2, 4, 9)])
def test_token_major_experts_is_the_transposed_masked_plan(groups, k, tokens):
    torch.manual_seed(0)
    expert = torch.randint(0, 8, (groups, k * tokens))
    kept = torch.rand(groups, k * tokens) < 0.7
    expected = torch.where(kept, expert, -1).reshape(groups, k, tokens).transpose(1, 2).reshape(-1, k)
    assert torch.equal(native.token_major_experts(expert, kept, k), expected)
    # by hand: one group, K = 2, S = 2: choices (e3 kept, e5 dropped | e1 kept, e0 kept) -> [[3, 1], [-1, 0]]
    hand = native.token_major_experts(torch.tensor([[3, 5, 1, 0]]), torch.tensor([[True, False, True, True]]), 2)
    assert hand.tolist() == [[3, 1], [-1, 0]]
    with pytest.raises(ValueError, match="K = 3 dividing"):
        native.token_major_experts(torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.bool), 3)


@needs_kernel
def test_fused_layer_equals_the_einsum_reference_and_ignores_the_thread_count():
    torch.manual_seed(0)
    layer = MoE(8, 8, 16, k=2, capacity_factor=0.75).eval()
    x = torch.randn(4, 10, 8)
    routed = layer.router(x)
    assert not routed.plan.kept.all()  # capacity drops some assignments
    torch.testing.assert_close(layer(x), einsum_moe(x, routed.plan, layer.experts), rtol=1e-5, atol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer.router(torch.randn(64, 64, 8, generator=torch.Generator().manual_seed(3)))
        torch.set_num_threads(2)
        two = layer.router(torch.randn(64, 64, 8, generator=torch.Generator().manual_seed(3)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.plan.weight, two.plan.weight) and torch.equal(one.aux_loss, two.aux_loss)


@needs_kernel
@pytest.mark.parametrize("experts", [8, 16])  # E = 8 takes the kernel's one-vector top-k, 16 its general one
def test_fused_router_breaks_ties_towards_the_lower_expert_and_fills_first_choices_first(experts):
    # Equal logits: every gate is 1/E; each token picks experts 0 then 1. Capacity 2 per expert (k = 2,
    # S = 4): expert 0 takes tokens 0, 1 (first choices), expert 1 too, and the rest drop.
    router = MoE(4, experts, 4, k=2, capacity_factor=experts / 4, router_options={"noise_std": 0.0}).router.eval()
    assert router.fused(torch.zeros(1, 1, experts))
    with torch.no_grad():
        router.weight.zero_()
    plan = router(torch.randn(1, 4, 4)).plan
    assert plan.capacity == 2
    assert plan.expert.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert plan.position.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert plan.kept.tolist() == [[True, True, False, False, True, True, False, False]]
    gate = 1 / experts
    assert plan.weight.tolist() == [[gate, gate, 0, 0, gate, gate, 0, 0]]


@needs_kernel
def test_fused_router_eight_tokens_at_a_time_give_the_one_token_results_bit_for_bit():
    # With E = 8 the kernel takes 8 tokens of a group to a vector (groups of S >= 8), else one at a time
    # (groups of one token): the same gates, choices, thresholds and logits' gradients, bit for bit.
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(40, 8), torch.randint(0, 3, (24, 8)).float()])  # ties in the last 24
    noise = torch.randn(64, 8)
    noise[40:] = 0.0  # so the ties stay ties
    runs = []
    for shape in ((2, 32, 8), (64, 1, 8)):
        x = logits.reshape(shape).requires_grad_()
        gates, weight, importance, load, expert, *_ = native.topk_router(x, noise.reshape(shape), 0.3, 2, None, True)
        loss = (gates * gates).sum() + (weight * weight).sum() + (importance * torch.arange(8.0)).sum() + load.sum()
        (grad,) = torch.autograd.grad(loss, x)
        per_token = expert.reshape(shape[0], 2, shape[1]).transpose(1, 2).reshape(64, 2)
        runs.append((gates.reshape(64, 8), per_token, grad.reshape(64, 8)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert runs[0][1][40:].tolist() == torch.sort(logits[40:], dim=1, stable=True, descending=True)[1][:, :2].tolist()


@needs_kernel
def test_fused_router_gives_no_subnormal_values():
    # Experts far below a token's others: their exp and erfc come out as 0, not as subnormal floats (slow
    # arithmetic); the load sums and gradients are still ATen's to rounding.
    from visionmoe.routing.losses import stay_probability

    torch.manual_seed(0)
    logits = torch.randn(2, 16, 8)
    logits[..., 3] -= 100.0  # e^-100 and erfc(~70) are far below the smallest normal float
    logits[0, :, 5] -= torch.linspace(5, 15, 16)  # erfc((threshold - l) / σ√2) across its range
    logits.requires_grad_()
    noise = torch.randn(2, 16, 8)
    gates, _, importance, load, *_ = native.topk_router(logits, noise, 0.125, 2, None, True)
    (grad,) = torch.autograd.grad(importance.sum() * 0.1 + (load * torch.arange(8.0)).sum(), logits)
    tiny = torch.finfo(torch.float32).tiny
    for t in (gates, load, grad):
        assert ((t == 0) | (t.abs() >= tiny)).all()
    assert (gates[..., 3] == 0).all() and (load[0, 3] == 0)
    noisy = (logits + 0.125 * noise).detach()
    threshold = noisy.topk(2, dim=-1).values[..., 1:]
    expected = stay_probability(logits.detach().double(), threshold.double(), 0.125).sum((0, 1))
    torch.testing.assert_close(load[0].double(), expected, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("experts", "tokens", "at"), [(8, 16, 9), (8, 13, 12), (16, 8, 3)])
def test_fused_router_finds_non_finite_logits_as_it_reads_them(bad, experts, tokens, at):
    # The kernel notes an inf or NaN logit in the 8-token blocks (E = 8), in the tokens after them, and
    # with E = 16 (one token at a time); the error is check_finite's, with the router's name and counts.
    layer = MoE(8, experts, 16, k=2)
    x = torch.randn(2, tokens, 8)
    assert layer.router.fused(torch.zeros(1, 1, experts))
    layer(x)  # finite: no error
    with torch.no_grad():
        logits = layer.router.logits(x)
    logits[1, at, experts - 1] = bad
    nan, inf = (1, 0) if bad != bad else (0, 1)
    with pytest.raises(
        FloatingPointError, match=f"the topk router's logit tensor is not finite: {nan} NaN and {inf} inf"
    ):
        native.topk_router(logits, None, 0.0, 2, None, False, "the topk router's logit tensor")
    x[1, at, 0] = bad
    with pytest.raises(FloatingPointError, match="topk router's logit tensor is not finite"):
        layer(x)
    # before the error, the kernel itself stays within its buffers: every expert id in range
    outputs = native._TopKRouter.apply(logits, None, 0.0, 2, 3, False, None)
    expert, position = outputs[4], outputs[5]
    assert int(expert.min()) >= 0 and int(expert.max()) < experts and int(position.max()) < 2 * tokens
    assert outputs[8].tolist() == [False, True]  # the group holding the bad logit is the one noted


@needs_kernel
def test_fused_router_forms_the_weighted_losses_in_its_node():
    # aux = Σ w · CV²(sums) and its gradient, in the router's one node: what cv_squared_loss of its sums gives.
    from visionmoe.routing.losses import cv_squared_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 24, 8, requires_grad=True)
    noise = torch.randn(3, 24, 8)
    weights = (("importance", 0.3), ("load", 0.7))
    *outputs, aux, values = native.topk_router(logits, noise, 0.125, 2, 8, True, aux_weights=weights)
    importance, load = outputs[2], outputs[3]
    expected = [cv_squared_loss(importance), cv_squared_loss(load)]
    torch.testing.assert_close(values, torch.stack(expected).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(aux, 0.3 * expected[0] + 0.7 * expected[1], rtol=1e-6, atol=0)
    assert not values.requires_grad
    (found,) = torch.autograd.grad(2 * aux + outputs[1].sum(), logits, retain_graph=True)
    (wanted,) = torch.autograd.grad(2 * (0.3 * expected[0] + 0.7 * expected[1]) + outputs[1].sum(), logits)
    torch.testing.assert_close(found, wanted, rtol=1e-5, atol=1e-7)
    *_, aux, values = native.topk_router(logits, noise, 0.125, 2, 8, False, aux_weights=(("importance", 1.0),))
    assert values.shape == (1,) and torch.equal(aux, values[0])
    with pytest.raises(ValueError, match=r"importance and load \(with load=True\), got \['load'\]"):
        native.topk_router(logits, noise, 0.125, 2, 8, False, aux_weights=(("load", 1.0),))
    with pytest.raises(ValueError, match=r"got \['z'\]"):
        native.topk_router(logits, noise, 0.125, 2, 8, True, aux_weights=(("z", 1.0),))


def hessian_vector_product(layer: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    """H v of the layer's loss in its parameters (as the Hessian analysis builds it), v drawn with seed 1."""
    params = list(layer.parameters())
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for p in params]
    loss = layer(x).square().sum() + 100 * layer.aux_loss
    g = torch.autograd.grad(loss, params, create_graph=True)
    return list(torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True)), params))


@needs_kernel
def test_fused_router_gradients_of_gradients_are_the_aten_formulas():
    # The Hessian analysis differentiates twice (eval mode, create_graph): the backward then builds the
    # ATen formula's graph, so H v is the ATen router's.
    torch.manual_seed(0)
    layer = MoE(8, 8, 16, k=2).eval()
    x = torch.randn(2, 8, 4, 4)
    fused = hessian_vector_product(layer, x)
    with native.disabled():
        aten = hessian_vector_product(layer, x)
    for a, b in zip(fused, aten, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_aten_path_where_the_kernel_does_not_apply():
    router = MoE(8, 8, 16, k=2).router
    logits = torch.zeros(1, 1, 8)
    assert router.fused(logits) == native.available()
    with native.disabled():
        assert not router.fused(logits) and native.unavailable_reason() == "switched off by visionmoe.native.disabled()"
    assert not router.fused(logits.double())  # float32 only
    assert not MoE(8, 4, 16, k=2).router.fused(torch.zeros(1, 1, 4))  # E not a multiple of 8
    assert not MoE(8, 8, 16, k=2, router_options={"batch_priority": True}).router.fused(logits)
    assert not MoE(8, 8, 16, k=2, aux_loss_weights={"switch": 0.01}).router.fused(logits)
    assert not MoE(8, 8, 16, router="sinkhorn_topk", k=2).router.fused(logits)  # its own top-k scores
    with pytest.raises(ValueError, match="E a multiple of 8 and 1 <= k <= min"):
        native.topk_router(torch.zeros(1, 2, 4), None, 0.0, 2, None, False)


@pytest.mark.parametrize(
    ("env", "reason"),
    [({"VISIONMOE_NATIVE": "0"}, "disabled by VISIONMOE_NATIVE"), ({"CC": "no-such-cc"}, "no C compiler found")],
)
def test_without_the_kernel_the_layer_runs_its_aten_path(env, reason, tmp_path):
    # No compiler (or switched off): available() says why, and the layer trains on its ATen path.
    code = (
        "import torch; from visionmoe import MoE, native\n"
        "print(native.available(), native.unavailable_reason())\n"
        "layer = MoE(8, 8, 16, k=2); y = layer(torch.randn(2, 8, 4, 4)); (y.sum() + layer.aux_loss).backward()\n"
        "print(bool(torch.isfinite(layer.router.weight.grad).all()))\n"
    )
    environ = {**os.environ, "VISIONMOE_CACHE": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("False") and reason in lines[0] and lines[1] == "True"
    assert not list(tmp_path.rglob("*.so"))


@needs_kernel
def test_the_kernel_is_built_once_into_the_cache(tmp_path):
    code = "from visionmoe import native; print(native.available())"
    environ = {**os.environ, "VISIONMOE_CACHE": str(tmp_path)}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
        assert done.stdout.strip() == "True"
    [built] = list(tmp_path.rglob("*.so"))
    assert built.parent == tmp_path / "native" and not [p for p in built.parent.iterdir() if p != built]


# ---- the fused backend: small experts in C, tiled per block of tokens or by expert -----------------------


def assert_same_at_every_thread_count(run, counts=(1, 2, 3)):
    """``run()``'s tensors are bit-identical whatever torch's (and so the kernels') thread count."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            runs.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def ffn_inputs(tokens, k, dim, hidden, experts, activation, bias, seed=0):
    torch.manual_seed(seed)
    layer = Experts(experts, dim, hidden, activation=activation, bias=bias)
    x = torch.randn(tokens, dim, requires_grad=True)
    expert = torch.randint(0, experts, (tokens, k))
    expert[torch.rand(tokens, k) < 0.25] = -1  # dropped choices
    weight = torch.rand(tokens, k, requires_grad=True)
    return layer, x, expert, weight


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.GELU])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("tokens", "k", "dim", "hidden", "experts"),
    [(37, 2, 8, 16, 8), (3000, 1, 16, 8, 3), (9, 3, 24, 40, 4), (203, 2, 32, 64, 8)],
)
def test_fused_experts_give_the_aten_formula(loop, activation, bias, tokens, k, dim, hidden, experts, monkeypatch):
    # Against the ATen formula in float64 (whose float32 run is itself not deterministic: its indexing
    # backward accumulates in a varying order), to float32 rounding of sums over up to 3,000 tokens; both
    # loops: tiled per block of tokens (small blocks here: several, the last one short) and tiled by expert
    # (experts' row counts not multiples of the register tile's 6 rows, nor of a tile's 48; H with and
    # without a 16-column block, 24 = 16 + 8 with a last block of 8; K = 1, 2, 3: the token of an
    # assignment found by a multiply).
    monkeypatch.setattr(native, "FFN_BLOCK_ROWS", 4)  # blocks of 16 tokens (8 experts, top-2), 12, 6 or 16
    layer, x, expert, weight = ffn_inputs(tokens, k, dim, hidden, experts, activation, bias)
    params = [x, weight, *layer.parameters()]
    exact = [p.detach().double().requires_grad_() for p in params]
    w1, w2, b1, b2 = exact[2:] if bias else (*exact[2:], None, None)
    y = native.expert_ffn(x, expert, weight, layer, loop=loop)
    y0 = native._ffn_reference(exact[0], expert, exact[1], w1, b1, w2, b2, layer.act)
    grad = torch.randn_like(y)
    torch.testing.assert_close(y, y0.float(), rtol=1e-5, atol=1e-5)
    pairs = zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(y0, exact, grad.double()), strict=True)
    for g, g0 in pairs:
        torch.testing.assert_close(g, g0.float(), rtol=1e-5, atol=1e-6 * float(g0.abs().max()) + 1e-6)
    # a dropped choice contributes nothing and its gate gets no gradient
    (dweight,) = torch.autograd.grad(native.expert_ffn(x, expert, weight, layer, loop=loop), weight, grad)
    assert bool((dweight[expert < 0] == 0).all())


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
def test_fused_experts_with_empty_experts_between_others(loop):
    # Experts 1, 4 and 7 get no row, 0 and 8 many (several tiles each): the tiled loop's look-ahead to the next
    # tile skips the empty experts; every gradient as the ATen formula's.
    layer, x, expert, weight = ffn_inputs(700, 2, 16, 24, 9, torch.nn.GELU, True, seed=3)
    expert[expert % 3 == 1] = -1
    params = [x, weight, *layer.parameters()]
    y = native.expert_ffn(x, expert, weight, layer, loop=loop)
    y0 = native._ffn_reference(x, expert, weight, layer.w1, layer.b1, layer.w2, layer.b2, layer.act)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    found = torch.autograd.grad(y, params, grad)
    for g, g0 in zip(found, torch.autograd.grad(y0, params, grad), strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4)
    for g in found[2:]:  # an expert with no row gets zero gradients, and the others do not
        assert bool((g[[1, 4, 7]] == 0).all()) and bool((g[[0, 8]] != 0).any())


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
@pytest.mark.parametrize("tokens", [48, 45])
def test_fused_experts_with_every_choice_kept(loop, tokens, monkeypatch):
    # No choice dropped: every block's assignments fill its whole part of the sorted order, so a tile's
    # spare rows (up to the register tile's 6) would run past its block, or past the last block's end (45
    # tokens: 3 full blocks of 15; 48: and a short one of 3); the blocked loop then computes them aside.
    monkeypatch.setattr(native, "FFN_BLOCK_ROWS", 10)  # blocks of 15 tokens (3 experts, top-2)
    layer, x, expert, weight = ffn_inputs(tokens, 2, 8, 16, 3, torch.nn.GELU, True, seed=5)
    expert = torch.stack([torch.randint(0, 3, (tokens,)), torch.randint(0, 3, (tokens,))], dim=1)
    params = [x, weight, *layer.parameters()]
    y = native.expert_ffn(x, expert, weight, layer, loop=loop)
    y0 = native._ffn_reference(x, expert, weight, layer.w1, layer.b1, layer.w2, layer.b2, layer.act)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    for g, g0 in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(y0, params, grad), strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
def test_fused_gelu_is_the_exact_gelu_and_its_derivative(loop):
    # One expert with identity weights: y = GELU(x), over [-12, 12] (both tails; Φ by the erf formula of
    # ATen's own GELU): as close to the float64 GELU and its derivative as ATen's float32 GELU is (both
    # ~4e-7 here).
    layer = Experts(1, 8, 8, activation=torch.nn.GELU, bias=False)
    with torch.no_grad():
        layer.w1.copy_(torch.eye(8))
        layer.w2.copy_(torch.eye(8))
    x = torch.linspace(-12, 12, 8 * 1001).reshape(-1, 8).requires_grad_()
    one = torch.zeros(x.shape[0], 1, dtype=torch.int64)
    y = native.expert_ffn(x, one, torch.ones(x.shape[0], 1), layer, loop=loop)
    (dx,) = torch.autograd.grad(y.sum(), x)
    exact = x.detach().double().requires_grad_()
    gelu = torch.nn.functional.gelu(exact)
    (slope,) = torch.autograd.grad(gelu.sum(), exact)
    assert float((y - gelu).detach().abs().max()) < 1e-6
    assert float((dx - slope).detach().abs().max()) < 1e-6


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
def test_fused_experts_without_grad_give_the_same_output(loop):
    # Without autograd the kernels keep nothing for a backward (no pre-activations or outputs stored):
    # the same output, bit for bit.
    layer, x, expert, weight = ffn_inputs(300, 2, 16, 48, 8, torch.nn.GELU, True)
    y = native.expert_ffn(x, expert, weight, layer, loop=loop)
    with torch.no_grad():
        assert torch.equal(native.expert_ffn(x, expert, weight, layer, loop=loop), y)


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
def test_fused_experts_with_every_choice_dropped(loop):
    # No kept choice at all (and so experts without rows): zero output, zero gradients everywhere.
    layer, x, expert, weight = ffn_inputs(10, 2, 8, 16, 4, torch.nn.GELU, True)
    expert[:] = -1
    y = native.expert_ffn(x, expert, weight, layer, loop=loop)
    assert not y.any()
    for g in torch.autograd.grad(y, [x, weight, *layer.parameters()], torch.randn_like(y)):
        assert not g.any()


@needs_kernel
def test_fused_experts_by_default_block_the_smaller_experts():
    # expert_ffn's default: blocked up to FFN_BLOCKED_WEIGHTS weights per layer (D·H), tiled above. The two
    # loops give the same output (the same products, added per token in the same order) but sum the weights'
    # gradients in other orders (per chunk of blocks, or per expert in one pass; 3000 tokens: 12 blocks), so
    # a default run's gradient equals one of them bit for bit.
    limit = native.FFN_BLOCKED_WEIGHTS // 8
    for hidden, loop in ((limit, "blocked"), (limit + 8, "tiled")):
        layer, x, expert, weight = ffn_inputs(3000, 2, 8, hidden, 8, torch.nn.ReLU, True)
        assert native.ffn_loop(8, hidden) == loop

        def w1_grad(loop=None, layer=layer, x=x, expert=expert, weight=weight):
            return torch.autograd.grad(native.expert_ffn(x, expert, weight, layer, loop=loop).sum(), layer.w1)[0]

        found = {name: w1_grad(name) for name in native.FFN_LOOPS}
        assert torch.equal(w1_grad(), found[loop])
        assert not torch.equal(found["blocked"], found["tiled"])
        torch.testing.assert_close(found["blocked"], found["tiled"])
    with pytest.raises(ValueError, match=r"loop must be one of .* got 'tokenwise'"):
        native.expert_ffn(x, expert, weight, layer, loop="tokenwise")


def test_fused_expert_blocks_hold_64_rows_per_expert():
    assert native.ffn_block(8, 2) == 256
    assert native.ffn_block(8, 1) == 512
    assert native.ffn_block(3, 2) == 96
    assert native.ffn_block(64, 3) == 1366  # rounded up


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
def test_fused_experts_with_no_tokens(loop):
    # No token at all (no block, no chunk of blocks): an empty output and zero weight gradients.
    layer, x, expert, weight = ffn_inputs(0, 2, 8, 16, 4, torch.nn.GELU, True)
    y = native.expert_ffn(x, expert, weight, layer, loop=loop)
    assert y.shape == (0, 8)
    found = torch.autograd.grad(y.sum(), [x, weight, *layer.parameters()])
    assert [tuple(g.shape) for g in found[:2]] == [(0, 8), (0, 2)]
    for g, p in zip(found[2:], layer.parameters(), strict=True):
        assert g.shape == p.shape and not g.any()


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
def test_fused_experts_hand_computed(loop):
    # One expert, D = H = 8, identity-like weights: y = w · relu(x + b1) · 2 + w · b2.
    layer = Experts(1, 8, 8, activation=torch.nn.ReLU)
    with torch.no_grad():
        layer.w1.copy_(torch.eye(8))
        layer.w2.copy_(2 * torch.eye(8))
        layer.b1.fill_(-1.0)
        layer.b2.fill_(0.5)
    x = torch.arange(8.0).reshape(1, 8)
    y = native.expert_ffn(x, torch.tensor([[0, -1]]), torch.tensor([[0.25, 0.75]]), layer, loop=loop)
    expected = 0.25 * (2 * torch.clamp(torch.arange(8.0) - 1, min=0) + 0.5)
    assert torch.equal(y[0], expected)


@needs_kernel
@pytest.mark.parametrize("loop", native.FFN_LOOPS)
def test_fused_experts_weight_gradients_ignore_the_thread_count(loop):
    # Per block of tokens, the weights' gradients are summed per fixed chunk of blocks, then over the chunks
    # in order (5000 tokens: 20 blocks of 256 in 5 chunks of 4); tiled, each expert's by one thread, its
    # rows in order: bit-identical whatever the threads.
    layer, x, expert, weight = ffn_inputs(5000, 2, 8, 16, 8, torch.nn.GELU, True)
    assert native.ffn_block(8, 2) == 256 and native._ffn_chunk(5000, 8 * (2 * 8 * 16 + 24), 256) == 4

    def run():
        y = native.expert_ffn(x, expert, weight, layer, loop=loop)
        return (y, *torch.autograd.grad(y.square().sum(), [x, weight, *layer.parameters()]))

    assert_same_at_every_thread_count(run)


def test_fused_expert_chunks_depend_on_the_shapes_only():
    assert native._ffn_chunk(10, 100) == 10  # one chunk (of tokens: the routers' logits)
    assert native._ffn_chunk(10, 100, 256) == 1  # of one block
    assert native._ffn_chunk(1024 * 64 * 4, 100, 256) == 16  # 1024 blocks in 64 chunks
    assert native._ffn_chunk(1024 * 64 * 4, 100) == 4096  # at most FFN_MAX_CHUNKS chunks
    assert native._ffn_chunk(100_000, native.FFN_MAX_PARTIAL // 2) == 50_000  # 2 buffers fit the budget
    assert native._ffn_chunk(100_000, 2 * native.FFN_MAX_PARTIAL) == 100_000  # one buffer, even over it


@needs_kernel
def test_fused_layer_gradients_of_gradients_are_the_aten_formulas():
    # The Hessian analysis on a model with the fused backend: the backward builds the ATen formula's graph.
    torch.manual_seed(0)
    layer = MoE(8, 8, 16, k=2, activation=torch.nn.ReLU, backend="fused").eval()
    x = torch.randn(2, 8, 4, 4)
    fused = hessian_vector_product(layer, x)
    layer.backend = "sorted"
    for a, b in zip(fused, hessian_vector_product(layer, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_backend_runs_auto_elsewhere():
    # Where the kernel cannot run (GELU tanh, H not a multiple of 8, float64, no kernel), the fused backend
    # computes the layer by auto's other choice: the same result.
    torch.manual_seed(0)
    tanh = MoE(8, 8, 16, k=2, activation=lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
    for layer in (tanh, MoE(8, 8, 12, k=2), MoE(8, 8, 16, k=2).double()):
        layer.eval()  # no router noise: the same plan twice
        x = torch.randn(2, 8, 4, 4, dtype=layer.experts.w1.dtype)
        layer.backend = "fused"
        y = layer(x)
        layer.backend = "sorted"
        torch.testing.assert_close(y, layer(x))
    layer = MoE(8, 8, 16, k=2, activation=torch.nn.ReLU).eval()
    with native.disabled():
        layer.backend = "fused"
        y = layer(x.float())
    layer.backend = "sorted"
    torch.testing.assert_close(y, layer(x.float()))


def test_flop_counting_sees_the_experts_of_the_fused_backend():
    # FlopCounterMode (the rho analysis) counts the experts' GEMMs: under it the fused backend runs auto's
    # other choice, whose GEMMs it sees.
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    layer = MoE(8, 8, 16, k=2, activation=torch.nn.ReLU).eval()
    x = torch.randn(2, 8, 16, 16)  # 1,024 assignments: not grouped_mm (which FlopCounterMode has no formula for)
    counts = {}
    for backend in ("fused", "auto"):
        layer.backend = backend
        with FlopCounterMode(display=False) as counter:
            layer(x)
        counts[backend] = counter.get_flop_counts()
    assert counts["fused"]["MoE.experts"] == counts["auto"]["MoE.experts"]
    assert sum(counts["fused"]["MoE.experts"].values()) > 0


def test_fused_experts_refuse_what_they_cannot_compute():
    # An Experts subclass (an expert-parallel shard holds some of the experts and exchanges rows in its own
    # forward) is not computed by the kernel; expert ids out of range are refused before C reads memory.
    from visionmoe.distributed.expert_parallel import ExpertShard

    assert issubclass(ExpertShard, Experts)

    class Shard(Experts):
        pass

    assert not native.ffn_supported(Shard(8, 8, 16, activation=torch.nn.ReLU))
    assert native.ffn_supported(Experts(8, 8, 16, activation=torch.nn.ReLU)) == native.available()
    if native.available():
        layer = Experts(4, 8, 16, activation=torch.nn.ReLU)
        with pytest.raises(ValueError, match=r"expert ids in \[-1, 4\), got"):
            native.expert_ffn(torch.randn(3, 8), torch.tensor([[0, 4]] * 3), torch.ones(3, 2), layer)


@needs_kernel
@pytest.mark.parametrize(("shape", "experts"), [((4, 37, 16), 8), ((2, 1024, 8), 8), ((3, 5, 64), 16)])
def test_router_logits_are_the_linear_map(shape, experts):
    # x Wᵀ and its gradients against the float64 F.linear, to float32 rounding; also on a channels-last
    # map's token view (rows of D at a stride, as MoE.to_tokens hands them to the router).
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(experts, shape[-1], requires_grad=True)
    y = native.router_logits(x, weight)
    grad = torch.randn_like(y)
    exact = [t.detach().double().requires_grad_() for t in (x, weight)]
    y0 = torch.nn.functional.linear(*exact)
    torch.testing.assert_close(y, y0.float(), rtol=1e-5, atol=1e-5)
    found, expected = torch.autograd.grad(y, [x, weight], grad), torch.autograd.grad(y0, exact, grad.double())
    for g, g0 in zip(found, expected, strict=True):
        torch.testing.assert_close(g, g0.float(), rtol=1e-5, atol=1e-5 * float(g0.abs().max()))
    image = torch.randn(2, shape[-1], 4, 4).contiguous(memory_format=torch.channels_last)
    tokens = image.permute(0, 2, 3, 1).reshape(2, 16, shape[-1])  # a view, rows at a stride
    torch.testing.assert_close(native.router_logits(tokens, weight), tokens @ weight.t(), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("dim", "experts"), [(8, 8), (32, 80)])
def test_router_logits_of_a_token_do_not_depend_on_its_place(dim, experts):
    # Tiles of 6 tokens, the last few through a zero-padded tile: a token's logits and input gradient are the
    # same bits alone, in a tile, or among the last rows of a batch.
    torch.manual_seed(0)
    x, weight = torch.randn(13, dim), torch.randn(experts, dim)
    grad = torch.randn(13, experts)

    def run(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x[rows].clone().requires_grad_()
        y = native.router_logits(xs, weight)
        return y.detach(), torch.autograd.grad(y, xs, grad[rows])[0]

    whole = run(slice(0, 13))
    for i in (0, 5, 6, 12):
        alone = run(slice(i, i + 1))
        assert torch.equal(alone[0][0], whole[0][i]) and torch.equal(alone[1][0], whole[1][i])
    shifted = run(slice(1, 13))  # every token one place earlier: tile members become tail rows and back
    assert torch.equal(shifted[0], whole[0][1:]) and torch.equal(shifted[1], whole[1][1:])


@needs_kernel
def test_router_logits_weight_gradient_ignores_the_thread_count():
    # dW summed per fixed chunk of tokens (5000 tokens: 5 chunks), then over the chunks in order.
    torch.manual_seed(0)
    x = torch.randn(5000, 16, requires_grad=True)
    weight = torch.randn(8, 16, requires_grad=True)
    grad = torch.randn(5000, 8)
    assert_same_at_every_thread_count(lambda: torch.autograd.grad(native.router_logits(x, weight), [x, weight], grad))


def test_router_logits_fall_back_where_the_kernel_does_not_apply():
    # D or E not a multiple of 8, D above LOGITS_MAX_DIM, float64, or a dispatch mode counting FLOPs (the rho
    # analysis must see the router's GEMM): F.linear, counted.
    from torch.utils.flop_counter import FlopCounterMode

    assert not native.logits_supported(torch.randn(2, 12), torch.randn(8, 12))
    assert not native.logits_supported(torch.randn(2, 16), torch.randn(6, 16))
    assert not native.logits_supported(torch.randn(2, 16).double(), torch.randn(8, 16).double())
    assert not native.logits_supported(torch.randn(2, 64), torch.randn(8, 64))  # from D = 64: the BLAS
    assert native.logits_supported(torch.randn(2, 16), torch.randn(8, 16)) == native.available()
    assert native.logits_supported(torch.randn(2, 32), torch.randn(8, 32)) == native.available()
    router = TopKRouter(16, 8, k=2)
    with FlopCounterMode(display=False) as counter:
        router.logits(torch.randn(3, 10, 16))
    assert counter.get_total_flops() == 2 * 30 * 16 * 8


# ---- the whole token-choice layer in one node -----------------------------------------------------------------


def layer_runs(layer: MoE, x: torch.Tensor, hooked: bool):
    """Forward and backward of ``layer`` on ``x`` with seed 1, its router's call watched by a hook or not."""
    handle = layer.router.register_forward_hook(lambda *_: None) if hooked else None
    try:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            x = x.detach().requires_grad_(x.requires_grad)
            y = layer(x)
            loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + 20 * layer.aux_loss
            inputs = [t for t in (x, *layer.parameters()) if t.requires_grad]
            grads = torch.autograd.grad(loss, inputs) if loss.requires_grad else ()
    finally:
        if handle is not None:
            handle.remove()
    return y, layer.aux_loss, dict(layer.last_aux_losses), layer.last_stats, grads


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@needs_kernel
@pytest.mark.parametrize(
    ("settings", "dim", "hidden", "training", "backend"),
    [
        ({}, 8, 8, True, "auto"),  # the CNN default: E = 8, noisy top-2, capacity factor 1.25, V-MoE losses
        ({"k": 1, "capacity_factor": 0.5, "activation": torch.nn.ReLU}, 16, 32, True, "auto"),
        ({"k": 3, "capacity_factor": None}, 8, 16, True, "auto"),  # dropless
        ({"router_options": {"noise_std": 0.0}}, 8, 16, True, "auto"),  # no noise: importance loss only
        ({"aux_loss_weights": {}}, 8, 16, True, "auto"),
        ({"aux_loss_weights": {"load": 0.3}}, 32, 64, True, "auto"),
        ({"num_experts": 16, "capacity_factor": 1.0}, 16, 16, True, "auto"),
        ({"groups": 12}, 8, 16, True, "auto"),
        ({"groups": "batch"}, 8, 16, True, "auto"),
        ({"activation": torch.nn.ReLU}, 32, 256, True, "auto"),  # the tiled experts' loop
        ({}, 8, 16, False, "fused"),  # eval: no noise, the eval capacity
    ],
)
def test_whole_layer_node_gives_the_routers_and_fused_experts_results_bit_for_bit(
    settings, dim, hidden, training, backend, monkeypatch
):
    # The layer in one autograd node (native.topk_moe) runs the kernels of the router's node and the fused
    # experts' node in the same order: the same output, losses, statistics and gradients, bit for bit.
    torch.manual_seed(0)
    settings = {"num_experts": 8, "k": 2, **settings}
    layer = MoE(dim, settings.pop("num_experts"), hidden, backend=backend, **settings).train(training)
    x = torch.randn(3, dim, 6, 4).to(memory_format=torch.channels_last).requires_grad_()
    calls = count_calls(monkeypatch, native, "topk_moe")
    y, aux, losses, stats, grads = layer_runs(layer, x, hooked=False)
    assert calls == ["topk_moe"]
    y0, aux0, losses0, stats0, grads0 = layer_runs(layer, x, hooked=True)  # a hook: the router called
    assert calls == ["topk_moe"]
    assert torch.equal(y, y0) and torch.equal(aux, aux0)
    assert losses.keys() == losses0.keys() and all(torch.equal(losses[n], losses0[n]) for n in losses)
    assert all(torch.equal(getattr(stats, f), getattr(stats0, f)) for f in vars(stats))
    assert len(grads) == len(grads0) == 1 + len(list(layer.parameters()))
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0, strict=True))


@needs_kernel
def test_whole_layer_node_without_an_input_gradient():
    # A first layer's input needs no gradient: the parameters' gradients are the three nodes'.
    torch.manual_seed(0)
    layer = MoE(8, 8, 16, k=2).train()
    x = torch.randn(2, 8, 4, 4)
    y, _, _, _, grads = layer_runs(layer, x, hooked=False)
    y0, _, _, _, grads0 = layer_runs(layer, x, hooked=True)
    assert torch.equal(y, y0) and len(grads) == len(list(layer.parameters()))
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0, strict=True))
    aux_only = []  # the aux loss alone: the router's backward without the experts'
    for hooked in (False, True):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            handle = layer.router.register_forward_hook(lambda *_: None) if hooked else None
            layer(x)
            if handle is not None:
                handle.remove()
        aux_only.append(torch.autograd.grad(layer.aux_loss, layer.router.weight)[0])
    assert torch.equal(*aux_only) and aux_only[0].abs().sum() > 0
    frozen = MoE(8, 8, 16, k=2).train().requires_grad_(False)
    frozen.experts.requires_grad_(True)  # the router frozen: no router backward is needed, the experts' still
    y, _, _, _, grads = layer_runs(frozen, x, hooked=False)
    y0, _, _, _, grads0 = layer_runs(frozen, x, hooked=True)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0, strict=True))


@needs_kernel
def test_whole_layer_node_is_left_where_it_would_not_give_the_same_calls(monkeypatch):
    # Hooks on the router (or on every module) must see its call; other routers, settings and backends, and
    # forward passes without grad under auto, take the router and the dispatch one after the other.
    calls = count_calls(monkeypatch, native, "topk_moe")
    x = torch.randn(2, 8, 4, 4)
    seen = []
    layer = MoE(8, 8, 16, k=2)
    layer.router.register_forward_pre_hook(lambda *_: seen.append("router"))
    layer(x)
    assert seen == ["router"]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        MoE(8, 8, 16, k=2)(x)
    finally:
        handle.remove()
    for layer in (
        MoE(8, 8, 16, k=2, router_options={"renormalize": True}),
        MoE(8, 8, 16, k=2, router_options={"mlp_hidden_dim": 5}),
        MoE(8, 8, 16, k=2, router_options={"batch_priority": True}),
        MoE(8, 8, 16, k=2, router="sinkhorn_topk"),
        MoE(8, 8, 16, k=2, backend="padded"),
        MoE(64, 8, 16, k=2),  # D > LOGITS_MAX_DIM: the router's logits by F.linear
        MoE(8, 8, 12, k=2),  # H not a multiple of 8: no fused experts
        MoE(8, 8, 16, k=2).double(),
    ):
        layer(torch.randn(2, layer.dim, 4, 4, dtype=layer.experts.w1.dtype))
    with torch.no_grad():
        MoE(8, 8, 16, k=2)(x)  # auto takes fused experts in training only
    grouped = MoE(8, 8, 16, k=2)
    grouped.router.aux_group = object()  # losses over several processes' batches: the differentiable sums
    assert grouped.router.fused_layer(torch.randn(2, 16, 8), grouped.experts, "auto") is None
    assert calls == []
    MoE(8, 8, 16, k=2)(x)
    assert calls == ["topk_moe"]


@needs_kernel
def test_whole_layer_node_gradients_of_gradients_are_the_three_nodes():
    # The Hessian analysis differentiates twice: the node's backward then builds the three nodes' graph.
    torch.manual_seed(0)
    for training in (True, False):
        layer = MoE(8, 8, 16, k=2).train(training)
        x = torch.randn(2, 8, 4, 4)
        with torch.random.fork_rng():
            whole = hessian_vector_product(layer, x)
        layer.router.register_forward_hook(lambda *_: None)
        for a, b in zip(whole, hessian_vector_product(layer, x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_whole_layer_node_reports_non_finite_logits():
    layer = MoE(8, 8, 16, k=2)
    x = torch.randn(2, 8, 4, 4)
    x[1, 3, 2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="the topk router's logit tensor is not finite: 8 NaN and 0 inf"):
        layer(x)


@needs_kernel
def test_whole_layer_node_refuses_what_it_cannot_compute():
    experts = Experts(8, 8, 16, activation=torch.nn.ReLU)
    x, weight = torch.randn(32, 8), torch.randn(8, 8)
    with pytest.raises(ValueError, match=r"aux losses are importance and load, got \['z'\]"):
        native.topk_moe(x, 16, weight, experts, None, 0.1, 2, 4, (("z", 1.0),))
    with pytest.raises(ValueError, match=r"the load loss needs router noise, got sigma=0\.0"):
        native.topk_moe(x, 16, weight, experts, None, 0.0, 2, 4, (("load", 1.0),))
    with pytest.raises(ValueError, match="1 <= k <= min"):
        native.topk_moe(x, 16, weight, experts, None, 0.1, 9, 4, ())
    with pytest.raises(ValueError, match=r"T a multiple of group_size=5, got \(32, 8\)"):
        native.topk_moe(x, 5, weight, experts, None, 0.1, 2, 4, ())


@needs_kernel
def test_whole_layer_node_without_grad_keeps_nothing_for_a_backward(monkeypatch):
    # Inference with the fused backend forced: the one node, the same output, no pre-activations kept.
    torch.manual_seed(0)
    layer = MoE(8, 8, 16, k=2, backend="fused").eval()
    x = torch.randn(2, 8, 4, 4)
    kept = []
    forward = native._ffn_forward
    monkeypatch.setattr(native, "_ffn_forward", lambda *args: kept.append(args[-1]) or forward(*args))
    with torch.no_grad():
        y = layer(x)
        layer.router.register_forward_hook(lambda *_: None)
        assert torch.equal(y, layer(x))
    assert kept == [False, False]  # the one node's experts, then the fused experts' node: neither keeps them


@needs_kernel
@pytest.mark.parametrize(("experts", "k", "capacity"), [(8, 2, 3), (8, 1, 1), (16, 3, None), (8, 2, 0)])
def test_router_kernel_places_each_tokens_choices_and_counts_the_plan(experts, k, capacity):
    # The whole-layer node takes the experts' token-major input and the statistics' counts from the router
    # kernel itself: what token_major_experts, the transposed weights and plan_counts give from its plan.
    torch.manual_seed(0)
    G, S = 3, 21
    logits = torch.randn(G, S, experts)
    routed = native._router_forward(logits, torch.randn(G, S, experts), 0.1, k, capacity, True, tokens=True)
    expert, kept, weight = routed[2], routed[4], routed[5]
    expert_t, weight_t, counts, unrouted = routed[10:]
    assert torch.equal(expert_t, native.token_major_experts(expert, kept, k))
    assert torch.equal(weight_t, weight.view(G, k, S).transpose(1, 2).reshape(G * S, k))
    wanted = native.plan_counts(expert, kept, k, experts)
    assert torch.equal(counts, wanted[0]) and torch.equal(unrouted, wanted[1])
    if capacity in (0, 1):  # some tokens with no choice kept: every one with capacity 0
        assert 0 < int(unrouted.sum()) <= G * S and (capacity or int(unrouted.sum()) == G * S)
    assert len(native._router_forward(logits, None, 0.0, k, capacity, False)) == 10  # without: as before


@needs_kernel
def test_whole_layer_node_ignores_the_thread_count():
    # Large enough for every kernel to split its work (the experts' weight gradients summed per fixed chunk).
    torch.manual_seed(0)
    layer = MoE(8, 8, 8, k=2, activation=torch.nn.ReLU).train()
    x = torch.randn(8, 8, 32, 32).to(memory_format=torch.channels_last)

    def run():
        y, aux, _, stats, grads = layer_runs(layer, x.requires_grad_(), hooked=False)
        return y, aux, stats.tokens_per_expert, *grads

    assert_same_at_every_thread_count(run)
