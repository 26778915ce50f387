"""Routing analytics: class × expert matrices, mutual information, collapse and load history, by hand."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from visionmoe import MoE
from visionmoe.analysis.routing import (
    HISTORY_COLUMNS,
    collapsed_experts,
    load_history,
    mutual_information,
    plot_class_expert,
    plot_load_history,
    routing_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")


LN3 = math.log(3)
# A token-choice layer whose routing we can read off: D = E = 2, router weight ln 3 · I, so the
# one-hot token e_i has logits ln 3 on expert i and 0 on the other: gates (3/4, 1/4), top-1 = expert i.
E0, E1 = [1.0, 0.0], [0.0, 1.0]
H_GATES = 0.75 * math.log(4 / 3) + 0.25 * math.log(4)  # entropy of (3/4, 1/4) = 0.5623 nats


def known_moe(groups="sample", weight=LN3) -> MoE:
    torch.manual_seed(0)
    moe = MoE(2, 2, 4, router="topk", k=1, capacity_factor=None, groups=groups, router_options={"noise_std": 0.0})
    with torch.no_grad():
        moe.router.weight.copy_(weight * torch.eye(2))
    return moe


def test_head_routing_by_class_by_hand():
    model = nn.Sequential(known_moe())  # a head on (B, D) vectors: one token per sample
    model.train()
    batches = [
        (torch.tensor([E0, E1, E0]), torch.tensor([0, 1, 0])),
        (torch.tensor([E1]), torch.tensor([1])),
    ]
    report = routing_report(model, batches, num_classes=2)
    assert model[0].training  # training flags restored
    assert report.samples == 4 and list(report.layers) == ["0"]
    layer = report.layers["0"]
    # Class 0 (samples 0, 2) → expert 0, class 1 (samples 1, 3) → expert 1, each with gate 3/4.
    assert torch.equal(layer.counts, torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(layer.weights, torch.tensor([[1.5, 0.0], [0.0, 1.5]], dtype=torch.float64))
    assert layer.load == [2.0, 2.0] and layer.share == [0.5, 0.5] and layer.collapsed == []
    assert layer.tokens == 4 and layer.dropped_fraction == 0 and layer.unrouted_fraction == 0
    assert layer.router_entropy == pytest.approx(H_GATES)
    # A perfect 2-class / 2-expert split: p(c, e) = 1/2 on the diagonal, marginals 1/2, so
    # I = 2 · 1/2 · ln(1/2 / (1/2 · 1/2)) = ln 2, and min(H(class), H(expert)) = ln 2 normalises it to 1.
    assert layer.mutual_information == pytest.approx(math.log(2))
    assert layer.normalized_mutual_information == pytest.approx(1.0)
    assert layer.top_experts() == [[0], [1]]  # experts a class never uses are not listed
    assert torch.equal(layer.class_distribution(), torch.eye(2, dtype=torch.float64))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["layers"]["0"]["counts"] == [[2.0, 0.0], [0.0, 2.0]] and d["layers"]["0"]["top_experts"] == [[0], [1]]
    assert d["layers"]["0"]["router"] == "topk" and d["samples"] == 4


def test_identical_class_distributions_have_zero_information_and_collapse_is_flagged():
    model = nn.Sequential(known_moe(weight=0.0))  # equal logits: every token → expert 0 (ties → lower index)
    x, y = torch.tensor([E0, E1, E0, E1]), torch.tensor([0, 1, 0, 1])
    layer = routing_report(model, [(x, y)], num_classes=3).layers["0"]
    # counts [[2, 0], [2, 0], [0, 0]]: both classes have the same distribution (class 2 has no samples).
    assert layer.counts.tolist() == [[2.0, 0.0], [2.0, 0.0], [0.0, 0.0]]
    assert layer.mutual_information == 0.0 and layer.normalized_mutual_information == 0.0
    assert layer.router_entropy == pytest.approx(math.log(2))  # gates (1/2, 1/2)
    assert layer.collapsed == [1]  # share 0 < 0.1 · 1/2
    assert layer.top_experts() == [[0], [0], []]


def test_mutual_information_by_hand():
    # Rows proportional ((1, 3) and (2, 6)): expert independent of class, I = 0.
    assert mutual_information(torch.tensor([[1.0, 3.0], [2.0, 6.0]])) == pytest.approx(0.0, abs=1e-12)
    # [[1, 1], [0, 2]] / 4: p(c) = (1/2, 1/2), p(e) = (1/4, 3/4);
    #   I = 1/4 ln((1/4)/(1/8)) + 1/4 ln((1/4)/(3/8)) + 1/2 ln((1/2)/(3/8)) = 1/4 ln 2 + 1/4 ln 2/3 + 1/2 ln 4/3;
    #   normalised by min(H(c) = ln 2, H(e) = H(1/4, 3/4)).
    m = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    mi = 0.25 * math.log(2) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    h_e = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert mutual_information(m) == pytest.approx(mi)  # 0.2158 nats
    assert mutual_information(m, normalized=True) == pytest.approx(mi / h_e)
    # 3 equally frequent classes, each owning one expert: ln 3.
    assert mutual_information(torch.eye(3) * 5) == pytest.approx(LN3)
    assert mutual_information(torch.zeros(2, 2)) == 0.0


def test_collapsed_experts_by_hand():
    # Σ = 15.2, uniform share 1/4, threshold 0.1 → collapse below 0.025:
    #   shares 0.658, 0, 0.329, 0.2/15.2 = 0.0132 → experts 1 and 3.
    assert collapsed_experts([10.0, 0.0, 5.0, 0.2]) == [1, 3]
    assert collapsed_experts([10.0, 0.0, 5.0, 0.2], threshold=0.01) == [1]  # below 0.0025: only the empty one
    assert collapsed_experts([0.0, 0.0]) == []  # nothing routed: nothing to call collapsed
    with pytest.raises(ValueError, match="threshold"):
        collapsed_experts([1.0], threshold=-1)


# Sample 0's tokens go to experts (0, 0, 1), sample 1's to (1, 1, 1); labels (0, 1). Every grouping
# must give counts [[2, 1], [0, 3]]. Mapping tokens to samples wrongly shows: one group = one sample
# with groups="batch" would give [[2, 4], [0, 0]]; token t → sample t % B would give [[1, 2], [1, 2]];
# groups=2 makes group 1 = (sample 0 token 2, sample 1 token 0), straddling the two samples.
TOKENS = torch.tensor([[E0, E0, E1], [E1, E1, E1]])  # (B=2, N=3, D=2)
FEATURE_MAP = TOKENS.transpose(1, 2).reshape(2, 2, 1, 3)  # (B, D, H=1, W=3): the same tokens as positions


@pytest.mark.parametrize(
    ("groups", "x"),
    [("sample", TOKENS), ("batch", TOKENS), (2, TOKENS), (3, TOKENS), ("sample", FEATURE_MAP), (2, FEATURE_MAP)],
)
def test_tokens_map_to_their_samples_for_every_grouping(groups, x):
    layer = routing_report(nn.Sequential(known_moe(groups)), [(x, torch.tensor([0, 1]))], 2).layers["0"]
    assert layer.counts.tolist() == [[2.0, 1.0], [0.0, 3.0]]
    assert torch.allclose(layer.weights, torch.tensor([[1.5, 0.75], [0.0, 2.25]], dtype=torch.float64))  # 3/4 each
    assert layer.load == [2.0, 4.0] and layer.tokens == 6


def test_labels_must_match_the_layer_batch():
    with pytest.raises(ValueError, match="saw a batch of 2 samples but the labels have 3"):
        routing_report(nn.Sequential(known_moe()), [(TOKENS, torch.tensor([0, 1, 1]))], 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        routing_report(nn.Sequential(known_moe()), [(TOKENS, torch.tensor([0, 2]))], 2)


@pytest.mark.parametrize("groups", ["sample", "batch", 6])  # 6: group 0 = sample 0 and half of sample 1
def test_soft_moe_loads_and_matrix_are_combine_mass(groups):
    torch.manual_seed(1)
    moe = MoE(4, 3, 8, router="soft", groups=groups, router_options={"slots_per_expert": 2})
    x, y = torch.randn(3, 4, 4), torch.tensor([2, 0, 2])  # (B=3, N=4, D=4)
    layer = routing_report(nn.Sequential(moe), [(x, y)], num_classes=3).layers["0"]
    # Independently: the combine mass of each token on each expert, summed per sample.
    with torch.no_grad():
        combine = moe.router(moe.group(x)).plan.combine  # (G, S, E, P)
    per_sample = combine.sum(-1).reshape(3, 4, 3).sum(1).double()  # (B, E): the grouping is a reshape
    expected = torch.stack([per_sample[1], torch.zeros(3, dtype=torch.float64), per_sample[0] + per_sample[2]])
    assert torch.allclose(layer.weights, expected) and torch.equal(layer.counts, layer.weights)
    # Each token's combine weights sum to 1 over the E·P slots: the load sums to the 12 tokens, and the
    # rows to N = 4 per sample (class 0: 1 sample, class 2: 2).
    assert sum(layer.load) == pytest.approx(12)
    assert torch.allclose(layer.counts.sum(0), torch.tensor(layer.load, dtype=torch.float64))
    assert layer.counts.sum(1).tolist() == pytest.approx([4.0, 0.0, 8.0])
    assert layer.dropped_fraction == 0 and layer.router == "soft"


@pytest.mark.parametrize(
    ("router", "options"),
    [("topk", {"k": 2, "capacity_factor": 0.5}), ("expert_choice", {"capacity_factor": 1.0}), ("dense", {})],
)
def test_matrix_rows_add_up_to_the_layer_load(router, options):
    torch.manual_seed(2)
    moe = MoE(8, 4, 16, router=router, **options)
    batches = [(torch.randn(2, 8, 5, 5), torch.tensor([0, 1])), (torch.randn(2, 8, 5, 5), torch.tensor([1, 1]))]
    layer = routing_report(nn.Sequential(moe), batches, num_classes=2).layers["0"]
    assert torch.allclose(layer.counts.sum(0), torch.tensor(layer.load, dtype=torch.float64))
    assert layer.tokens == 4 * 25
    if router == "topk":  # C = ceil(2 · 25 · 0.5 / 4) = 7 slots per expert: 28 of the 50 choices per image fit
        assert sum(layer.load) <= 4 * 28 and layer.dropped_fraction >= 1 - 28 / 50
    if router == "dense":  # every token through every expert: 25 tokens per image, class 1 has 3 images
        assert layer.counts.tolist() == [[25.0] * 4, [75.0] * 4] and layer.mutual_information == 0.0


def test_model_without_moe_gives_an_empty_report(tmp_path):
    report = routing_report(nn.Linear(2, 2), [(torch.randn(3, 2), torch.tensor([0, 1, 0]))], num_classes=2)
    assert report.layers == {} and report.collapsed == {} and report.samples == 3
    assert report.to_dict() == {"num_classes": 2, "samples": 3, "threshold": 0.1, "layers": {}}
    assert plot_class_expert(report, tmp_path / "empty.png").stat().st_size > 0


def record(epoch, routing, test_routing=None):
    """A metrics.jsonl record as visionmoe.train.trainer.Trainer._end_epoch writes it (abridged)."""
    out = {"epoch": epoch, "step": 7 * epoch, "lr": 0.1, "train_loss": 1.0, "routing": routing}
    if test_routing is not None:
        out["test"] = {"top1": 0.5, "routing": test_routing}
    return out


def stats(load, dropped=0.0, entropy=0.5):
    return {"tokens_per_expert": load, "dropped_fraction": dropped, "unrouted_fraction": 0.0, "load_cv": 0.3,
            "load_max_over_mean": 1.5, "router_entropy": entropy}  # fmt: skip


def test_load_history_from_a_written_log(tmp_path):
    lines = [
        record(1, {"mlp": stats([30.0, 10.0], dropped=0.2)}),
        record(2, {"mlp": stats([40.0, 0.0], entropy=0.1)}, test_routing={"mlp": stats([5.0, 15.0])}),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    df = load_history(tmp_path)
    assert list(df.columns) == list(HISTORY_COLUMNS)
    assert len(df) == 6  # epoch 1: 2 experts (train); epoch 2: 2 train + 2 test
    train = df[df.split == "train"]
    # Epoch 1: shares 30/40, 10/40; epoch 2: 40/40 and 0 — expert 1 has collapsed (0 < 0.1 · 1/2).
    assert train.share.tolist() == [0.75, 0.25, 1.0, 0.0]
    assert train.collapsed.tolist() == [False, False, False, True]
    assert train[train.expert == 0].dropped_fraction.tolist() == [0.2, 0.0]
    assert train[train.expert == 0].router_entropy.tolist() == [0.5, 0.1]
    test = df[df.split == "test"]
    assert test.epoch.tolist() == [2, 2] and test.share.tolist() == [0.25, 0.75] and test.step.tolist() == [14, 14]
    assert plot_load_history(df, tmp_path / "plots" / "load.png").read_bytes()[:4] == b"\x89PNG"
    assert load_history(tmp_path / "metrics.jsonl").equals(df)
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        load_history(tmp_path / "nowhere")


def test_class_expert_heatmap_is_a_png(tmp_path):
    batches = [(TOKENS, torch.tensor([0, 1]))]
    report = routing_report(nn.Sequential(known_moe(), known_moe("batch")), batches, num_classes=2)
    path = plot_class_expert(report, tmp_path / "heat.png", class_names=["a", "b"])
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000


def _standins():
    path = Path(__file__).parents[1] / "train" / "standins.py"
    spec = importlib.util.spec_from_file_location("standins", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_history_and_report_of_a_real_run(tmp_path):
    from visionmoe.train import Trainer, load_config

    root = _standins().write_cifar(tmp_path / "data", per_class=4, test_per_class=2)
    overrides = ["model.name=cnn_resnet_cifar_moe", "model.kwargs={width: 8}", "data.batch_size=20",
                 "data.eval_batch_size=20", f"data.data_dir={root}", f"train.out_dir={tmp_path}",
                 "train.progress=false", "train.tensorboard=false", "train.epochs=1"]  # fmt: skip
    trainer = Trainer(load_config(None, overrides))
    trainer.fit()
    df = load_history(tmp_path / "custom-s0")
    layers = {"stages.2.blocks.0.mlp", "stages.2.blocks.1.mlp"}
    assert set(df.layer) == layers and set(df.split) == {"train", "test"} and set(df.expert) == set(range(8))
    assert df.groupby(["split", "layer"]).share.sum().tolist() == pytest.approx([1.0] * 4)
    # On the test set the report sees the same routing as the trainer's evaluation.
    report = routing_report(trainer.model, trainer.test_loader, num_classes=10)  # normalised (x, y) batches
    assert set(report.layers) == layers
    test = df[df.split == "test"]
    for name, layer in report.layers.items():
        assert layer.load == pytest.approx(test[test.layer == name].load.tolist())
        assert layer.counts.sum().item() == pytest.approx(sum(layer.load))
