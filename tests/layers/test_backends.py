"""Every dispatch backend equals the one-hot einsum reference, outputs and gradients."""

import contextlib

import pytest
import torch

from visionmoe import MoE, native
from visionmoe.layers import dispatch, einsum_moe
from visionmoe.layers.dispatch import apply_plan, choose_backend, combine, unfused_backend
from visionmoe.layers.experts import grouped_mm_supported

SPARSE_CASES = [
    ("topk", {"k": 1, "capacity_factor": 0.5}),  # heavy dropping
    ("topk", {"k": 2, "capacity_factor": 1.25}),
    ("topk", {"k": 2, "capacity_factor": None}),  # dropless
    ("topk", {"k": 2, "capacity_factor": 0.75, "router_options": {"batch_priority": True, "renormalize": True}}),
    ("sinkhorn_topk", {"k": 2, "capacity_factor": 1.0}),
    ("expert_choice", {"capacity_factor": 2.0}),
    ("sinkhorn_expert_choice", {"capacity_factor": 1.0}),
    ("sparse_expert_choice", {"capacity_factor": 1.0}),
]
# (dim, hidden): aligned for grouped_mm, and odd sizes that defeat alignment.
SIZES = [(16, 24), (64, 136), (13, 7)]  # D·H: fused blocked at 384, tiled by expert at 8704


def run_backend(moe, x, plan, backend, deterministic=False):
    x = x.detach().clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    if backend == "reference":
        y = einsum_moe(x, plan, moe.experts)
    else:
        y = apply_plan(x, plan, moe.experts, backend, deterministic)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward(retain_graph=True)
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def backends_for(moe, x):
    names = ["sorted", "padded", "fused"]  # fused: in C where it applies, else auto's other choice
    if grouped_mm_supported(moe.experts, x):
        names.append("grouped")
    return names


@pytest.mark.parametrize(("name", "opts"), SPARSE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPARSE_CASES)])
@pytest.mark.parametrize(("dim", "hidden"), SIZES, ids=["aligned", "wider", "odd"])
@pytest.mark.parametrize("experts", [1, 5])
def test_backends_equal_reference(name, opts, dim, hidden, experts):
    if name in ("topk", "sinkhorn_topk"):
        opts = {**opts, "k": min(opts["k"], experts)}
    torch.manual_seed(0)
    moe = MoE(dim, experts, hidden, router=name, **opts)
    x = torch.randn(3, 11, dim)
    plan = moe.router(x).plan
    ref_y, ref_dx, ref_grads = run_backend(moe, x, plan, "reference")
    for backend in backends_for(moe, x):
        for deterministic in (False, True):
            y, dx, grads = run_backend(moe, x, plan, backend, deterministic)
            torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5, msg=f"{backend} output")
            torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5, msg=f"{backend} input grad")
            assert grads.keys() == ref_grads.keys()
            for key in grads:
                torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-5, msg=f"{backend} {key}")


@pytest.mark.parametrize("hidden", [8, 520])  # fused: blocked, tiled by expert
@pytest.mark.parametrize("backend", ["sorted", "padded", "grouped", "fused"])
def test_empty_experts_get_zero_gradients(backend, hidden):
    # Every token prefers expert 0: experts 1..3 receive nothing on every backend.
    options = {"noise_std": 0.0}
    moe = MoE(16, 4, hidden, router="topk", k=1, capacity_factor=1.0, backend=backend, router_options=options)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0].fill_(1.0)
    moe(torch.rand(2, 6, 16)).sum().backward()
    for p in (moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2):
        assert p.grad is not None and bool((p.grad[1:] == 0).all())


def test_deterministic_combine_is_the_same_sum():
    rows = torch.tensor([3, 0, 3, 1, 3])
    values = torch.arange(10.0).reshape(5, 2)
    # row 0 <- [2, 3]; row 1 <- [6, 7]; row 2 <- nothing; row 3 <- [0,1] + [4,5] + [8,9] = [12, 15].
    expected = torch.tensor([[2.0, 3.0], [6.0, 7.0], [0.0, 0.0], [12.0, 15.0]])
    assert torch.equal(combine(rows, values, 4), expected)
    assert torch.equal(combine(rows, values, 4, deterministic=True), expected)


