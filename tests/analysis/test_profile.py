"""Compute accounting: FLOPs, ρ and active parameters against hand-computed values; dense twins."""

import pytest
import timm
import torch
from torch import nn

from visionmoe import MoE, moe_layers
from visionmoe.analysis import ComputeProfile, dense_twin, profile_model
from visionmoe.layers.experts import Experts

NO_NOISE = {"noise_std": 0.0}


def sandwich(moe: MoE, d_in: int = 16, d_out: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, moe.dim), moe, nn.Linear(moe.dim, d_out))


def test_dropless_topk_flops_rho_and_active_params_by_hand():
    model = sandwich(MoE(32, 4, 64, router="topk", k=2, capacity_factor=None, router_options=NO_NOISE))
    p = profile_model(model, torch.randn(3, 16))  # (B, D): one token per sample
    # Per sample (one token), FLOPs = 2 · in · out per matmul:
    #   Linear(16, 32) 2·16·32 = 1024; router 2·32·4 = 256; Linear(32, 10) 2·32·10 = 640;
    #   experts: dropless k=2 → 2 assignments × (2·32·64 + 2·64·32 = 8192) = 16384.
    #   total = 1024 + 256 + 16384 + 640 = 18304.
    assert p.batch_size == 3
    assert p.total_flops == 18304
    assert p.expert_flops == p.expert_flops_padded == 16384
    assert p.router_flops == 256
    assert p.dispatch_flops == 0
    assert p.rho == pytest.approx(16384 / 18304)
    assert p.expert_flops_nominal == 16384 and p.rho_nominal == p.rho  # dropless: nothing to drop
    # Params: Linear(16, 32) 16·32+32 = 544; Linear(32, 10) 32·10+10 = 330; router 4·32 = 128;
    #   one expert 32·64 + 64 + 64·32 + 32 = 4192, four = 16768. Total 544+330+128+16768 = 17770.
    #   Active: 544 + 330 + 128 + 2 experts per token · 4192 = 9386.
    assert p.total_params == 17770
    assert p.active_params == 9386
    (layer,) = p.layers
    assert (layer.name, layer.router, layer.experts_per_token) == ("1", "topk", 2.0)
    assert [(r.name, r.kind, r.flops, r.params) for r in p.rows] == [
        ("0", "module", 1024, 544),
        ("1", "moe", 256 + 16384, 128 + 16768),
        ("2", "module", 640, 330),
    ]


def test_capacity_padding_costs_more_than_useful_flops():
    moe = MoE(32, 4, 64, router="topk", k=1, capacity_factor=1.0, router_options=NO_NOISE)
    model = sandwich(moe)
    nn.init.zeros_(moe.router.weight)  # equal logits: every token's top-1 is expert 0 (ties → lower index)
    p = profile_model(model, torch.randn(2, 8, 16))  # (B, N, D): one group of S = 8 tokens per sample
    # C = ceil(k·S·cf/E) = ceil(1·8·1.0/4) = 2: expert 0 keeps 2 tokens, the other 6 are dropped.
    # One slot through one expert: 2·32·64 + 2·64·32 = 8192 FLOPs.
    #   useful = 2 kept × 8192 = 16384; padded = G·E·C = 1·4·2 = 8 slots × 8192 = 65536 per sample.
    #   total = 8 tokens × (1024 + 256 + 640) + 16384 = 15360 + 16384 = 31744.
    assert p.expert_flops == 16384
    assert p.expert_flops_padded == 65536
    assert p.router_flops == 8 * 256
    assert p.total_flops == 31744
    assert p.rho == pytest.approx(16384 / 31744)
    # Nominal: all 8 offered assignments processed, 8 × 8192 = 65536, in the total instead of the
    # 16384 that ran: 15360 + 65536 = 80896.
    assert p.expert_flops_nominal == 65536
    assert p.rho_nominal == pytest.approx(65536 / 80896)
    # 2 assignments for 8 tokens: 0.25 experts per token. Active = 544 + 330 + 128 + 0.25 · 4192 = 2050.
    assert p.layers[0].experts_per_token == 0.25
    assert p.active_params == 2050


