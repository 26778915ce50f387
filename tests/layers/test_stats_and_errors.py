"""Routing statistics, their accumulation, aux-loss configuration, and one-line errors on bad input."""

import contextlib
import dataclasses
import math

import pytest
import torch

from visionmoe import MoE, RoutingStatsAccumulator, native
from visionmoe.layers import ROUTERS, routing_stats
from visionmoe.routing import token_choice

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.unavailable_reason()}")


@pytest.fixture(params=["native", "aten"])
def counts_path(request):
    """Token-choice statistics counted by the C pass (native.plan_counts) and by ATen's scatter_add_."""
    if request.param == "native" and not native.available():
        pytest.skip(f"no native kernel: {native.unavailable_reason()}")
    with contextlib.nullcontext() if request.param == "native" else native.disabled():
        yield request.param


def test_stats_by_hand(counts_path):
    # Gates t0 = [0.7, 0.3], t1 = [0.6, 0.4], t2 = [0.2, 0.8], k=1, C=1: t1 is dropped.
    # Loads [1, 1]: CV 0, max/mean 1. One of three assignments dropped, one token unrouted.
    gates = torch.tensor([[[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]]])
    stats = routing_stats(token_choice(gates, 1, 1), gates, 1, 3)
    assert stats.tokens_per_expert.tolist() == [1.0, 1.0]
    assert stats.dropped_fraction == pytest.approx(1 / 3)
    assert stats.unrouted_fraction == pytest.approx(1 / 3)
    assert stats.load_cv == 0.0 and stats.load_max_over_mean == 1.0
    # Entropy: mean over tokens of -Σ p ln p.
    h = [-(a * math.log(a) + b * math.log(b)) for a, b in ((0.7, 0.3), (0.6, 0.4), (0.2, 0.8))]
    assert stats.router_entropy == pytest.approx(sum(h) / 3, rel=1e-6)


def test_unbalanced_load_stats_by_hand(counts_path):
    # k=1, dropless: t0, t1, t2 pick e0 (0.7, 0.6, 0.9), t3 picks e1 (0.8): loads [3, 1].
    # Mean 2, population std √(((3-2)² + (1-2)²)/2) = 1, so CV = 1/2 = 0.5 (the sample std √2 would give 0.71);
    # max/mean = 3/2 = 1.5.
    gates = torch.tensor([[[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.2, 0.8]]])
    stats = routing_stats(token_choice(gates, 1, None), gates, 1, 4)
    assert stats.tokens_per_expert.tolist() == [3.0, 1.0]
    assert stats.load_cv == 0.5
    assert stats.load_max_over_mean == 1.5
    assert stats.as_dict()["load_cv"] == 0.5 and stats.as_dict()["load_max_over_mean"] == 1.5


def test_accumulator_sums_batches(counts_path):
    # Batch 1 loads [1, 1] with 1 of 3 dropped; batch 2 (k=2, dropless) loads [3, 3], none dropped.
    # Together: loads [4, 4], 1 of 9 assignments dropped, 1 of 6 tokens unrouted.
    gates = torch.tensor([[[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]]])
    acc = RoutingStatsAccumulator()
    acc.update(routing_stats(token_choice(gates, 1, 1), gates, 1, 3))
    acc.update(routing_stats(token_choice(gates, 2, None), gates, 1, 3))
    total = acc.compute()
    assert total.tokens_per_expert.tolist() == [4.0, 4.0]
    assert total.dropped_fraction == pytest.approx(1 / 9)
    assert total.unrouted_fraction == pytest.approx(1 / 6)
    assert set(total.as_dict()) >= {"tokens_per_expert", "dropped_fraction", "load_cv", "router_entropy"}
    acc.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        acc.compute()