def test_auto_falls_back_when_grouped_mm_is_absent(monkeypatch):
    moe = MoE(16, 4, 8, router="topk", k=2)
    x = torch.randn(2, 5, 16)
    plan = moe.router(x).plan  # 20 assignments over 4 experts: small, so grouped when available
    assert choose_backend(x, moe.experts) == "sorted"  # CPU: grouped measured slower
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", None, raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert not grouped_mm_supported(moe.experts, x)
    assert choose_backend(x, moe.experts) == "sorted"
    assert unfused_backend(x, moe.experts, plan) == "padded"  # (auto's choice but for fused, where that runs)
    assert moe(x).shape == x.shape


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped_mm")
def test_grouped_backend_runs_under_bf16_autocast():
    # aten::_grouped_mm has no autocast kernel: bf16 activations met fp32 weights ("same dtype" error).
    # The experts now cast their weights to the activations' dtype; gradients reach the fp32 weights.
    torch.manual_seed(0)
    moe = MoE(16, 4, 16, router="topk", k=2, backend="grouped", router_options={"noise_std": 0.0})
    x = torch.randn(2, 8, 16)
    reference = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x.bfloat16())  # as an autocast Linear or conv before it hands it over
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert moe.experts.w1.grad.dtype == torch.float32 and moe.experts.w1.grad.abs().sum() > 0


def test_auto_picks_padded_for_small_experts():
    # ViT-sized experts (D·H > 128·128): 2 groups × (k=2 · 5 tokens) = 20 assignments over 4 experts,
    # 5 rows each, below 128 -> grouped_mm where the sizes are aligned, padded where not.
    moe = MoE(256, 4, 512, router="topk", k=2)
    x = torch.randn(2, 5, 256)
    expected = "grouped" if grouped_mm_supported(moe.experts, x) else "padded"
    assert choose_backend(x, moe.experts, moe.router(x).plan) == expected
    odd = MoE(255, 4, 513, router="topk", k=2)
    x = torch.randn(2, 5, 255)
    assert choose_backend(x, odd.experts, odd.router(x).plan) == "padded"
    # 2 × 2 · 512 = 2048 assignments over 4 experts: 512 rows each -> sorted.
    x = torch.randn(2, 512, 256)
    assert choose_backend(x, moe.experts, moe.router(x).plan) == "sorted"
    # Small experts (CNN feature maps, D·H <= 128·128) under token choice: padded while the routed rows
    # hold at most padded_hidden_values() hidden values; sorted above it. With ATen's row moves only GELU
    # experts, up to 2**20 (2 groups × 1024 assignments × 64 here); with the native ones GELU up to 2**21
    # and ReLU up to 2**20. Expert choice plans keep the row rule. (Where the C kernel runs, auto takes
    # fused for these experts, D = 16 and H = 64, first: these are the rules among the other backends.)
    small = MoE(16, 4, 64, router="topk", k=2)
    relu = MoE(16, 4, 64, router="topk", k=2, activation=torch.nn.ReLU)
    x = torch.randn(2, 512, 16)
    x_large = torch.randn(17, 512, 16)  # 17 groups × 1024 assignments × 64 > 2**20
    x_larger = torch.randn(33, 512, 16)  # > 2**21
    with native.disabled():
        assert unfused_backend(x, small.experts, small.router(x).plan) == "padded"
        assert unfused_backend(x_large, small.experts, small.router(x_large).plan) == "sorted"
        assert unfused_backend(x, relu.experts, relu.router(x).plan) == "sorted"
    if native.available():
        assert unfused_backend(x, small.experts, small.router(x).plan) == "padded"
        assert unfused_backend(x_large, small.experts, small.router(x_large).plan) == "padded"
        assert unfused_backend(x_larger, small.experts, small.router(x_larger).plan) == "sorted"
        assert unfused_backend(x, relu.experts, relu.router(x).plan) == "padded"
        assert unfused_backend(x_large, relu.experts, relu.router(x_large).plan) == "sorted"
        assert unfused_backend(x.double(), relu.experts, relu.router(x.double()).plan) == "sorted"  # ATen moves
    # ... but not for tiny groups (S < 8·E: 5 tokens, 4 experts), nor in forward-only passes.
    x_small = torch.randn(2, 5, 16)
    expected = "grouped" if grouped_mm_supported(small.experts, x_small) else "padded"
    assert unfused_backend(x_small, small.experts, small.router(x_small).plan) == expected
    with torch.no_grad():
        assert choose_backend(x, small.experts, small.router(x).plan) == "sorted"
    chooser = MoE(16, 4, 64, router="expert_choice", capacity_factor=2.0)
    assert choose_backend(x, chooser.experts, chooser.router(x).plan) == "sorted"
    # grouped_mm has no float64 kernel: a float64 layer with small experts takes padded, and runs.
    double = MoE(16, 4, 8, router="expert_choice").double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert not grouped_mm_supported(double.experts, x)
    assert choose_backend(x, double.experts, double.router(x).plan) == "padded"
    assert double(x).dtype == torch.float64


