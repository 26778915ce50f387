"""The MoE layer: fast path = einsum reference, gradients, shapes, grouping, determinism."""

import pytest
import torch
from torch import nn

import visionmoe
from visionmoe import MoE
from visionmoe.layers import ROUTERS, einsum_moe
from visionmoe.layers.dispatch import apply_plan

# Router settings that exercise dropping, dropless routing and multi-slot Soft MoE.
CASES = [
    ("topk", {"k": 1, "capacity_factor": 1.0}),
    ("topk", {"k": 2, "capacity_factor": 0.5, "router_options": {"batch_priority": True}}),
    ("topk", {"k": 2, "capacity_factor": None, "router_options": {"renormalize": True}}),
    ("sinkhorn_topk", {"k": 2, "capacity_factor": 1.0}),
    ("expert_choice", {"capacity_factor": 1.0}),
    ("expert_choice", {"capacity_factor": 2.0}),
    ("sinkhorn_expert_choice", {"capacity_factor": 1.25}),
    ("sparse_expert_choice", {"capacity_factor": 1.0}),
    ("soft", {"router_options": {"slots_per_expert": 2}}),
    ("soft_per_sample", {"router_options": {"slots_per_expert": 3}}),
    ("dense", {}),
    ("topk", {"k": 2, "capacity_factor": 1.0, "router_options": {"mlp_hidden_dim": 6}}),  # MLP gates
    ("sinkhorn_expert_choice", {"capacity_factor": 1.0, "router_options": {"mlp_hidden_dim": 6}}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def make(name, opts, dim=12, experts=4, hidden=10, **kw):
    torch.manual_seed(0)
    return MoE(dim, experts, hidden, router=name, **opts, **kw)


def grads(module, *tensors):
    return [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_fast_path_equals_einsum_reference(name, opts):
    moe = make(name, opts)
    x = torch.randn(3, 7, 12, requires_grad=True)
    routed = moe.router(x)  # one plan for both paths (noise is drawn once)
    fast = apply_plan(x, routed.plan, moe.experts)
    fast.square().sum().backward(retain_graph=True)
    fast_grads = grads(moe, x)
    moe.zero_grad()
    x.grad = None
    ref = einsum_moe(x, routed.plan, moe.experts)
    ref.square().sum().backward()
    ref_grads = grads(moe, x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 7, 12), (5, 12), (2, 12, 3, 4)], ids=["tokens", "vectors", "maps"])
def test_shapes_and_every_parameter_gets_a_gradient(name, opts, shape):
    moe = make(name, opts)
    x = torch.randn(*shape)
    for _ in range(2):  # every step, not just the first
        moe.zero_grad(set_to_none=True)
        y = moe(x)
        assert y.shape == x.shape and bool(torch.isfinite(y).all())
        (y.square().mean() + visionmoe.collect_aux_loss(moe)).backward()
        for pname, p in moe.named_parameters():
            assert p.grad is not None, f"{pname} got no gradient"
            assert bool(torch.isfinite(p.grad).all()), pname


def test_feature_map_channels_last_round_trip():
    moe = make("topk", {"k": 2, "capacity_factor": None}).eval()  # eval: no router noise
    x = torch.randn(2, 12, 3, 4).to(memory_format=torch.channels_last)
    y = moe(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # Spatial positions are the tokens: the same as routing the (B, H·W, C) sequence.
    tokens = x.permute(0, 2, 3, 1).reshape(2, 12, 12)
    torch.testing.assert_close(y.permute(0, 2, 3, 1).reshape(2, 12, 12), moe(tokens))


def test_one_expert_equals_plain_ffn():
    # One expert, k=1, dropless: the gate is softmax over one expert = 1, so the layer is the MLP.
    moe = MoE(12, 1, 20, router="topk", k=1, capacity_factor=None)
    ffn = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
    with torch.no_grad():
        moe.experts.w1[0].copy_(ffn[0].weight.T)
        moe.experts.b1[0].copy_(ffn[0].bias)
        moe.experts.w2[0].copy_(ffn[2].weight.T)
        moe.experts.b2[0].copy_(ffn[2].bias)
    x = torch.randn(4, 9, 12)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-5, atol=1e-6)
    # So does the dense router with E = 1.
    dense = MoE(12, 1, 20, router="dense")
    dense.experts.load_state_dict(moe.experts.state_dict())
    torch.testing.assert_close(dense(x), ffn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_batched_experts_are_each_experts_mlp(bias):
    # forward_batched (padded buffers, Soft MoE slots) against each expert as a plain MLP, with gradients.
    torch.manual_seed(0)
    experts = visionmoe.Experts(3, 8, 6, bias=bias)
    x = torch.randn(3, 7, 8, requires_grad=True)
    y = experts(x, "batched")
    expected = torch.stack(
        [
            torch.nn.functional.gelu(x[e] @ experts.w1[e] + (experts.b1[e] if bias else 0)) @ experts.w2[e]
            + (experts.b2[e] if bias else 0)
            for e in range(3)
        ]
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    params = [x, *experts.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dense_router_is_ffn_of_width_e_times_h():
    # Σ_e W2_e act(W1_e x + b1_e) + Σ_e b2_e is an FFN whose hidden units are the experts' side by side.
    moe = make("dense", {}, experts=3, hidden=5)
    E, D, H = moe.experts.w1.shape
    x = torch.randn(6, D)
    w1 = torch.cat(list(moe.experts.w1), dim=1)  # (D, E·H)
    h = torch.nn.functional.gelu(x @ w1 + moe.experts.b1.reshape(-1))
    expected = h @ moe.experts.w2.reshape(E * H, D) + moe.experts.b2.sum(0)
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)


def test_expert_without_tokens_gets_zero_gradient():
    # All tokens have positive features and only expert 0's gate row is nonzero, so with k=1 every
    # token picks expert 0; experts 1-3 receive nothing and must get zero (not None) gradients.
    moe = MoE(12, 4, 10, router="topk", k=1, capacity_factor=None, router_options={"noise_std": 0.0})
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0].fill_(1.0)
    x = torch.rand(2, 5, 12)
    moe(x).sum().backward()
    assert moe.last_stats.tokens_per_expert.tolist() == [10.0, 0.0, 0.0, 0.0]
    for p in (moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2):
        assert p.grad is not None and bool((p.grad[1:] == 0).all()) and bool((p.grad[0] != 0).any())


def test_eval_routing_is_deterministic_and_noise_only_in_training():
    moe = make("topk", {"k": 2, "capacity_factor": 1.0})
    x = torch.randn(4, 16, 12)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x), rtol=0, atol=0)
    moe.train()
    torch.manual_seed(1)
    a = moe(x)
    torch.manual_seed(2)
    b = moe(x)
    assert not torch.equal(a, b), "training noise (std 1/E) should change the routing"


