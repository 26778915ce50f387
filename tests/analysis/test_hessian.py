"""Hessian analysis against the exact Hessian of small models: HVP, Lanczos, power iteration, trace, SLQ."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from visionmoe import MoE
from visionmoe.analysis import (
    HessianOperator,
    hessian_params,
    hessian_summary,
    hutchinson_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
)

F64 = torch.float64
NO_NOISE = {"noise_std": 0.0}


def moe_model(k: int = 2, backend: str = "sorted", dtype: torch.dtype = F64) -> nn.Sequential:
    """Linear(4, 6) → MoE(D=6, E=3, H=4) on (B, D) vectors → Linear(6, 3).

    Params: 4·6+6 = 30; router 3·6 = 18; experts 3·(6·4 + 4 + 4·6 + 6) = 174; head 6·3+3 = 21.
    Total 243. (float64 needs a backend other than "auto", which may pick grouped_mm: fp32/bf16 only.)
    """
    torch.manual_seed(0)
    moe = MoE(6, 3, 4, router="topk", k=k, capacity_factor=None, router_options=NO_NOISE, backend=backend)
    return nn.Sequential(nn.Linear(4, 6), moe, nn.Linear(6, 3)).to(dtype)


def data(sizes=(5, 3), features: int = 4, classes: int = 3, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(sizes), features, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (sum(sizes),), generator=g)
    return x, y, list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def exact_hessian(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H of the mean cross-entropy on all of (x, y) at once, by torch.autograd.functional.hessian."""
    params = dict(model.named_parameters())
    flat = torch.cat([params[name].detach().reshape(-1) for name in names])
    sizes = [params[name].numel() for name in names]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        blocks = {name: b.view(params[name].shape) for name, b in zip(names, flat.split(sizes), strict=True)}
        return F.cross_entropy(functional_call(model, blocks, (x,)), y)

    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss, flat)


@pytest.fixture(scope="module")
def moe_case():
    model = moe_model()
    x, y, batches = data()
    op = HessianOperator(model, batches)
    return model, op, exact_hessian(model, op.names, x, y)


def test_hvp_equals_the_exact_hessian_times_v(moe_case):
    model, op, H = moe_case
    assert op.n == 243 and op.num_samples == 8
    # Batches of 5 and 3 samples: the operator sums 5/8 · H₁ + 3/8 · H₂, the Hessian of the mean over
    # all 8, which is what `exact_hessian` differentiates in one piece.
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(2), dtype=F64)
    hv = op.hvp(v)
    # The router computes its logits in fp32, so the float64 products agree to ~1e-7, not 1e-15.
    assert torch.linalg.norm(hv - H @ v) <= 1e-6 * torch.linalg.norm(H @ v)
    assert torch.allclose(op.to_dense(), H, rtol=0, atol=1e-6 * H.abs().max())
    assert op.loss() == pytest.approx(F.cross_entropy(model(data()[0]), data()[1]).item(), rel=1e-12)


def test_lanczos_top_eigenvalues_match_the_exact_ones(moe_case):
    _, op, H = moe_case
    exact, vectors = torch.linalg.eigh(H)  # ascending
    assert exact[0] < 0 < exact[-1]  # an indefinite Hessian: the sign question is a real one
    eig = top_eigenvalues(op, k=3)
    assert eig.method == "lanczos" and eig.vectors.shape == (3, 243)
    for got, want in zip(eig.values, exact.flip(0)[:3].tolist(), strict=True):
        assert got == pytest.approx(want, rel=1e-4)
    # Unit eigenvectors, equal to the exact ones up to sign: |⟨u, u*⟩| = 1.
    assert abs(float(eig.vectors[0] @ vectors[:, -1])) == pytest.approx(1.0, abs=1e-6)
    assert torch.linalg.norm(H @ eig.vectors[0] - eig.values[0] * eig.vectors[0]) < 1e-6
    power = power_iteration(op, tol=1e-8)
    assert power.values[0] == pytest.approx(exact[-1].item(), rel=1e-4)


def test_hutchinson_trace_within_three_standard_errors(moe_case):
    _, op, H = moe_case
    est = hutchinson_trace(op, probes=200, seed=0)
    assert est.probes == len(est.samples) == 200  # every probe counted ...
    assert min(est.samples) < 0  # ... negative ones included (H is indefinite)
    assert abs(est.mean - H.trace().item()) <= 3 * est.stderr
    # Var(zᵀHz) for Rademacher z is 2 Σ_{i≠j} H_ij² = 2 (‖H‖_F² − Σ H_ii²); stderr = √(Var / 200).
    expected = math.sqrt(2 * (H.square().sum() - H.diagonal().square().sum()).item() / 200)
    assert est.stderr == pytest.approx(expected, rel=0.25)
    assert hutchinson_trace(op, probes=3, seed=0).samples == est.samples[:3]  # seeded: the same probes