@needs_kernel
def test_plan_counts_by_hand():
    # K = 2, S = 3, choice-major: first choices e0 (kept), e1 (kept), e0 (dropped); second choices e1 (kept),
    # e1 (dropped), e0 (dropped). Kept per expert [1, 2]; token 2 has no kept choice.
    expert = torch.tensor([[0, 1, 0, 1, 1, 0]])
    kept = torch.tensor([[True, True, False, True, False, False]])
    counts, unrouted = native.plan_counts(expert, kept, 2, 2)
    assert counts.tolist() == [[1, 2]] and unrouted.tolist() == [1]
    with pytest.raises(ValueError, match=r"expert ids in \[0, 2\), got 1 outside"):
        native.plan_counts(torch.tensor([[0, 2]]), torch.tensor([[True, True]]), 1, 2)
    with pytest.raises(ValueError, match=r"K = 4 dividing K·S"):
        native.plan_counts(expert, kept, 4, 2)
    with pytest.raises(ValueError, match=r"needs int64 expert and bool kept .* got expert \(1, 6\) torch.int32"):
        native.plan_counts(expert.int(), kept, 2, 2)


@needs_kernel
@pytest.mark.parametrize(
    ("k", "capacity", "batch_priority"), [(1, 2, False), (2, 3, True), (3, 4, False), (2, None, True)]
)
def test_token_choice_stats_are_the_same_counted_in_c_or_by_aten(k, capacity, batch_priority):
    torch.manual_seed(0)
    gates = torch.randn(4, 37, 6).softmax(-1)
    plan = token_choice(gates, k, capacity, batch_priority=batch_priority)
    assert plan.token_order is not batch_priority
    stats = routing_stats(plan, gates, 4, 37)
    with native.disabled():
        reference = routing_stats(plan, gates, 4, 37)
    for field in dataclasses.fields(stats):
        assert torch.equal(getattr(stats, field.name), getattr(reference, field.name)), field.name
    assert stats.unrouted > 0 or capacity is None


def test_layer_records_stats_every_forward():
    moe = MoE(8, 4, 16, router="expert_choice", capacity_factor=1.0)
    acc = RoutingStatsAccumulator()
    for _ in range(3):
        moe(torch.randn(2, 8, 8))
        acc.update(moe.last_stats)
    # Expert choice fills every expert: 3 batches × 2 groups × ceil(8/4) = 12 tokens each.
    assert acc.compute().tokens_per_expert.tolist() == [12.0] * 4
    assert acc.compute().load_cv == 0.0


def test_aux_loss_weights_are_configurable():
    x = torch.randn(2, 8, 8)
    torch.manual_seed(0)
    plain = MoE(8, 4, 16, router="topk", aux_loss_weights={})
    plain(x)
    assert float(plain.aux_loss) == 0.0
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, router="topk", aux_loss_weights={"z": 0.5, "switch": 2.0, "balance_kl": 1.0})
    moe(x)
    parts = moe.last_aux_losses
    assert set(parts) == {"z", "switch", "balance_kl"}
    expected = 0.5 * parts["z"] + 2.0 * parts["switch"] + 1.0 * parts["balance_kl"]
    torch.testing.assert_close(moe.aux_loss.detach(), expected)


def test_default_aux_loss_weights():
    # V-MoE (Riquelme et al. 2021, App. A) adds λ·(½ L_imp + ½ L_load) with router noise σ = 1/E; its released
    # configs (google-research/vmoe) set importance_loss_weight = load_loss_weight = 0.005, i.e. λ = 0.01.
    from visionmoe.layers import ROUTERS

    assert ROUTERS["topk"](8, 4).aux_loss_weights == {"importance": 0.005, "load": 0.005}
    # Without noise there is no load loss (its Φ((threshold - logit)/σ) needs σ > 0): importance takes the
    # whole λ = 0.01.
    assert ROUTERS["topk"](8, 4, noise_std=0.0).aux_loss_weights == {"importance": 0.01}
    # The balanced routers add none by default.
    for name in ("sinkhorn_topk", "expert_choice", "sinkhorn_expert_choice", "sparse_expert_choice", "soft"):
        assert ROUTERS[name](8, 4).aux_loss_weights == {}, name
    # And the layer's aux loss is 0.005·L_imp + 0.005·L_load.
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, router="topk")
    moe(torch.randn(2, 8, 8))
    parts = moe.last_aux_losses
    assert set(parts) == {"importance", "load"}
    torch.testing.assert_close(moe.aux_loss.detach(), 0.005 * parts["importance"] + 0.005 * parts["load"])


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("k", [0, 5, -1])
def test_bad_k(k):
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="topk", k=k)
    assert f"k={k}" in one_line(e) and "num_experts=4" in one_line(e)


