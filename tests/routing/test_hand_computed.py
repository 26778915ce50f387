"""Every router's dispatch D and combine C on small inputs, against values worked out by hand.

Logits are written as logs of probabilities where that makes the softmax obvious:
softmax([ln 0.7, ln 0.3]) = [0.7, 0.3].
"""

import math

import pytest
import torch

from visionmoe.routing import (
    DenseRouting,
    expert_capacity,
    expert_choice,
    sinkhorn,
    soft_per_sample_routing,
    soft_routing,
    sparse_ot_plan,
    sparse_simplex_projection,
    token_choice,
)

T = torch.tensor


def gates(*rows):
    """(1, S, E) gates from per-token rows."""
    return T([list(r) for r in rows], dtype=torch.float32)[None]


# Three tokens, two experts: t0 = [0.7, 0.3], t1 = [0.6, 0.4], t2 = [0.2, 0.8].
G3 = gates([0.7, 0.3], [0.6, 0.4], [0.2, 0.8])


def test_capacity_formula():
    # ceil(k·S·cf/E): ceil(2·16·1.25/8) = ceil(5.0) = 5; rounded up to a multiple of 4 -> 8.
    assert expert_capacity(16, 8, k=2, capacity_factor=1.25) == 5
    assert expert_capacity(16, 8, k=2, capacity_factor=1.25, multiple=4) == 8
    # 2·16·1.1/8 = 4.4 -> 5 (computed on the decimal 1.1, so no float spill to 6 either way).
    assert expert_capacity(16, 8, k=2, capacity_factor=1.1) == 5
    # 2·8·1.05/8 = 2.1 -> 3; a tiny factor still leaves one slot.
    assert expert_capacity(8, 8, k=2, capacity_factor=1.05) == 3
    assert expert_capacity(8, 8, k=1, capacity_factor=0.01) == 1
    # A capacity given directly wins over the factor, then gets rounded: 5 -> 8.
    assert expert_capacity(16, 8, capacity=5, capacity_factor=2.0, multiple=4) == 8
    assert expert_capacity(16, 8, capacity_factor=None) is None