def test_slq_weights_density_and_trace(moe_case):
    _, op, H = moe_case
    exact = torch.linalg.eigvalsh(H)
    sd = spectral_density(op, probes=2, steps=80, seed=0)
    assert sd.nodes.shape == sd.weights.shape == (2, 80)
    assert torch.allclose(sd.weights.sum(-1), torch.ones(2, dtype=F64), atol=1e-10)  # ‖U[0, :]‖² = 1
    # Ritz values lie inside the spectrum, and the extreme ones converge first.
    assert exact[0] - 1e-8 <= sd.nodes.min() and sd.nodes.max() <= exact[-1] + 1e-8
    assert sd.nodes.max().item() == pytest.approx(exact[-1].item(), rel=1e-4)
    grid, phi = sd.density()
    assert torch.trapezoid(phi, grid).item() == pytest.approx(1.0, abs=1e-3)
    assert (phi >= 0).all()
    # Σ_j τ_j θ_j = e₁ᵀ T e₁ = α₁ = zᵀHz / n for the start vector z: n times it is the Hutchinson sample
    # of the same Rademacher probe (both draw their probes first from the seeded generator).
    hutch = hutchinson_trace(op, probes=2, seed=0)
    assert sd.trace() == pytest.approx(hutch.mean, rel=1e-6)  # equal up to the fp32 router's rounding