@pytest.mark.parametrize("router", ["topk", "expert_choice", "sparse_expert_choice"])
def test_nominal_rho_does_not_depend_on_where_the_tokens_went(router):
    options = NO_NOISE if router == "topk" else {}  # expert choice draws no noise
    moe = MoE(32, 4, 64, router=router, capacity_factor=1.0, router_options=options)
    model, x = sandwich(moe), torch.randn(2, 8, 16)
    random_gate = profile_model(model, x)
    nn.init.zeros_(moe.router.weight)  # equal logits: top-k sends every token to expert 0
    tied = profile_model(model, x)
    assert tied.expert_flops_nominal == random_gate.expert_flops_nominal
    assert tied.rho_nominal == random_gate.rho_nominal
    if router == "topk":  # k=1, C = 2 per expert: 8 offered assignments per sample, 2 kept once tied
        assert tied.expert_flops == 2 * 8192 < random_gate.expert_flops <= tied.expert_flops_nominal == 8 * 8192
    else:  # E·C = 4 · 2 slots per group, all offered
        assert tied.expert_flops_nominal == 8 * 8192 >= tied.expert_flops


def test_dense_and_soft_count_every_expert_as_active():
    dense = profile_model(sandwich(MoE(32, 4, 64, router="dense")), torch.randn(2, 16))
    soft = profile_model(sandwich(MoE(32, 4, 64, router="soft")), torch.randn(2, 5, 16))
    # Both: non-expert 544 + 330 (+ the soft router's Φ 32·4·1 + scale 1 = 129) + 4 experts × 4192.
    assert dense.active_params == dense.total_params == 544 + 330 + 4 * 4192
    assert soft.active_params == soft.total_params == 544 + 330 + 129 + 4 * 4192
    assert dense.expert_flops == dense.expert_flops_padded == 4 * 8192  # one FFN of width E·H = 256
    assert soft.expert_flops == soft.expert_flops_padded == soft.expert_flops_nominal
    assert dense.expert_flops_nominal == dense.expert_flops and soft.rho_nominal == soft.rho
    # Soft, per sample, S = 5 tokens, E·P = 4 slots: experts 4 slots × 8192 = 32768;
    # dispatch and combine bmm's 2 × 2·5·4·32 = 2560; router logits 2·5·32·4 = 1280.
    assert (soft.expert_flops, soft.dispatch_flops, soft.router_flops) == (32768, 2560, 1280)


def test_no_moe_gives_rho_zero_and_a_markdown_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    p = profile_model(model, torch.randn(4, 16))
    assert isinstance(p, ComputeProfile)
    assert (p.rho, p.expert_flops, p.expert_flops_padded, p.router_flops) == (0.0, 0, 0, 0)
    assert p.total_flops == 1024 + 640
    assert p.active_params == p.total_params == 544 + 330
    lines = p.table().splitlines()
    assert lines[0] == "| Module | Kind | FLOPs / sample | Share | Params |"
    assert set(lines[1]) <= set("|-: ")
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["0", "2", "**total**"]  # ReLU: no row
    assert p.to_dict()["total_params"] == 874


def test_attention_flops_are_counted():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    p = profile_model(vit, torch.randn(2, 3, 32, 32))
    # 32/8 = 4×4 = 16 patches + 1 class token: T = 17 tokens of width 192, 12 blocks, 3 heads of 64.
    T, D = 17, 192
    linear = 12 * T * (2 * D * 3 * D + 2 * D * D + 2 * D * 4 * D + 2 * 4 * D * D)  # qkv, proj, fc1, fc2
    linear += 16 * 2 * (3 * 8 * 8) * D + 2 * D * 10  # patch embedding (a conv = a matmul per patch), head
    attention = 12 * 2 * (2 * T * T * D)  # Q·Kᵀ and A·V per block: 2·T·T·(3 heads × 64) each
    assert p.total_flops > linear
    assert p.total_flops == linear + attention


def test_profile_restores_the_model():
    moe = MoE(32, 4, 64, router="topk", k=2, capacity_factor=None)
    model = sandwich(moe).train()
    profile_model(model, torch.randn(2, 16))
    assert all(m.training for m in model.modules())
    assert moe.last_stats is not None  # stats of the profiled (eval-mode) forward


# Twins: the MoE model's FLOPs are the twin's plus its routing overhead, which these sizes keep below 1 %.
TWIN_CASES = [
    # k=2 dropless token choice: active width 2·H.
    ("topk", {"k": 2, "capacity_factor": None, "router_options": NO_NOISE}, 256, (2, 8, 16)),
    # Expert choice, capacity factor 2: C = ceil(8·2/4) = 4 per expert, 16 assignments for 8 tokens → 2·H.
    ("expert_choice", {"capacity_factor": 2.0}, 256, (2, 8, 16)),
    # Soft MoE, E·P = 4·2 = 8 slots for S = 4 tokens: (E·P/S)·H = 2·H.
    ("soft", {"router_options": {"slots_per_expert": 2}}, 1024, (2, 4, 16)),
]


