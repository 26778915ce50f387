"""Loss-surface perturbation: filter normalisation by hand, exact restoration, routing flips, curvature = dᵀHd."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionmoe import MoE
from visionmoe.analysis.hessian import HessianOperator, hessian_params, top_eigenvalues
from visionmoe.analysis.landscape import (
    hessian_direction,
    loss_line,
    loss_plane,
    plot_landscape,
    random_direction,
)
from visionmoe.layers.experts import Experts

F64 = torch.float64
NO_NOISE = {"noise_std": 0.0}


def moe_model(router: str = "topk", num_experts: int = 3, norm: bool = False, **moe_kw) -> nn.Sequential:
    """Linear(4, 6) [→ BatchNorm1d(6)] → MoE(D=6, E, H=4) on (B, D) vectors → Linear(6, 3), float64.

    Names: "0.*" the first Linear, then the MoE ("1.*", or "2.*" after the norm), then the head.
    """
    torch.manual_seed(0)
    if router == "topk":
        moe_kw = {"k": 2, "capacity_factor": None, "router_options": NO_NOISE, **moe_kw}
    moe = MoE(6, num_experts, 4, router=router, backend="sorted", **moe_kw)
    layers = [nn.Linear(4, 6), *([nn.BatchNorm1d(6)] if norm else []), moe, nn.Linear(6, 3)]
    return nn.Sequential(*layers).to(F64)


def data(sizes=(20, 12)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(sizes), 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def direct_loss(model: nn.Module, batches) -> float:
    """Mean cross-entropy over all samples, evaluated plainly in eval mode (training flag put back)."""
    training = model.training
    model.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches)
    model.train(training)
    return total / sum(len(y) for _, y in batches)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}  # parameters and buffers


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name


def test_filter_normalisation_of_conv_linear_and_norm_by_hand():
    model = nn.ModuleDict({"conv": nn.Conv2d(1, 2, (1, 2)), "fc": nn.Linear(3, 2), "norm": nn.LayerNorm(2)})
    with torch.no_grad():
        model["conv"].weight.copy_(torch.tensor([6.0, 8.0, 0.0, 0.0]).view(2, 1, 1, 2))  # filter norms 10, 0
        model["fc"].weight.copy_(torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]))  # row norms 5, 1
        model["norm"].weight.copy_(torch.tensor([2.0, 3.0]))
    d = random_direction(model, seed=0)
    assert list(d) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias", "norm.weight", "norm.bias"]
    # Each filter of d has its weight filter's norm: conv (10, 0) — a zero filter stays zero — and fc rows (5, 1).
    assert torch.allclose(d["conv.weight"].flatten(1).norm(dim=1), torch.tensor([10.0, 0.0]))
    assert torch.equal(d["conv.weight"][1], torch.zeros(1, 1, 2))
    assert torch.allclose(d["fc.weight"].norm(dim=1), torch.tensor([5.0, 1.0]))
    # ... and points along the Gaussian draw: one randn per parameter, in named_parameters() order.
    g = torch.Generator().manual_seed(0)
    raw = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    want = raw["fc.weight"] / raw["fc.weight"].norm(dim=1, keepdim=True) * torch.tensor([[5.0], [1.0]])
    assert torch.allclose(d["fc.weight"], want)
    for name in ("conv.bias", "fc.bias", "norm.weight", "norm.bias"):  # Li et al.'s "ignore biasbn"
        assert torch.equal(d[name], torch.zeros_like(d[name])), name
    # Included, a bias or norm parameter moves along itself (d = θ), as in Li et al.'s code.
    with_bn = random_direction(model, seed=0, include_bias_norm=True)
    assert torch.equal(with_bn["norm.weight"], torch.tensor([2.0, 3.0]))
    assert torch.equal(with_bn["fc.bias"], model["fc"].bias.detach())
    assert torch.equal(with_bn["fc.weight"], d["fc.weight"])  # weights drawn the same either way


def test_filter_normalisation_of_stacked_expert_weights_by_hand():
    experts = Experts(2, 2, 3)  # E=2, D=2, H=3
    with torch.no_grad():
        # w1 (E, D, H): a filter is (expert e, hidden unit h), its D=2 inputs a column:
        #   e=0: [[3, 1, 0], [4, 0, 2]] → √(9+16)=5, 1, 2;   e=1: [[0, 0, 6], [1, 0, 8]] → 1, 0, 10.
        experts.w1.copy_(torch.tensor([[[3.0, 1.0, 0.0], [4.0, 0.0, 2.0]], [[0.0, 0.0, 6.0], [1.0, 0.0, 8.0]]]))
        # w2 (E, H, D): a filter is (expert e, output d), its H=3 inputs a column:
        #   e=0: [[1, 0], [2, 0], [2, 3]] → √(1+4+4)=3, 3;   e=1: [[0, 2], [0, 3], [0, 6]] → 0, √(4+9+36)=7.
        experts.w2.copy_(torch.tensor([[[1.0, 0.0], [2.0, 0.0], [2.0, 3.0]], [[0.0, 2.0], [0.0, 3.0], [0.0, 6.0]]]))
    d = random_direction(experts, seed=3)
    assert torch.allclose(d["w1"].norm(dim=1), torch.tensor([[5.0, 1.0, 2.0], [1.0, 0.0, 10.0]]))
    assert torch.allclose(d["w2"].norm(dim=1), torch.tensor([[3.0, 3.0], [0.0, 7.0]]))
    assert torch.equal(d["w1"][1, :, 1], torch.zeros(2)) and torch.equal(d["w2"][1, :, 0], torch.zeros(3))
    for name in ("b1", "b2"):  # the experts' 2-D biases count as biases
        assert torch.equal(d[name], torch.zeros_like(d[name]))
        assert torch.equal(random_direction(experts, seed=3, include_bias_norm=True)[name], getattr(experts, name))
    assert list(random_direction(experts, ["w2"], seed=3)) == ["w2"]
    assert torch.equal(random_direction(experts, ["w2"], seed=3)["w2"], d["w2"])


def test_group_direction_is_the_block_of_the_all_direction():
    model = moe_model()
    router = random_direction(model, "router", seed=5)
    assert list(router) == hessian_params(model, "router") == ["1.router.weight"]  # nothing outside the group
    assert torch.equal(router["1.router.weight"], random_direction(model, "all", seed=5)["1.router.weight"])
    assert not torch.equal(router["1.router.weight"], random_direction(model, "router", seed=6)["1.router.weight"])
    g = torch.Generator().manual_seed(5)  # a generator draws directions one after another
    first, second = random_direction(model, seed=g), random_direction(model, seed=g)
    assert torch.equal(first["0.weight"], random_direction(model, seed=5)["0.weight"])
    assert not torch.equal(first["0.weight"], second["0.weight"])


def test_alpha_zero_reproduces_the_loss_and_the_weights_come_back():
    model = moe_model(norm=True).train()  # BatchNorm: eval mode must leave its running stats alone
    batches = data()
    before, want = snapshot(model), direct_loss(model, batches)
    res = loss_line(model, batches, random_direction(model, seed=0), [-0.5, 0.0, 0.5])
    assert res.loss.shape == res.accuracy.shape == res.flip_rate.shape == (3,)
    assert res.loss[1].item() == res.base_loss == want  # exactly: θ₀ + 0·d is θ₀
    assert res.flip_rate[1].item() == 0.0 and res.num_samples == 32
    assert res.loss[0] != want and res.loss[2] != want
    assert res.params == hessian_params(model, "all")
    assert_unchanged(model, before)
    assert all(m.training for m in model.modules())  # training flags restored
    assert res.base_loss == pytest.approx(HessianOperator(model, batches).loss(), rel=1e-12)


def test_weights_come_back_after_an_exception_mid_scan():
    model = moe_model(norm=True).train()
    batches, before = data(), snapshot(model)
    d = random_direction(model, seed=0)

    def callback(m: nn.Module, point: dict) -> None:
        assert not m.training
        if point["alpha"] == 1.0:
            assert not torch.equal(m[0].weight, before["0.weight"])  # the perturbation is live ...
            raise RuntimeError("stop")  # ... when the scan is interrupted

    with pytest.raises(RuntimeError, match="stop"):
        loss_line(model, batches, d, [0.5, 1.0, 2.0], callback=callback)
    assert_unchanged(model, before)
    assert all(m.training for m in model.modules())

    class Tripwire(nn.Module):
        """Fails on its third forward: the base point reads the 2 batches, the first perturbed point fails."""

        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                raise ValueError("a bad batch")
            return x

    model.append(Tripwire())
    with pytest.raises(ValueError, match="a bad batch"):
        loss_line(model, batches, d, [1.0])
    assert_unchanged(model, before)


@pytest.mark.parametrize("k, flip_rate", [(1, 1.0), (2, 0.0)])
def test_flip_rate_counts_changed_expert_sets_by_hand(k, flip_rate):
    # E=2: the direction −2W at α=1 negates the router, W → −W, so every token's logits (l₀, l₁) swap order.
    # k=1: each token's single expert switches (no ties at random init): all 32 tokens flip, rate 1.
    # k=2 (dropless): every token goes to both experts before and after; the ranking changed, the set did not: 0.
    model = moe_model(num_experts=2, k=k)
    w = model[1].router.weight.detach()
    res = loss_line(model, data(), {"1.router.weight": -2 * w}, [0.0, 1.0])
    assert res.flip_rate.tolist() == [0.0, flip_rate]
    assert res.layer_flip_rate["1"].tolist() == [0.0, flip_rate]  # one layer: the same rate


def test_flip_rate_counts_only_kept_assignments():
    # One group of 3 tokens (groups="batch"), E=2, k=1, C=1, W = I so the logits are x; no noise.
    # θ₀: t0 [1, 0] -> e0 (slot 0); t1 [0.5, 0] -> e0, full: dropped; t2 [0, 1] -> e1.
    #     Kept sets: {e0}, {}, {e1}.
    # α=1 along -2W (W -> -W, logits -x): t0 [-1, 0] -> e1 (slot 0); t1 [-0.5, 0] -> e1, full: dropped;
    #     t2 [0, -1] -> e0. Kept sets: {e1}, {}, {e0}.
    # t0 and t2 flip; t1 is dropped at both points, so its kept set ({}) did not change, though its chosen
    # expert did: 2 of 3 tokens flip (counting chosen experts, dropped or not, would give 3/3).
    moe = MoE(2, 2, 3, router="topk", k=1, groups="batch", router_options={"capacity": 1, "noise_std": 0.0})
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    model = nn.Sequential(moe)  # the MoE's (B, 2) output serves as the logits of 2 classes
    x, y = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1])
    model(x)
    assert moe.last_stats.tokens_per_expert.tolist() == [1.0, 1.0] and moe.last_stats.dropped_fraction == 1 / 3
    res = loss_line(model, [(x, y)], {"0.router.weight": -2 * torch.eye(2)}, [0.0, 1.0])
    assert res.flip_rate.tolist() == [0.0, 2 / 3]
    assert res.layer_flip_rate["0"].tolist() == [0.0, 2 / 3]


@pytest.mark.parametrize(
    "router, moe_kw",
    [("topk", {}), ("expert_choice", {"capacity_factor": 1.0, "groups": "batch"})],  # EC competes across the batch
)
def test_perturbing_the_router_flips_tokens_and_moves_nothing_else(router, moe_kw):
    model = moe_model(router, **moe_kw)
    before = snapshot(model)
    d = random_direction(model, "router", seed=0)
    assert list(d) == ["1.router.weight"]

    def callback(m: nn.Module, point: dict) -> None:
        params = dict(m.named_parameters())
        for name, p in params.items():  # everything but the router sits at θ₀ during the scan
            assert torch.equal(p, before[name]) == (name != "1.router.weight" or point["alpha"] == 0), name

    res = loss_line(model, data(), d, [0.0, 1.0, 10.0], callback=callback)
    assert res.flip_rate[0].item() == 0.0
    assert 0 < res.flip_rate[2].item() <= 1
    assert res.params == ["1.router.weight"]
    assert_unchanged(model, before)


def test_curvature_along_a_direction_is_dHd():
    # L(α) = L₀ + α gᵀd + α²/2 dᵀHd + O(α³), so (L(α) + L(−α) − 2L₀)/α² = dᵀHd + O(α²).
    # Expert weights only: the router computes its logits in fp32, whose rounding (~1e-8 of L) α² = 1e-6
    # would amplify; routing is piecewise constant and no token flips at this α.
    model, batches = moe_model(), data()
    d = random_direction(model, "experts", seed=0)
    op = HessianOperator(model, batches, "experts")
    v = torch.cat([d[name].reshape(-1) for name in op.names])
    dHd = float(v @ op.hvp(v))
    a = 1e-3
    res = loss_line(model, batches, d, [-a, 0.0, a])
    assert res.flip_rate.tolist() == [0.0, 0.0, 0.0]
    second = (res.loss[0] + res.loss[2] - 2 * res.loss[1]).item() / a**2
    assert second == pytest.approx(dHd, rel=1e-3)


def test_hessian_direction_is_the_unit_top_eigenvector():
    model, batches = moe_model(), data()
    op = HessianOperator(model, batches, "experts")
    eig = top_eigenvalues(op, k=2)
    d = hessian_direction(op, eig)
    assert list(d) == op.names
    flat = torch.cat([d[name].reshape(-1) for name in op.names])
    assert flat.norm().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(flat, eig.vectors[0]) or torch.equal(flat, -eig.vectors[0])  # Lanczos' vector, up to sign
    assert flat[flat.abs().argmax()] > 0  # the sign is fixed: largest-magnitude entry positive
    second = torch.cat([t.reshape(-1) for t in hessian_direction(op, eig, index=1).values()])
    assert abs(float(second @ eig.vectors[1])) == pytest.approx(1.0, abs=1e-12)
    # Along the top eigenvector the surface curves by λmax.
    a = 1e-3
    res = loss_line(model, batches, d, [-a, 0.0, a])
    assert (res.loss[0] + res.loss[2] - 2 * res.loss[1]).item() / a**2 == pytest.approx(eig.values[0], rel=1e-3)
    with pytest.raises(ValueError, match="index"):
        hessian_direction(op, eig, index=2)


def test_plane_grid_shape_centre_and_json():
    model, batches = moe_model(), data()
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    res = loss_plane(model, batches, (d1, d2), [-0.5, 0.0, 0.5], [-0.5, 0.0, 0.5, 1.0])
    assert res.ndim == 2 and res.loss.shape == res.accuracy.shape == res.flip_rate.shape == (3, 4)
    assert res.loss[1, 1].item() == res.base_loss == direct_loss(model, batches)
    assert res.flip_rate[1, 1].item() == 0.0
    # Entry [i, j] is at (alphas[i], betas[j]): the α-axis at β=0 is the line along d1.
    line = loss_line(model, batches, d1, [-0.5, 0.0, 0.5])
    assert torch.allclose(res.loss[:, 1], line.loss, rtol=1e-12, atol=0)
    out = json.loads(json.dumps(res.to_dict()))
    assert len(out["loss"]) == 3 and all(len(row) == 4 for row in out["loss"])
    assert out["betas"] == [-0.5, 0.0, 0.5, 1.0] and out["base_loss"] == res.base_loss


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    model, batches = moe_model(), data()
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    line = loss_line(model, batches, d1, [-1.0, -0.5, 0.0, 0.5, 1.0])
    plane = loss_plane(model, batches, (d1, d2), [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0])
    for res, name in ((line, "line.png"), (plane, "plane.png")):
        path = plot_landscape(res, tmp_path / name, title=name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize("kind", ["no MoE", "soft MoE"])
def test_without_sparse_layers_the_flip_rate_is_nan(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "no MoE":
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64)
    else:  # Soft MoE mixes tokens into slots: no discrete choice to flip
        model = moe_model("soft")
    batches = data()
    res = loss_line(model, batches, random_direction(model, seed=0), [-0.5, 0.0, 0.5])
    assert torch.isnan(res.flip_rate).all() and res.layer_flip_rate == {}
    assert res.loss[1].item() == direct_loss(model, batches) and torch.isfinite(res.loss).all()
    assert json.loads(json.dumps(res.to_dict()))["flip_rate"] == [None, None, None]
    pytest.importorskip("matplotlib")
    assert plot_landscape(res, tmp_path / "line.png").stat().st_size > 0


def test_errors_and_overflowing_points():
    model = nn.Sequential(nn.Linear(4, 3)).to(F64)
    batches = data()
    d = random_direction(model, seed=0)
    with pytest.raises(ValueError, match="not parameters"):
        loss_line(model, batches, {"nope": torch.zeros(1)}, [0.0])
    with pytest.raises(ValueError, match="shape"):
        loss_line(model, batches, {"0.weight": torch.zeros(2, 2, dtype=F64)}, [0.0])
    with pytest.raises(ValueError, match="alphas"):
        loss_line(model, batches, d, [])
    with torch.no_grad():
        model[0].bias[0] = math.inf
    with pytest.raises(FloatingPointError, match="base point"):
        loss_line(model, batches, d, [0.0])
    assert model[0].bias[0].item() == math.inf  # restored as it was
    # Far out, the fp32 router logits overflow and the router refuses them: that point is NaN, the rest stands.
    model = moe_model()
    res = loss_line(model, batches, random_direction(model, "router", seed=0), [0.0, 1e40])
    assert math.isfinite(res.loss[0].item()) and math.isnan(res.loss[1].item()) and math.isnan(res.flip_rate[1].item())