class Cubic(nn.Module):
    """logits = (z, 0) with z = x₀ Σ aᵢ³ + x₁ Σ cᵢ: curvature from the cubic outweighs the CE's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.full((3,), 0.5, dtype=F64))
        self.c = nn.Parameter(torch.zeros(3, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x[:, 0] * self.a.pow(3).sum() + x[:, 1] * self.c.sum()
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_largest_algebraic_not_largest_magnitude_eigenvalue():
    # x = (1, 1), label 0: z = 3 · 0.5³ = 0.375, p = σ(0.375) = 0.5927; L = −log p, so
    # L' = p − 1 = −0.4073, L'' = p(1 − p) = 0.2414. ∇z = (0.75, 0.75, 0.75, 1, 1, 1), ∇²z = diag(3, 3, 3, 0, 0, 0).
    # H = L'' ∇z∇zᵀ + L' ∇²z. Eigenvalues: on a ⊥ (1,1,1): 3L' = −1.2220 (twice); on c ⊥ (1,1,1): 0 (twice);
    # on span{(1,1,1,0,0,0)/√3, (0,0,0,1,1,1)/√3}: [[3·0.5625 L'' + 3L', 3·0.75 L''], [·, 3L'']]
    #   = [[−0.8147, 0.5431], [0.5431, 0.7243]] → −0.0452 ± √(0.7695² + 0.5431²) = 0.8967, −0.9871.
    # Largest magnitude −1.2220 (what plain power iteration finds); largest algebraic 0.8967.
    model = Cubic()
    x, y = torch.ones(1, 2, dtype=F64), torch.zeros(1, dtype=torch.long)
    exact = torch.linalg.eigvalsh(exact_hessian(model, ["a", "c"], x, y))
    assert exact[0].item() == pytest.approx(-1.2220, abs=1e-4) and exact[-1].item() == pytest.approx(0.8967, abs=1e-4)
    assert abs(exact[0]) > abs(exact[-1])
    op = HessianOperator(model, (x, y))
    lanczos = top_eigenvalues(op, k=1)
    assert lanczos.values[0] == pytest.approx(exact[-1].item(), rel=1e-6)
    power = power_iteration(op, tol=1e-10, max_iter=500)
    assert power.shift == pytest.approx(1.2220, abs=1e-3)  # stage 1 found |λ| = 1.2220 and shifted by it
    assert power.values[0] == pytest.approx(exact[-1].item(), rel=1e-4)


class WithSpare(nn.Module):
    """The MoE model plus a module the forward never calls (its gradient is None, not zero)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.spare = net, nn.Linear(2, 2, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("backend", ["sorted", "padded"])
def test_expert_without_tokens_and_unused_parameters(backend):
    net = moe_model(k=1, backend=backend)
    moe = net[1]
    with torch.no_grad():  # logits (l, −l, 0): max(l, −l) >= 0 = expert 2's, and ties go to the lower index
        moe.router.weight[1] = -moe.router.weight[0]
        moe.router.weight[2] = 0.0
    model = WithSpare(net)
    x, y, batches = data()
    op = HessianOperator(model, batches)
    assert op.n == 243 + 6  # spare: 2·2 + 2
    hv = op.unflatten(op.hvp(torch.ones(op.n, dtype=F64)))
    assert moe.last_stats.tokens_per_expert[2] == 0 and moe.last_stats.tokens_per_expert.sum() == 3  # last batch
    for name in ("w1", "b1", "w2", "b2"):
        assert torch.equal(hv[f"net.1.experts.{name}"][2], torch.zeros_like(hv[f"net.1.experts.{name}"][2]))
        assert hv[f"net.1.experts.{name}"][:2].abs().sum() > 0
    assert torch.equal(hv["spare.weight"], torch.zeros(2, 2, dtype=F64))
    H = exact_hessian(model.net, hessian_params(model.net), x, y)
    assert torch.allclose(op.hvp(torch.ones(op.n, dtype=F64))[:243], H.sum(1), rtol=0, atol=1e-6)


def test_parameter_groups():
    model = moe_model()
    assert hessian_params(model, "router") == ["1.router.weight"]
    assert hessian_params(model, "experts") == [f"1.experts.{n}" for n in ("w1", "w2", "b1", "b2")]
    assert hessian_params(model, "backbone") == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(hessian_params(model, "all")) == 1 + 4 + 4
    _, _, batches = data()
    sizes = {group: HessianOperator(model, batches, group).n for group in ("router", "experts", "backbone", "all")}
    assert sizes == {"router": 18, "experts": 174, "backbone": 30 + 21, "all": 243}
    assert HessianOperator(model, batches, ["2.bias", "0.weight"]).names == ["0.weight", "2.bias"]  # model order
    groups = "all, router, experts, backbone, head"
    with pytest.raises(
        ValueError, match=f"unknown parameter group 'gate'; choose one of: {groups}, or a list of names"
    ):
        hessian_params(model, "gate")
    with pytest.raises(ValueError, match=r"unknown parameter names \['1.gate'\]"):
        hessian_params(model, ["1.gate"])
    # The router's Hessian is the router block of the full one: H_rr v = (H [0; v; 0])_r, router params at 30..47.
    v = torch.randn(18, generator=torch.Generator().manual_seed(6), dtype=F64)
    padded = torch.zeros(243, dtype=F64)
    padded[30:48] = v
    router_hv = HessianOperator(model, batches, "router").hvp(v)
    assert torch.allclose(router_hv, HessianOperator(model, batches).hvp(padded)[30:48], rtol=0, atol=1e-10)


class SplitClassifier(nn.Module):
    """timm's split: features = tanh(Linear(4, 6)); head = MoE(D=6, E=3, H=4) → Linear(6, 3).

    Head params: router 18 + experts 174 + fc 21 = 213; the stem's 30 are the backbone.
    """

    def __init__(self, odd_forward: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 6)
        self.moe = MoE(6, 3, 4, router="topk", k=2, capacity_factor=None, router_options=NO_NOISE, backend="sorted")
        self.fc = nn.Linear(6, 3)
        self.odd_forward = odd_forward

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.moe(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_head(self.forward_features(x))
        return out + 1.0 if self.odd_forward else out  # odd: forward is not head(features)


def test_head_group_runs_on_cached_features_and_matches_the_exact_hessian():
    model = SplitClassifier().double()
    x, y, batches = data()
    head = ["moe.router.weight", *(f"moe.experts.{n}" for n in ("w1", "w2", "b1", "b2")), "fc.weight", "fc.bias"]
    assert hessian_params(model, "head", example=x) == head
    cached = HessianOperator(model, batches, "head")
    plain = HessianOperator(model, batches, "head", cache_features=False)
    assert cached.cached and not plain.cached and cached.n == plain.n == 213
    assert cached.batches[0][0].shape == (5, 6)  # the features, not the images
    v = torch.randn(213, generator=torch.Generator().manual_seed(7), dtype=F64)
    H = exact_hessian(model, head, x, y)
    assert torch.allclose(cached.hvp(v), plain.hvp(v), rtol=0, atol=1e-12)
    assert torch.linalg.norm(cached.hvp(v) - H @ v) <= 1e-6 * torch.linalg.norm(H @ v)
    assert cached.loss() == pytest.approx(plain.loss(), rel=1e-12)
    # Anything that reaches the features cannot be cached; asking for it anyway is an error.
    assert not HessianOperator(model, batches, "all").cached
    with pytest.raises(ValueError, match="impossible here: some selected parameters are used by forward_features"):
        HessianOperator(model, batches, "all", cache_features=True)
    # A forward that is not forward_head(forward_features(x)) is noticed, and nothing is cached.
    assert not HessianOperator(SplitClassifier(odd_forward=True).double(), batches, "head").cached
    with pytest.raises(ValueError, match="needs an example input"):
        hessian_params(model, "head")
    with pytest.raises(ValueError, match=r"needs forward_features / forward_head .* Sequential lacks them"):
        HessianOperator(moe_model(), batches, "head")


def test_matvec_callback_counts_products(moe_case):
    model, _, _ = moe_case
    seen = []
    op = HessianOperator(model, data()[2], "router", on_matvec=seen.append)
    hutchinson_trace(op, 3)
    assert seen == [1, 2, 3] and op.matvecs == 3


def test_model_without_moe_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y, batches = data()
    assert hessian_params(model, "backbone") == hessian_params(model, "all")
    op = HessianOperator(model, batches, "backbone")
    H = exact_hessian(model, op.names, x, y)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.allclose(op.hvp(v), H @ v, rtol=1e-10, atol=1e-12)  # no fp32 router: float64 throughout
    with pytest.raises(ValueError, match="params='router' needs MoE layers, and Sequential has none"):
        HessianOperator(model, batches, "router")


def test_attention_runs_on_the_math_kernel():
    # The default CPU/GPU SDPA kernels have no double backward; the operator forces the math kernel.
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, 4) -> (B, 3)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.head(F.scaled_dot_product_attention(q, k, v).mean(1))

    torch.manual_seed(0)
    model = Attention()
    x, y = torch.randn(2, 5, 4), torch.tensor([0, 2])
    op = HessianOperator(model, (x, y))
    H = exact_hessian(model, op.names, x, y).double()
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.linalg.norm(op.hvp(v) - H @ v) <= 1e-5 * torch.linalg.norm(H @ v)  # fp32 model


class SqrtWeight(nn.Module):
    """logits = √w · x: finite at w = 0, but d²√w/dw² = −¼ w^(−3/2) is not."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.sqrt().T


def test_non_finite_loss_and_hvp_raise_one_line_errors():
    model = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    x[1, 0] = float("inf")
    op = HessianOperator(model, (x, torch.tensor([0, 1])))
    with pytest.raises(FloatingPointError, match=r"the loss on a batch of 2 samples is not finite") as err:
        op.hvp(torch.ones(op.n))
    assert "\n" not in str(err.value)
    op = HessianOperator(SqrtWeight(), (torch.randn(2, 2), torch.tensor([0, 1])))
    with pytest.raises(FloatingPointError, match=r"the Hessian-vector product \(in w\) is not finite") as err:
        op.hvp(torch.ones(op.n))
    assert "\n" not in str(err.value)
    with pytest.raises(FloatingPointError, match="the vector given to hvp is not finite: 1 NaN"):
        op.hvp(torch.tensor([float("nan"), 0, 0, 0, 0, 0]))


def test_model_state_is_unchanged_and_summary_is_json():
    torch.manual_seed(0)
    moe = MoE(6, 3, 4, router="topk", k=2, capacity_factor=None)  # default noise_std = 1/E in training
    model = nn.Sequential(nn.Linear(4, 6), moe, nn.Linear(6, 3))
    model.train()
    model[2].eval()  # mixed flags must come back as they were
    model[0].bias.requires_grad_(False)
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    _, _, batches = data(dtype=torch.float32)
    op = HessianOperator(model, batches)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(op.hvp(v), op.hvp(v))  # eval mode: no router noise, so the operator is deterministic
    summary = hessian_summary(model, batches, params="all", top_k=2, trace_probes=20, seed=0)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["num_params"] == 243 and summary["num_samples"] == 8 and summary["trace_probes"] == 20
    assert summary["lambda_max"] == summary["top_eigenvalues"][0] >= summary["top_eigenvalues"][1]
    assert summary["trace_stderr"] > 0
    assert [m.training for m in model] == [True, True, False]
    assert all(m.training for m in moe.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][0]) and p.requires_grad == before[name][1] and p.grad is None
