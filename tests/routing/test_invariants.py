"""Properties every plan must have, over many random logits, for every router."""

import pytest
import torch

from visionmoe.layers import ROUTERS
from visionmoe.layers.routers import SoftRouter
from visionmoe.routing import Routing, SoftRouting

SPARSE = [name for name, cls in ROUTERS.items() if not issubclass(cls, SoftRouter) and name != "dense"]
TOKEN_CHOICE = ["topk", "sinkhorn_topk"]


def random_plans(name, seeds=range(8), **options):
    """Plans of router ``name`` on random tokens of varied group sizes and logit scales."""
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        S, E, D = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g)), 8
        opts = dict(options)
        if name in TOKEN_CHOICE:
            opts.setdefault("k", min(2, E))
        torch.manual_seed(seed)
        router = ROUTERS[name](D, E, **opts)
        x = torch.randn(3, S, D, generator=g) * float(torch.rand((), generator=g) * 10)
        yield router.train()(x).plan, router


@pytest.mark.parametrize("name", list(ROUTERS))
def test_combine_nonnegative_and_shapes(name):
    for plan, router in random_plans(name):
        D, C = plan.dispatch_tensor(), plan.combine_tensor()
        assert D.shape == C.shape and D.shape[2] == router.num_experts
        assert bool((C >= 0).all()) and bool((D >= 0).all())


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_sparse_capacity_respected(name, capacity_factor):
    for plan, _ in random_plans(name, capacity_factor=capacity_factor):
        assert isinstance(plan, Routing)
        D = plan.dispatch_tensor()  # (G, S, E, C)
        assert bool((D.sum(1) <= 1).all()), "a slot holds at most one token"
        assert bool((D.sum((1, 3)) <= plan.capacity).all()), "an expert holds at most C tokens"
        assert bool((D.sum(3) <= 1).all()), "a token enters an expert at most once"
        assert bool((plan.weight[~plan.kept] == 0).all()), "dropped assignments weigh nothing"


@pytest.mark.parametrize("name", TOKEN_CHOICE)
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.25])
def test_token_choice_at_most_k(name, capacity_factor):
    for plan, router in random_plans(name, capacity_factor=capacity_factor):
        per_token = plan.dispatch_tensor().sum((2, 3))  # (G, S)
        assert bool((per_token <= router.k).all())
        if capacity_factor is None:
            assert bool((per_token == router.k).all()), "dropless keeps every choice"


def test_topk_combine_weights_are_the_softmax_gates():
    from visionmoe.layers import TopKRouter

    for seed in range(5):
        torch.manual_seed(seed)
        router = TopKRouter(8, 6, k=2, capacity_factor=0.75).eval()  # eval: no noise
        x = torch.randn(3, 20, 8)
        plan = router(x).plan
        gates = (x @ router.weight.T).softmax(-1)  # (G, S, E)
        expected = gates[torch.arange(3)[:, None], plan.token, plan.expert] * plan.kept
        torch.testing.assert_close(plan.weight, expected)
        # A token's kept gates sum to at most 1; renormalised, to exactly 1 where any is kept.
        assert bool((plan.combine_tensor().sum((2, 3)) <= 1 + 1e-6).all())
    for plan, _ in random_plans("topk", noise_std=0.0, renormalize=True, capacity_factor=None):
        assert torch.allclose(plan.combine_tensor().sum((2, 3)), torch.ones(()))


@pytest.mark.parametrize("name", ["expert_choice", "sinkhorn_expert_choice"])
def test_expert_choice_fills_every_expert(name):
    for plan, _ in random_plans(name, capacity_factor=1.0):
        assert bool(plan.kept.all())
        assert bool((plan.dispatch_tensor().sum((1, 3)) == plan.capacity).all())


def test_sparse_expert_choice_columns_within_capacity():
    for plan, _ in random_plans("sparse_expert_choice", capacity_factor=1.0):
        assert bool((plan.dispatch_tensor().sum((1, 3)) <= plan.capacity).all())


def test_soft_normalisation():
    for plan, _ in random_plans("soft", slots_per_expert=2):
        assert isinstance(plan, SoftRouting)
        assert torch.allclose(plan.dispatch.sum(1), torch.ones(()), atol=1e-5), "dispatch: 1 over tokens"
        assert torch.allclose(plan.combine.sum((2, 3)), torch.ones(()), atol=1e-5), "combine: 1 over slots"


def test_soft_per_sample_normalisation():
    for plan, _ in random_plans("soft_per_sample", slots_per_expert=2):
        assert torch.allclose(plan.dispatch.sum((2, 3)), torch.ones(()), atol=1e-5), "dispatch: 1 over slots"
        assert torch.allclose(plan.combine.sum((2, 3)), torch.ones(()), atol=1e-5)


def test_sinkhorn_marginals():
    from visionmoe.routing import sinkhorn

    for seed in range(5):
        logits = torch.randn(4, 32, 8, generator=torch.Generator().manual_seed(seed)) * 3
        plan = sinkhorn(logits, num_iters=200)
        assert torch.allclose(plan.sum(1), torch.full((4, 8), 32 / 8), atol=1e-4)  # experts: S/E
        assert torch.allclose(plan.sum(2), torch.ones(4, 32), atol=1e-3)  # tokens: 1


def test_sparse_ot_plan_balances():
    from visionmoe.routing import sparse_ot_plan

    logits = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(0))
    # Constraint not binding (C = S): quadratically-regularised OT, rows converge to exactly 1.
    plan = sparse_ot_plan(logits, capacity=32, num_iters=200)
    assert torch.allclose(plan.sum(1), torch.full((2, 4), 8.0), atol=1e-4)  # each column: S/E
    assert torch.allclose(plan.sum(2), torch.ones(2, 32), atol=1e-2)
    # Binding (C = 8 = S/E, a hard assignment): columns exact, at most C tokens each; the rows are
    # only approximately 1 (duality gap of the non-convex problem) but much closer than at α = 0.
    start = sparse_ot_plan(logits, capacity=8, num_iters=0)
    plan = sparse_ot_plan(logits, capacity=8, num_iters=50)
    assert torch.allclose(plan.sum(1), torch.full((2, 4), 8.0), atol=1e-4)
    assert bool(((plan > 0).sum(1) <= 8).all())
    gap = (plan.sum(2) - 1).abs().mean()
    assert gap < 0.1 < 0.8 < (start.sum(2) - 1).abs().mean()