@pytest.mark.parametrize(("router", "opts", "hidden", "shape"), TWIN_CASES, ids=[c[0] for c in TWIN_CASES])
def test_flops_twin_matches_the_active_flops(router, opts, hidden, shape):
    model = sandwich(MoE(32, 4, hidden, router=router, **opts))
    x = torch.randn(*shape)
    twin = dense_twin(model, match="flops", example_input=x)
    ((_, ffn),) = moe_layers(twin)
    assert (ffn.num_experts, ffn.hidden_dim, ffn.router.name) == (1, 2 * hidden, "dense")
    moe_p, twin_p = profile_model(model, x), profile_model(twin, x)
    assert twin_p.total_flops == pytest.approx(moe_p.total_flops, rel=0.01)
    # Exactly: the twin spends what the MoE model spends minus routing (router, Soft MoE dispatch/combine).
    assert twin_p.total_flops == moe_p.total_flops - moe_p.router_flops - moe_p.dispatch_flops


def test_params_twin_has_the_expert_parameters():
    E, D, H = 4, 32, 64
    model = sandwich(MoE(D, E, H, router="topk", k=2, capacity_factor=1.0))
    twin = dense_twin(model, match="params")
    assert twin[1].hidden_dim == E * H
    router = sum(p.numel() for p in model[1].router.parameters())
    # E experts hold E·(2·D·H + H + D); one FFN of width E·H holds 2·D·E·H + E·H + D: the same but for
    # (E - 1)·D output biases (the experts' outputs are summed, so one bias of size D does).
    n_twin, n_model = (sum(p.numel() for p in m.parameters()) for m in (twin, model))
    assert n_twin == n_model - router - (E - 1) * D


def test_twin_copies_shared_weights_and_leaves_the_model_alone():
    model = sandwich(MoE(32, 4, 64, router="soft", activation=nn.Tanh, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = dense_twin(model, match="flops", example_input=torch.randn(2, 4, 16))
    for i in (0, 2):
        for name, value in model[i].state_dict().items():
            assert torch.equal(twin[i].state_dict()[name], value)
        assert twin[i].weight is not model[i].weight
    assert isinstance(twin[1].experts.act, nn.Tanh) and twin[1].experts.b1 is None
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert isinstance(model[1], MoE) and model[1].router.name == "soft"
    assert model[1].last_stats is None  # the forward for S ran on the copy
    assert model.training and twin.training
    assert isinstance(twin[1].experts, Experts) and twin[1].num_experts == 1


def test_twin_of_a_bare_moe_layer():
    moe = MoE(8, 4, 16, router="topk", k=1)
    twin = dense_twin(moe)
    assert isinstance(twin, MoE) and twin.hidden_dim == 16 and twin.router.name == "dense"


def test_one_line_errors():
    model = sandwich(MoE(32, 4, 64, router="soft"))
    with pytest.raises(ValueError, match=r"match must be one of 'flops', 'params', got match='active'") as err:
        dense_twin(model, match="active")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"needs example_input.*'1'") as err:
        dense_twin(model, match="flops")
    assert "\n" not in str(err.value)
    dense_twin(model, match="params")  # the params twin needs no forward


def test_dense_router_layers_are_not_routed():
    # A dense-router "MoE" is a plain FFN (what dense twins are made of): its FLOPs count in the
    # total but not in ρ, so a dense twin has ρ = 0 while its MoE original does not.
    moe_model = nn.Sequential(MoE(16, 4, 32, router="topk", k=2, capacity_factor=None), nn.Linear(16, 4))
    x = torch.randn(3, 5, 16)
    assert profile_model(moe_model, x).rho > 0
    twin = profile_model(dense_twin(moe_model), x)
    assert twin.rho == 0.0 and twin.layers[0].routed is False and twin.layers[0].expert_flops > 0


@pytest.mark.parametrize("backend", ["sorted", "grouped", "padded"])
def test_expert_flops_counted_on_every_backend(backend):
    # Dropless top-2: 2 assignments per token, each 2·D·H + 2·H·D FLOPs, whatever kernel runs them
    # (FlopCounterMode has no formula for grouped_mm of its own; profile registers one).
    D, H, tokens = 16, 32, 10
    moe = MoE(D, 4, H, router="topk", k=2, capacity_factor=None, backend=backend)
    p = profile_model(moe, torch.randn(1, tokens, D))
    assert p.expert_flops == 2 * tokens * (2 * D * H + 2 * H * D)