def test_topk_k1_drops_past_capacity():
    # k=1, C=1. First choices: t0->e0, t1->e0, t2->e1. Token order: t0 takes e0's only slot,
    # t1 finds e0 full and is dropped (all-zero rows), t2 takes e1's slot.
    plan = token_choice(G3, k=1, capacity=1)
    combine = plan.combine_tensor()[0, :, :, 0]  # (S, E) at slot 0
    assert torch.allclose(combine, T([[0.7, 0.0], [0.0, 0.0], [0.0, 0.8]]))
    assert torch.equal(plan.dispatch_tensor()[0, :, :, 0], T([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    assert plan.kept.tolist() == [[True, False, True]]


def test_topk_k2_first_choices_before_second():
    # k=2, C=2. Priority: first choices t0->e0 (slot 0), t1->e0 (slot 1), t2->e1 (slot 0); then
    # second choices t0->e1 (slot 1), t1->e1 (slot 2: full, dropped), t2->e0 (slot 2: dropped).
    plan = token_choice(G3, k=2, capacity=2)
    C = plan.combine_tensor()[0]  # (S, E, C)
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 0], expected[0, 1, 1] = 0.7, 0.3
    expected[1, 0, 1] = 0.6
    expected[2, 1, 0] = 0.8
    assert torch.allclose(C, expected)
    # Renormalised over kept choices: t0 keeps 0.7+0.3 = 1 (unchanged); t1 keeps only 0.6 -> 1;
    # t2 keeps only 0.8 -> 1.
    C = token_choice(G3, k=2, capacity=2, renormalize=True).combine_tensor()[0]
    expected[1, 0, 1] = expected[2, 1, 0] = 1.0
    assert torch.allclose(C, expected)


def test_topk_dropless_capacity_is_largest_load():
    # Dropless k=1: e0 receives t0 and t1 (slots 0, 1), e1 receives t2: C = 2, nothing dropped.
    plan = token_choice(G3, k=1, capacity=None)
    assert plan.capacity == 2 and bool(plan.kept.all())
    assert torch.allclose(plan.combine_tensor()[0, 1, 0, 1], T(0.6))


def test_batch_prioritized_routing():
    # t0 = [0.6, 0.4], t1 = [0.9, 0.1]: both want e0, which has one slot. In token order t0 wins;
    # with BPR the more confident t1 (0.9 > 0.6) goes first and t0 is dropped.
    g = gates([0.6, 0.4], [0.9, 0.1])
    plain = token_choice(g, k=1, capacity=1).combine_tensor()[0, :, 0, 0]
    bpr = token_choice(g, k=1, capacity=1, batch_priority=True).combine_tensor()[0, :, 0, 0]
    assert torch.allclose(plain, T([0.6, 0.0]))
    assert torch.allclose(bpr, T([0.0, 0.9]))


def test_topk_ties_go_to_lower_expert():
    # [0.25, 0.5, 0.25] with k=2: e1 first, then the tie between e0 and e2 goes to e0.
    plan = token_choice(gates([0.25, 0.5, 0.25]), k=2, capacity=None)
    assert plan.expert.tolist() == [[1, 0]]


def test_sinkhorn_two_by_two():
    # logits [[2, 0], [1, 0]], ε = 1: the balanced plan (rows 1, columns S/E = 1) is
    # [[p, 1-p], [1-p, p]] with cross ratio p²/(1-p)² = e²·e⁰/(e⁰·e¹) = e, so p = √e/(1+√e).
    logits = T([[[2.0, 0.0], [1.0, 0.0]]])
    p = math.sqrt(math.e) / (1 + math.sqrt(math.e))  # 0.6225
    plan = sinkhorn(logits, num_iters=20)
    assert torch.allclose(plan[0], T([[p, 1 - p], [1 - p, p]]), atol=1e-5)


def test_sinkhorn_two_by_two_epsilon_2():
    # Same logits [[2, 0], [1, 0]], ε = 2: π = diag(u) exp(logits / ε) diag(v) is still [[p, 1-p], [1-p, p]]
    # (rows 1, columns S/E = 1), now with cross ratio p²/(1-p)² = exp((2 + 0 - 0 - 1)/ε) = e^½, so
    # p/(1-p) = e^¼ and p = e^¼/(1+e^¼) = 1.2840/2.2840 = 0.5622: nearer 1/2 than ε = 1's 0.6225.
    logits = T([[[2.0, 0.0], [1.0, 0.0]]])
    q = math.exp(0.25)
    p = q / (1 + q)  # 0.5622
    plan = sinkhorn(logits, num_iters=20, epsilon=2.0)
    assert torch.allclose(plan[0], T([[p, 1 - p], [1 - p, p]]), atol=1e-5)


def test_sinkhorn_topk_balances_where_softmax_does_not():
    # Same logits: softmax token choice sends both tokens to e0; top-1 on the Sinkhorn plan sends
    # t0 -> e0 (p = 0.62) and t1 -> e1 (p = 0.62). Combine weights stay the softmax gates:
    # t0: e²/(e²+1) = 0.8808, t1: 1/(e+1) = 0.2689.
    logits = T([[[2.0, 0.0], [1.0, 0.0]]])
    g = logits.softmax(-1)
    assert token_choice(g, k=1, capacity=None).expert.tolist() == [[0, 0]]
    plan = token_choice(g, k=1, capacity=None, select=sinkhorn(logits))
    assert plan.expert.tolist() == [[0, 1]]
    combine = plan.combine_tensor()[0, :, :, 0]
    e = math.e
    assert torch.allclose(combine, T([[e * e / (e * e + 1), 0.0], [0.0, 1 / (e + 1)]]), atol=1e-6)


def test_expert_choice():
    # C=1: e0 takes its best token t0 (0.7), e1 takes t2 (0.8); t1 is taken by no expert.
    C = expert_choice(G3, capacity=1).combine_tensor()[0, :, :, 0]
    assert torch.allclose(C, T([[0.7, 0.0], [0.0, 0.0], [0.0, 0.8]]))
    # C=2: e0 takes t0 (0.7, slot 0) then t1 (0.6, slot 1); e1 takes t2 (0.8) then t1 (0.4):
    # t1 is processed by both experts.
    C = expert_choice(G3, capacity=2).combine_tensor()[0]
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 0], expected[1, 0, 1] = 0.7, 0.6
    expected[2, 1, 0], expected[1, 1, 1] = 0.8, 0.4
    assert torch.allclose(C, expected)


def test_sinkhorn_expert_choice():
    # 3 tokens, 3 experts, C=1; logits t0 = [-3, 0, 1], t1 = [0, 0, 3], t2 = [-3, 2, -3].
    # Softmax gates per expert column:
    #   e0: t0 e⁻³/(e⁻³+1+e) = 0.013, t1 1/(2+e³) = 0.045, t2 e⁻³/(2e⁻³+e²) = 0.007  -> t1
    #   e1: t2 e²/(2e⁻³+e²) = 0.987 is the largest                                   -> t2
    #   e2: t1 e³/(2+e³) = 0.909 beats t0 e/(e⁻³+1+e) = 0.721                          -> t1
    # so softmax expert choice gives t1 two experts and t0 none.
    # The Sinkhorn plan must give every token mass 1 and every expert mass 1: t1 already fills
    # e0's column, so e2's mass goes to t0, and Sinkhorn expert choice picks t1, t2, t0.
    logits = T([[[-3.0, 0.0, 1.0], [0.0, 0.0, 3.0], [-3.0, 2.0, -3.0]]])
    g = logits.softmax(-1)
    assert expert_choice(g, capacity=1).token.tolist() == [[1, 2, 1]]
    plan = sinkhorn(logits, num_iters=20)
    # It is the Sinkhorn plan: marginals (rows 1, columns S/E = 1) and π = diag(u) exp(logits) diag(v),
    # i.e. log π - logits has no interaction term (its double-centred residual is 0).
    assert torch.allclose(plan.sum(1), torch.ones(1, 3), atol=1e-6)
    assert torch.allclose(plan.sum(2), torch.ones(1, 3), atol=1e-3)
    r = plan.log() - logits
    r = r - r.mean(1, keepdim=True) - r.mean(2, keepdim=True) + r.mean((1, 2), keepdim=True)
    assert r.abs().max() < 1e-5
    routing = expert_choice(g, capacity=1, select=plan)
    assert routing.token.tolist() == [[1, 2, 0]]
    # Combine weights are the softmax gates of the chosen pairs: (t1,e0), (t2,e1), (t0,e2).
    assert torch.allclose(routing.weight[0], torch.stack([g[0, 1, 0], g[0, 2, 1], g[0, 0, 2]]))


def test_sparse_simplex_projection():
    # v = [0.5, 0.2, -0.1], k=2, mass 1: keep [0.5, 0.2]; θ = (0.5+0.2-1)/2 = -0.15, so
    # [0.65, 0.35, 0]. With k=1 all mass goes to the largest entry.
    v = T([0.5, 0.2, -0.1])
    assert torch.allclose(sparse_simplex_projection(v, 2), T([0.65, 0.35, 0.0]))
    assert torch.allclose(sparse_simplex_projection(v, 1), T([1.0, 0.0, 0.0]))
    # v = [2, 0, 0], k=3: only j=1 satisfies v_j > (Σ_{i<=j} v_i - 1)/j (2 > 1; 0 < 0.5): [1, 0, 0].
    assert torch.allclose(sparse_simplex_projection(T([2.0, 0.0, 0.0]), 3), T([1.0, 0.0, 0.0]))
    # mass 3 over [1, 0, 0], k=2: θ = (1+0-3)/2 = -1 -> [2, 1, 0].
    assert torch.allclose(sparse_simplex_projection(T([1.0, 0.0, 0.0]), 2, mass=3.0), T([2.0, 1.0, 0.0]))


def test_sparse_expert_choice_dual_ascent():
    # logits [[2, 0], [1, 0]], C=1, γ=1, column mass S/E = 1, step γ/E = 0.5.
    # Iteration 0 (α = 0): e0's column [2, 1] -> all mass on t0; e1's [0, 0] ties -> t0.
    # Row sums [2, 0], so α += 0.5·(1 - [2, 0]) = [-0.5, 0.5].
    # Then e0's column [1.5, 1.5] ties -> t0, e1's [-0.5, 0.5] -> t1. Rows sum to 1: converged.
    logits = T([[[2.0, 0.0], [1.0, 0.0]]])
    assert torch.equal(sparse_ot_plan(logits, 1, num_iters=0)[0], T([[1.0, 1.0], [0.0, 0.0]]))
    plan = sparse_ot_plan(logits, 1, num_iters=5)
    assert torch.equal(plan[0], T([[1.0, 0.0], [0.0, 1.0]]))
    routing = expert_choice(logits.softmax(-1), capacity=1, select=plan)
    e = math.e
    assert torch.allclose(routing.combine_tensor()[0, :, :, 0], T([[e * e / (e * e + 1), 0.0], [0.0, 1 / (e + 1)]]))


def test_sparse_expert_choice_gamma_2():
    # logits [[2, 0], [1, 0]], C=1, γ=2, column mass S/E = 1, step γ/E/(1 + t/10) = 1/(1 + t/10).
    # Iteration 0 (α = 0): columns (α + logits)/γ: e0 [1, 0.5] -> t0; e1 [0, 0] ties -> t0. Rows [2, 0].
    # Step t=0 (size 1): α = 1·(1 - [2, 0]) = [-1, 1] (γ=1 took half that step, to [-0.5, 0.5]).
    # e0: ([-1, 1] + [2, 1])/2 = [0.5, 1] -> t1; e1: [-0.5, 0.5] -> t1: both experts pick t1 (γ=1 gave t0, t1).
    # Step t=1 (size 1/1.1): α = [-1, 1] + (1/1.1)·(1 - [0, 2]) = [-0.0909, 0.0909];
    # e0: [0.9545, 0.5455] -> t0; e1: [-0.0455, 0.0455] -> t1. Rows sum to 1: converged.
    logits = T([[[2.0, 0.0], [1.0, 0.0]]])
    assert torch.equal(sparse_ot_plan(logits, 1, gamma=2.0, num_iters=1)[0], T([[0.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(sparse_ot_plan(logits, 1, gamma=1.0, num_iters=1)[0], T([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(sparse_ot_plan(logits, 1, gamma=2.0, num_iters=5)[0], T([[1.0, 0.0], [0.0, 1.0]]))
    # γ also scales what is projected: one expert, logits [3, 0], C=2, mass S/E = 2, no iterations.
    # γ=1: [3, 0] -> ρ = 1 (0 > (3+0-2)/2 = 0.5 fails), θ = 1 -> [2, 0] (the next test).
    # γ=2: [1.5, 0] -> ρ = 2 (0 > (1.5+0-2)/2 = -0.25 holds), θ = -0.25 -> [1.75, 0.25]: both tokens kept.
    plan = sparse_ot_plan(T([[[3.0], [0.0]]]), 2, gamma=2.0, num_iters=0)
    assert torch.equal(plan[0, :, 0], T([1.75, 0.25]))


def test_sparse_expert_choice_may_take_fewer_than_capacity():
    # One expert, two tokens with logits [3, 0], C=2, mass S/E = 2, γ=1, no iterations:
    # projecting [3, 0] onto {t >= 0, Σt = 2}: θ = (3+0-2)/2 = 0.5 -> [2.5, -0.5] clipped ... so
    # ρ = 1 (0 > (3-2)/2 fails), θ = 1 -> [2, 0]: only t0 is chosen; t1's slot stays empty.
    logits = T([[[3.0], [0.0]]])
    plan = sparse_ot_plan(logits, 2, num_iters=0)
    assert torch.equal(plan[0, :, 0], T([2.0, 0.0]))
    routing = expert_choice(logits.softmax(-1), capacity=2, select=plan)
    assert routing.kept.tolist() == [[True, False]]
    assert torch.equal(routing.dispatch_tensor()[0, :, 0, :], T([[1.0, 0.0], [0.0, 0.0]]))


def test_soft_moe_weights():
    # One expert, P=2 slots, logits t0 = [ln 1, ln 3], t1 = [ln 3, ln 1].
    # Dispatch: softmax over tokens per slot: slot 0 [1, 3]/4, slot 1 [3, 1]/4.
    # Combine: softmax over slots per token: t0 [1, 3]/4, t1 [3, 1]/4.
    logits = T([[1.0, 3.0], [3.0, 1.0]]).log()[None, :, None, :]  # (G=1, S=2, E=1, P=2)
    plan = soft_routing(logits)
    assert torch.allclose(plan.dispatch_tensor()[0, :, 0], T([[0.25, 0.75], [0.75, 0.25]]))
    assert torch.allclose(plan.combine_tensor()[0, :, 0], T([[0.25, 0.75], [0.75, 0.25]]))
    # Here the dispatch happens to equal the combine; change t1 to [ln 1, ln 1]:
    # dispatch slot 0 = [1, 1]/2, slot 1 = [3, 1]/4; combine t1 = [1, 1]/2.
    logits = T([[1.0, 3.0], [1.0, 1.0]]).log()[None, :, None, :]
    plan = soft_routing(logits)
    assert torch.allclose(plan.dispatch[0, :, 0], T([[0.5, 0.75], [0.5, 0.25]]))
    assert torch.allclose(plan.combine[0, :, 0], T([[0.25, 0.75], [0.5, 0.5]]))
    # Per-sample: dispatch is normalised over each token's slots, like the combine.
    plan = soft_per_sample_routing(logits)
    assert torch.allclose(plan.dispatch[0, :, 0], T([[0.25, 0.75], [0.5, 0.5]]))
    assert torch.allclose(plan.combine[0, :, 0], T([[0.25, 0.75], [0.5, 0.5]]))


def test_dense_routing_is_identity_buffers():
    # Every expert's buffer holds every token in order: D[g, s, e, c] = [s == c], C = D.
    like = torch.zeros(1, 2, 4)
    plan = DenseRouting(1, 2, 3, like)
    D = plan.dispatch_tensor()
    assert D.shape == (1, 2, 3, 2)
    assert torch.equal(D[0, :, 1, :], torch.eye(2))
    assert torch.equal(plan.tokens_per_expert(), T([2.0, 2.0, 2.0]))


@pytest.mark.parametrize("k", [1, 2])
def test_topk_router_module_matches_function(k):
    # The module is the function on softmax(x Wᵀ) with V-MoE capacity (eval mode: no noise).
    from visionmoe.layers import TopKRouter
    from visionmoe.routing import softmax_experts

    router = TopKRouter(4, 3, k=k, capacity_factor=1.0).eval()
    x = torch.randn(2, 6, 4)
    out = router(x)
    expected = token_choice(softmax_experts(x @ router.weight.T), k, expert_capacity(6, 3, k=k, capacity_factor=1.0))
    assert torch.equal(out.plan.combine_tensor(), expected.combine_tensor())


def identity_gate(router):
    """``router`` in eval mode with W = I: its logits x Wᵀ are its input x, so x can be written as the logits."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts, router.dim))
    return router.eval()


def test_sinkhorn_topk_router_module_routes_on_the_plan():
    # The module on the logits of test_sinkhorn_topk_balances_where_softmax_does_not, k=1,
    # C = ceil(1·2·1.0/2) = 1. Softmax top-1 sends both tokens to e0, which keeps t0 and drops t1;
    # top-1 on the Sinkhorn plan [[0.62, 0.38], [0.38, 0.62]] sends t0 -> e0, t1 -> e1: nothing dropped.
    # Combine weights stay the softmax gates: t0 e²/(e²+1) = 0.8808, t1 1/(e+1) = 0.2689.
    from visionmoe.layers import SinkhornTopKRouter, TopKRouter

    logits = T([[[2.0, 0.0], [1.0, 0.0]]])
    softmax = identity_gate(TopKRouter(2, 2, k=1, capacity_factor=1.0))(logits).plan
    assert softmax.expert.tolist() == [[0, 0]] and softmax.kept.tolist() == [[True, False]]
    out = identity_gate(SinkhornTopKRouter(2, 2, k=1, capacity_factor=1.0))(logits)
    assert out.plan.expert.tolist() == [[0, 1]] and out.plan.kept.tolist() == [[True, True]]
    e = math.e
    combine = out.plan.combine_tensor()[0, :, :, 0]
    assert torch.allclose(combine, T([[e * e / (e * e + 1), 0.0], [0.0, 1 / (e + 1)]]), atol=1e-6)
    assert torch.allclose(out.gates, logits.softmax(-1))


@pytest.mark.parametrize("name", ["sinkhorn_expert_choice", "sparse_expert_choice"])
def test_transport_expert_choice_router_modules_route_on_the_plan(name):
    # The logits of test_sinkhorn_expert_choice, C = ceil(3·1.0/3) = 1: softmax expert choice takes
    # t1, t2, t1 (t1 twice, t0 never). Both transport plans give every token mass 1:
    # - Sinkhorn: t1 fills e0's column, so e2's mass goes to t0 (see test_sinkhorn_expert_choice);
    # - sparse OT (C=1, γ=1, step 1/3/(1 + t/10)): at α = 0 e0 [-3, 0, -3] -> t1, e1 [0, 0, 2] -> t2,
    #   e2 [1, 3, -3] -> t1; rows [0, 2, 1] move α by +s, -s, 0 with s = 1/3 + 0.3030 + 0.2778 + 0.2564 = 1.1706
    #   after 4 steps, when e2's t0 (1 + s = 2.17) passes its t1 (3 - s = 1.83) and e0, e1 keep t1, t2:
    #   rows [1, 1, 1], converged.
    # So both routers pick t1, t2, t0, combined with the softmax gates of (t1,e0), (t2,e1), (t0,e2).
    from visionmoe.layers import ROUTERS, ExpertChoiceRouter

    logits = T([[[-3.0, 0.0, 1.0], [0.0, 0.0, 3.0], [-3.0, 2.0, -3.0]]])
    softmax = identity_gate(ExpertChoiceRouter(3, 3, capacity_factor=1.0))(logits).plan
    assert softmax.token.tolist() == [[1, 2, 1]]
    plan = identity_gate(ROUTERS[name](3, 3, capacity_factor=1.0))(logits).plan
    assert plan.token.tolist() == [[1, 2, 0]] and plan.kept.tolist() == [[True, True, True]]
    g = logits.softmax(-1)
    assert torch.allclose(plan.weight[0], torch.stack([g[0, 1, 0], g[0, 2, 1], g[0, 0, 2]]))


@pytest.mark.parametrize("name", ["sinkhorn_topk", "sinkhorn_expert_choice"])
def test_sinkhorn_router_modules_take_epsilon(name):
    # router_options={"epsilon": 2} reaches the plan: on logits [[2, 0], [1, 0]] it is
    # [[p, 1-p], [1-p, p]] with p = e^¼/(1+e^¼) = 0.5622 (test_sinkhorn_two_by_two_epsilon_2), not ε = 1's 0.6225.
    from visionmoe import MoE

    router = MoE(2, 2, 4, router=name, capacity_factor=1.0, router_options={"epsilon": 2.0}).router
    assert router.epsilon == 2.0
    logits = T([[[2.0, 0.0], [1.0, 0.0]]])
    plan = router.select(logits) if name == "sinkhorn_topk" else router.select(logits, 1)
    q = math.exp(0.25)
    p = q / (1 + q)  # 0.5622
    assert torch.allclose(plan[0], T([[p, 1 - p], [1 - p, p]]), atol=1e-5)


def test_sparse_expert_choice_router_module_takes_gamma():
    # One expert, tokens with logits [3, 0], C = ceil(2·1.0/1) = 2, no dual steps: with γ=2 the
    # C-sparse projection of [1.5, 0] is [1.75, 0.25] and the expert takes both tokens; with γ=1 it is
    # [2, 0] and t1's slot stays empty (test_sparse_expert_choice_gamma_2).
    from visionmoe import MoE

    x = T([[[3.0], [0.0]]])
    for gamma, kept in ((2.0, [[True, True]]), (1.0, [[True, False]])):
        options = {"gamma": gamma, "num_iters": 0}
        moe = MoE(1, 1, 4, router="sparse_expert_choice", capacity_factor=1.0, router_options=options)
        plan = identity_gate(moe.router)(x).plan
        assert plan.kept.tolist() == kept, gamma


@pytest.mark.parametrize(("noise_std", "sigma"), [(None, 0.25), (0.5, 0.5)])
def test_topk_router_noise_scale(noise_std, sigma):
    # V-MoE's training gates softmax(x Wᵀ + σ ε), ε ~ N(0, 1) (the counter-based stream of
    # visionmoe.routing.noise, keyed from the default generator), with σ = 1/E = 1/4 by default. Redrawing ε
    # under the same seed recomputes them; σ = 1 would give other gates.
    from visionmoe.layers import TopKRouter
    from visionmoe.routing.noise import counter_normal, draw_key

    router = TopKRouter(3, 4, k=1, capacity_factor=None, noise_std=noise_std).train()
    assert router.noise_std == sigma
    x = torch.randn(2, 5, 3)
    logits = x @ router.weight.detach().T  # (G, S, E) = (2, 5, 4)
    torch.manual_seed(7)
    out = router(x)
    torch.manual_seed(7)
    eps = counter_normal((2, 5, 4), draw_key())
    torch.testing.assert_close(out.gates, (logits + sigma * eps).softmax(-1))
    assert not torch.allclose(out.gates, (logits + eps).softmax(-1), atol=1e-3)
    # Top-1 is taken on the noisy gates; eval mode adds no noise.
    assert torch.equal(out.plan.expert, (logits + sigma * eps).argmax(-1))
    torch.testing.assert_close(router.eval()(x).gates, logits.softmax(-1))


@pytest.mark.parametrize("experts", [3, 8, 15, 16, 40])
def test_softmax_experts_is_the_softmax(experts):
    # The expert-major softmax (E < 16 on the CPU) is softmax over the last axis, forward and backward,
    # up to float rounding; from E = 16 it is the last-axis softmax itself.
    from visionmoe.routing import softmax_experts

    logits = (3 * torch.randn(4, 33, experts, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(4, 33, experts, dtype=torch.float64)
    fast = softmax_experts(logits.float())
    ref = logits.softmax(-1)
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast.sum(-1), torch.ones(4, 33), rtol=0, atol=1e-6)
    (g_fast,) = torch.autograd.grad(fast, logits, grad.float())
    (g_ref,) = torch.autograd.grad(ref, logits, grad)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-6)
    if experts >= 16:
        x = logits.detach().float()
        assert torch.equal(softmax_experts(x), x.softmax(-1))
    # the double backward (Hessian-vector products of the router) goes through as well
    (g,) = torch.autograd.grad(softmax_experts(logits).square().sum(), logits, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), logits)
    (g_ref,) = torch.autograd.grad(logits.softmax(-1).square().sum(), logits, create_graph=True)
    torch.testing.assert_close(hv, torch.autograd.grad(g_ref.sum(), logits)[0])


def test_soft_router_logits_are_scaled_cosines():
    # x = [3, 4] normalises to [0.6, 0.8]; Φ's columns [1, 0] and [0, 2] normalise to e1, e2;
    # scale 2: logits = 2·[0.6, 0.8] = [1.2, 1.6]; one token, so dispatch = 1 for both slots and
    # combine = softmax([1.2, 1.6]) = [0.4013, 0.5987].
    from visionmoe.layers import SoftRouter

    router = SoftRouter(2, 2, slots_per_expert=1)
    with torch.no_grad():
        router.phi.copy_(T([[1.0, 0.0], [0.0, 2.0]])[:, :, None])
        router.scale.fill_(2.0)
    plan = router(T([[[3.0, 4.0]]])).plan
    assert torch.allclose(plan.dispatch[0, 0, :, 0], T([1.0, 1.0]))
    assert torch.allclose(plan.combine[0, 0, :, 0], T([1.2, 1.6]).softmax(0))


def test_stable_topk_fast_path_is_the_sort():
    # k <= 2 takes rounds of max on the CPU: the same indices as the stable sort, ties to the lower
    # index, and rows whose remaining scores are all -inf fall back to the sort.
    from visionmoe.routing.plan import stable_topk

    scores = torch.tensor([[0.2, 0.5, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3], [0.9, -math.inf, -math.inf, -math.inf]])
    for k in (1, 2):
        values, index = stable_topk(scores, k, dim=-1)
        sorted_values, sorted_index = torch.sort(scores, dim=-1, descending=True, stable=True)
        assert torch.equal(index, sorted_index[:, :k]) and torch.equal(values, sorted_values[:, :k])
    assert stable_topk(scores, 2, dim=-1)[1].tolist() == [[1, 2], [0, 1], [0, 1]]
    g = torch.randn(3, 50, 8).softmax(-1)
    assert torch.equal(stable_topk(g, 2, dim=-1)[1], torch.sort(g, dim=-1, descending=True, stable=True)[1][..., :2])
    gt = g.transpose(1, 2).contiguous().transpose(1, 2)  # expert-major gates, as softmax_experts returns them
    assert torch.equal(stable_topk(gt, 2, dim=-1)[1], stable_topk(g, 2, dim=-1)[1])


def test_kth_largest_counts_repeats():
    from visionmoe.routing.losses import _kth_largest

    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.5, -1.0, 4.0, 0.0]])
    # row 0: 3, 3, 2, 1 -> 2nd largest 3 (the repeat counts), 3rd 2; row 1: 4, 0.5, 0 -> 0.5, 0.
    assert _kth_largest(x, 1).squeeze(-1).tolist() == [3.0, 4.0]
    assert _kth_largest(x, 2).squeeze(-1).tolist() == [3.0, 0.5]
    assert _kth_largest(x, 3).squeeze(-1).tolist() == [2.0, 0.0]


def test_positions_in_expert_first_come_first_served():
    # First come, first served along A, per group: hand-computed, then against a loop over assignments.
    from visionmoe.routing import positions_in_expert

    expert = torch.tensor([[2, 0, 2, 2, 1, 0], [1, 1, 1, 0, 3, 1]])
    assert positions_in_expert(expert, 4).tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 0, 0, 3]]
    g = torch.Generator().manual_seed(0)
    for num_experts in (3, 8, 40):
        expert = torch.randint(0, num_experts, (5, 300), generator=g)
        expected = torch.zeros_like(expert)
        for row in range(expert.shape[0]):
            seen = [0] * num_experts
            for a, e in enumerate(expert[row].tolist()):
                expected[row, a], seen[e] = seen[e], seen[e] + 1
        assert torch.equal(positions_in_expert(expert, num_experts), expected), num_experts