def test_eval_capacity_factor():
    moe = make("topk", {"k": 1, "capacity_factor": 0.5, "eval_capacity_factor": 2.0})
    x = torch.randn(1, 16, 12)
    moe.train()(x)
    # Train: C = ceil(16·0.5/4) = 2 slots × 4 experts hold at most 8 of the 16 tokens.
    assert moe.router.training and moe.last_stats.dropped_fraction >= 0.5
    moe.eval()(x)
    # Eval: C = ceil(16·2/4) = 8; without noise each token's choice is the argmax of x Wᵀ, and
    # exactly the overflow beyond 8 per expert is dropped.
    assert moe.router.expert_capacity(16, 1) == 8
    counts = torch.bincount((x @ moe.router.weight.T).argmax(-1).flatten(), minlength=4)
    assert moe.last_stats.dropped_fraction == float((counts - 8).clamp_min(0).sum() / 16)


@pytest.mark.parametrize(
    ("shape", "groups"),
    [((6, 12), "sample"), ((6, 5, 12), "sample"), ((6, 12), 1), ((6, 6, 12), 3)],
    ids=["vectors", "tokens", "vectors-groups=1", "tokens-groups=3"],  # an int g dividing N: N/g groups per sample
)
def test_soft_per_sample_never_mixes_samples(shape, groups):
    moe = make("soft_per_sample", {"router_options": {"slots_per_expert": 2}}, groups=groups)
    x = torch.randn(*shape)
    other = x.clone()
    other[1:] = torch.randn_like(other[1:]) * 5  # change every sample but the first
    torch.testing.assert_close(moe(x)[0], moe(other)[0], rtol=0, atol=0)


def test_soft_per_sample_refuses_int_groups_that_span_samples():
    # N = 6 tokens per sample, B·N = 36: groups=4 divides the batch's 36 tokens but not a sample's 6,
    # so its groups would straddle samples (tokens 4-7 = sample 0's last two and sample 1's first two).
    moe = make("soft_per_sample", {}, groups=4)
    with pytest.raises(ValueError, match=r"^router 'soft_per_sample' routes per sample: groups=4 must divide N=6$"):
        moe(torch.randn(6, 6, 12))


def test_soft_over_the_batch_mixes_samples():
    # The failure mode Sun et al. name: with groups="batch", Soft MoE's dispatch softmax runs over
    # the batch, so sample 0's output changes when the other samples change.
    moe = make("soft", {}, groups="batch")
    x = torch.randn(6, 12)
    other = x.clone()
    other[1:] = torch.randn_like(other[1:])
    assert not torch.allclose(moe(x)[0], moe(other)[0])
    with pytest.raises(ValueError, match="routes per sample"):
        MoE(12, 4, 8, router="soft_per_sample", groups="batch")