def test_padded_backend_under_torch_compile_like_choice(monkeypatch):
    # While compiling, auto picks the static-shape padded path.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_backend(torch.randn(1, 2, 16), MoE(16, 2, 8).experts) == "padded"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'; choose one of: auto, sorted, grouped, padded"):
        MoE(16, 4, 8, backend="fast")
    moe = MoE(16, 4, 8)
    plan = moe.router(torch.randn(1, 4, 16)).plan
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        dispatch.sparse_moe(torch.randn(1, 4, 16), plan, moe.experts, "fast")


def test_torch_compile_full_graph_matches_eager():
    # backend="auto" picks the static-shape padded path while compiling: one graph, no breaks,
    # forward and backward equal to eager. (Dropless token choice and the sorted/grouped backends
    # read counts on the host and so break the graph: see visionmoe.layers.dispatch.)
    torch.manual_seed(0)
    moe = MoE(16, 4, 32, router="topk", k=2, capacity_factor=1.0).eval()
    x = torch.randn(2, 12, 16, requires_grad=True)
    eager = moe(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(moe, fullgraph=True)
    y = compiled(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_counting_sort_is_the_argsort_order():
    # Token choice dispatches by counting_sort; it must give the stable argsort's order, dropped rows last.
    torch.manual_seed(0)
    for opts in ({"k": 2, "capacity_factor": 0.5}, {"k": 1, "capacity_factor": None}, {"k": 3, "capacity_factor": 1.0}):
        moe = MoE(8, 5, 4, router="topk", router_options={"batch_priority": True}, **opts)
        plan = moe.router(torch.randn(3, 17, 8)).plan
        dest, order, counts = dispatch.counting_sort(plan)
        key = torch.where(plan.kept, plan.expert, plan.num_experts).reshape(-1)
        assert torch.equal(order, torch.argsort(key, stable=True))
        assert torch.equal(order[dest], torch.arange(key.numel()))
        assert torch.equal(counts, torch.bincount(key, minlength=6)[:5])


def test_token_choice_path_equals_the_general_sorted_path():
    # choices=None sends the same plan through the argsort + index_add_ path: same outputs and gradients.
    import dataclasses

    torch.manual_seed(0)
    moe = MoE(12, 4, 8, router="topk", k=2, capacity_factor=0.75, router_options={"batch_priority": True})
    x = torch.randn(2, 9, 12)
    plan = moe.router(x).plan
    assert plan.choices == 2
    general = dataclasses.replace(plan, choices=None)
    for backend in backends_for(moe, x):
        y, dx, grads = run_backend(moe, x, plan, backend)
        ref_y, ref_dx, ref_grads = run_backend(moe, x, general, backend)
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on", [True, False], ids=["native", "aten"])
@pytest.mark.parametrize("batch_priority", [False, True])
def test_token_order_skips_only_the_check_for_a_permutation(on, batch_priority):
    # The routers mark a plan in token order (token_order=True: no Batch Prioritized Routing); the layer then
    # skips the priority permutation and its check. The same plan unmarked takes the check: the same numbers.
    import dataclasses

    torch.manual_seed(0)
    options = {"batch_priority": batch_priority}
    moe = MoE(16, 4, 24, router="topk", k=2, capacity_factor=0.75, router_options=options)
    x = torch.randn(2, 9, 16)
    with contextlib.nullcontext() if on else native.disabled():
        plan = moe.router(x).plan
        assert plan.token_order is not batch_priority
        if not batch_priority:
            assert torch.equal(plan.token, torch.arange(9).repeat(2).expand(2, -1))
        unmarked = dataclasses.replace(plan, token_order=False)
        for backend in backends_for(moe, x):
            y, dx, grads = run_backend(moe, x, plan, backend)
            ref_y, ref_dx, ref_grads = run_backend(moe, x, unmarked, backend)
            assert torch.equal(y, ref_y) and torch.equal(dx, ref_dx)
            assert all(torch.equal(grads[key], ref_grads[key]) for key in ref_grads)
            torch.testing.assert_close(y, run_backend(moe, x, plan, "reference")[0], rtol=1e-5, atol=1e-6)


def test_token_choice_path_has_the_oracles_second_derivatives():
    # The Hessian analysis differentiates twice (float64): the permutations' backward is differentiable,
    # and the Hessian-vector product equals the einsum oracle's.
    torch.manual_seed(0)
    moe = MoE(4, 3, 5, router="topk", k=2, capacity_factor=1.0, router_options={"batch_priority": True}).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        plan = moe.router(x).plan
    assert not bool(plan.kept.all())  # some drops, so the dropped rows' zeros are exercised too
    c, v = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    params = list(moe.experts.parameters())

    def hvp(fn):
        (g,) = torch.autograd.grad((fn(x) * c).sum(), x, create_graph=True)
        hv = torch.autograd.grad((g * v).sum(), [x, *params], allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, [x, *params], strict=True)]

    reference = hvp(lambda x: einsum_moe(x, plan, moe.experts))
    for backend in ("sorted", "padded"):
        ours = hvp(lambda x, backend=backend: apply_plan(x, plan, moe.experts, backend))
        for a, b in zip(ours, reference, strict=True):
            torch.testing.assert_close(a, b, msg=backend)


def test_move_rows_sums_a_two_dimensional_index():
    # index (R, F): out[r] = Σ_f x[index[r, f]], len(x) reading zeros; its backward is the 1-D gather
    # by the inverse map, and gradcheck holds through both (float64), twice.
    from visionmoe.layers.dispatch import move_rows

    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    # rows 0..2 of x each sent to slots; slot 4 is empty (reads row 3 = zeros)
    token = torch.tensor([1, 0, 2, 0, 3])  # the x row each of 5 slots reads
    slots = torch.tensor([[1, 3], [0, 5], [2, 5]])  # the slots of each x row, 5 = none
    out = move_rows(x, token, slots, True, True)
    expected = torch.cat([x, torch.zeros(1, 2, dtype=x.dtype)])[token]
    torch.testing.assert_close(out, expected)
    grad = torch.randn(5, 2, dtype=torch.float64)
    (dx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(dx, torch.stack([grad[1] + grad[3], grad[0], grad[2]]))
    assert torch.autograd.gradcheck(lambda x: move_rows(x, token, slots, True, True), (x,))
    assert torch.autograd.gradgradcheck(lambda x: move_rows(x, token, slots, True, True), (x,))


def test_auto_picks_fused_for_the_smallest_experts_in_training():
    # Token-choice experts (ReLU or GELU) with D·H <= 128·512 (the CIFAR-CNN shapes measured), in training,
    # where the kernel runs; other shapes, forward-only passes, float64 and a counting dispatch mode keep the
    # other backends' rules.
    from torch.utils.flop_counter import FlopCounterMode

    relu = MoE(8, 8, 32, router="topk", k=2, activation=torch.nn.ReLU)
    x = torch.randn(2, 64, 8)
    plan = relu.router(x).plan
    assert choose_backend(x, relu.experts, plan) == (
        "fused" if native.available() else dispatch.unfused_backend(x, relu.experts, plan)
    )
    shapes = [(16, 16, True), (16, 32, True), (8, 32, True), (16, 64, True), (32, 24, True), (32, 32, True),
              (32, 64, True), (32, 128, True), (40, 40, True), (64, 64, True), (128, 512, True), (128, 520, False),
              (256, 512, False), (512, 2048, False)]  # fmt: skip
    for dim, hidden, fused in shapes:
        for activation in (torch.nn.ReLU, torch.nn.GELU):
            layer = MoE(dim, 8, hidden, router="topk", k=2, activation=activation)
            xd = torch.randn(2, 64, dim)
            chosen = choose_backend(xd, layer.experts, layer.router(xd).plan)
            assert (chosen == "fused") == (fused and native.available()), (dim, hidden, activation, chosen)
            if fused and native.available():  # which loop: per block of tokens up to D·H = 64·128
                assert native.ffn_loop(dim, hidden) == ("tiled" if dim * hidden > 64 * 128 else "blocked")
    with torch.no_grad():
        assert choose_backend(x, relu.experts, plan) != "fused"
    with native.disabled():
        assert choose_backend(x, relu.experts, plan) != "fused"
    with FlopCounterMode(display=False):
        assert choose_backend(x, relu.experts, plan) != "fused"
    handle = relu.experts.register_forward_hook(lambda *args: None)
    assert choose_backend(x, relu.experts, plan) != "fused"
    handle.remove()