@pytest.mark.parametrize("factor", [0, -1.0, float("nan")])
def test_bad_capacity_factor(factor):
    for router in ("topk", "expert_choice"):
        with pytest.raises(ValueError) as e:
            MoE(8, 4, 16, router=router, capacity_factor=factor)
        assert f"capacity_factor={factor}" in one_line(e)
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="topk", eval_capacity_factor=factor)
    assert "eval_capacity_factor" in one_line(e)


def test_expert_choice_cannot_be_dropless():
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="expert_choice", capacity_factor=None)
    assert "needs a capacity_factor" in one_line(e)


def test_unknown_router_lists_the_names():
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="top2")
    message = one_line(e)
    assert "'top2'" in message and all(name in message for name in ROUTERS)


def test_unknown_router_option_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="expert_choice", k=2)
    assert "does not take k" in one_line(e) and "capacity_factor" in one_line(e)
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="sinkhorn_topk", router_options={"num_iter": 3})
    assert "num_iter" in one_line(e) and "num_iters" in one_line(e)


def test_option_given_twice():
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="topk", k=2, router_options={"k": 1})
    assert "k given both" in one_line(e)


def test_unknown_or_unsupported_aux_loss():
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="soft", aux_loss_weights={"importance": 0.1})
    assert "'importance'" in one_line(e)
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, router="topk", aux_loss_weights={"load": 0.1}, router_options={"noise_std": 0.0})
    assert "noise_std=0" in one_line(e)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4, 5, 8)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16)(torch.randn(*shape))
    assert str(tuple(shape)) in one_line(e)


@pytest.mark.parametrize("shape", [(2, 7), (2, 3, 7), (2, 7, 3, 3)])
def test_wrong_feature_size(shape):
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16)(torch.randn(*shape))
    assert "dim=8" in one_line(e) and "size 7" in one_line(e)


@pytest.mark.parametrize("name", [name for name in ROUTERS if name != "dense"])  # dense has no logits
def test_non_finite_router_logits(name):
    x = torch.randn(2, 4, 8)
    x[0, 1, 2] = float("nan")
    with pytest.raises(FloatingPointError) as e:
        MoE(8, 4, 16, router=name)(x)
    assert "not finite" in one_line(e) and name in one_line(e)


def test_router_finite_check_costs_no_host_sync_off_the_cpu():
    from visionmoe.layers.router_base import check_finite

    off_cpu = torch.full((2, 4), float("nan"), device="meta")  # stands in for an accelerator: cannot sync
    check_finite(off_cpu, "topk")  # skipped: no host sync per layer per step
    with torch.autograd.set_detect_anomaly(True), pytest.raises(RuntimeError, match="meta"):
        check_finite(off_cpu, "topk")  # anomaly mode asks for the check (meta cannot answer it)
    with pytest.raises(FloatingPointError, match="the topk router's logit tensor is not finite: 8 NaN"):
        check_finite(torch.full((2, 4), float("nan")), "topk")


def test_bad_groups_and_sizes():
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 16, groups="image")
    assert "'image'" in one_line(e)
    with pytest.raises(ValueError) as e:
        MoE(8, 0, 16)
    assert "num_experts=0" in one_line(e)
    with pytest.raises(ValueError) as e:
        MoE(8, 4, 0)
    assert "hidden_dim=0" in one_line(e)


@pytest.mark.parametrize("groups", ["sample", "batch", 2])
def test_aux_losses_pool_the_whole_batch_whatever_the_groups(groups):
    # A (B, D) head: with one group per sample (S = 1), a per-group importance loss would be the
    # CV² of one sample's gates. The loss is over the batch: CV² of the gate sums over all 6 samples.
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, router="topk", k=1, groups=groups, aux_loss_weights={"importance": 1.0})
    moe.router.noise_std = 0.0
    x = torch.randn(6, 8)
    moe(x)
    importance = (x @ moe.router.weight.T).softmax(-1).sum(0)  # (E,)
    expected = importance.var(unbiased=False) / importance.mean() ** 2
    torch.testing.assert_close(moe.aux_loss.detach(), expected)