def test_groups():
    x = torch.randn(4, 6, 12)
    per_sample = make("expert_choice", {"capacity_factor": 1.0})
    per_sample(x)
    assert per_sample.last_stats.tokens_per_expert.tolist() == [8.0] * 4  # 4 groups × ceil(6/4)=2
    batch = make("expert_choice", {"capacity_factor": 1.0}, groups="batch")
    batch(x)
    assert batch.last_stats.tokens_per_expert.tolist() == [6.0] * 4  # 1 group × ceil(24/4)=6
    sized = make("expert_choice", {"capacity_factor": 1.0}, groups=8)
    sized(x)
    assert sized.last_stats.tokens_per_expert.tolist() == [6.0] * 4  # 3 groups × ceil(8/4)=2
    with pytest.raises(ValueError, match="groups=5 tokens per group must divide the 24 tokens"):
        make("topk", {}, groups=5)(x)


def test_router_passed_as_class_and_listed_by_name():
    from visionmoe.layers import ExpertChoiceRouter

    moe = MoE(12, 4, 8, router=ExpertChoiceRouter, capacity_factor=2.0)
    assert isinstance(moe.router, ExpertChoiceRouter) and moe.router.capacity_factor == 2.0
    assert set(ROUTERS) == {
        "topk",
        "sinkhorn_topk",
        "expert_choice",
        "sinkhorn_expert_choice",
        "sparse_expert_choice",
        "soft",
        "soft_per_sample",
        "dense",
    }


def test_collect_aux_loss_sums_layers():
    model = nn.Sequential(make("topk", {"k": 2}), nn.GELU(), make("topk", {"k": 1}))
    x = torch.randn(2, 8, 12)
    model(x)
    expected = model[0].aux_loss + model[2].aux_loss
    torch.testing.assert_close(visionmoe.collect_aux_loss(model), expected)
    assert float(expected.detach()) > 0  # importance + load are on by default for topk
    assert set(visionmoe.collect_routing_stats(model)) == {"0", "2"}
    assert float(visionmoe.collect_aux_loss(nn.Linear(2, 2))) == 0.0


def test_mlp_gate_computes_gelu_mlp_logits():
    # D=3 → M=2 → E=2 with hand-set weights: h = gelu(W1 x + b1), logits = W2 h.
    # x = (1, 0, -1): W1 x + b1 = (x0 - x2, x1) = (2, 0); gelu(2) = 2·Φ(2) = 1.9545, gelu(0) = 0; W2 = I.
    router = visionmoe.layers.ROUTERS["topk"](3, 2, k=1, noise_std=0.0, mlp_hidden_dim=2)
    with torch.no_grad():
        router.hidden.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))  # rows: x0 - x2, x1
        router.hidden.bias.copy_(torch.tensor([0.0, 0.0]))
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[[1.0, 0.0, -1.0]]])  # (G=1, S=1, D=3): pre-activations (2, 0)
    logits = router.logits(x)
    assert torch.allclose(logits, torch.tensor([[[1.9545, 0.0]]]), atol=1e-4)
    assert [name for name, _ in router.named_parameters()] == ["weight", "hidden.weight", "hidden.bias"]
    assert router.weight.shape == (2, 2)  # the gate reads the MLP's hidden units
    with pytest.raises(ValueError, match="mlp_hidden_dim must be a positive int or None, got mlp_hidden_dim=0"):
        MoE(3, 2, 4, router="topk", router_options={"mlp_hidden_dim": 0})
    with pytest.raises(ValueError, match="mlp_hidden_dim"):  # Soft MoE has no gate to make an MLP of
        MoE(3, 2, 4, router="soft", router_options={"mlp_hidden_dim": 4})


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("training", [True, False])
def test_zero_tokens_give_the_empty_output_with_gradients(router, training):
    # (B, 0, D) in, (B, 0, D) out, as nn.Linear does: no error (the Sinkhorn routers took log(0 / E),
    # sparse expert choice indexed a 0-wide top-C), and every parameter gets a (zero) gradient.
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, router=router).train(training)
    x = torch.randn(2, 0, 8, requires_grad=True)
    y = moe(x)
    assert y.shape == (2, 0, 8)
    (y.sum() + visionmoe.collect_aux_loss(moe)).backward()
    assert x.grad.shape == (2, 0, 8)
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_transport_plans_of_zero_tokens_are_empty():
    from visionmoe.routing.sinkhorn import sinkhorn
    from visionmoe.routing.sparse_ot import sparse_ot_plan, sparse_simplex_projection

    assert sinkhorn(torch.zeros(3, 0, 4)).shape == (3, 0, 4)
    assert sparse_ot_plan(torch.zeros(3, 0, 4), capacity=0).shape == (3, 0, 4)
    assert torch.equal(sparse_simplex_projection(torch.ones(2, 5), 0), torch.zeros(2, 5))
