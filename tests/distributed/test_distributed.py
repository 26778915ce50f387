"""Data and expert parallelism on 2 CPU processes (gloo), checked against one process."""

import json

import pytest
import torch
from harness import WorkerFailed, run_workers
from standins import write_cifar

from visionmoe.distributed import read_checkpoint, save_sharded
from visionmoe.train import Trainer, load_checkpoint, load_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

# Every sparse router family, through both exchanges: "auto" picks grouped/sorted rows here (variable
# splits), "padded" sends the (E, G·C, D) capacity buffers (equal splits). Noise off: it is per rank by
# design (see the README); everything else must match one process, aux losses included (they see the
# global batch).
ALL_AUX = {"importance": 0.5, "switch": 0.5, "z": 0.1, "balance_kl": 0.5}
CASES = [
    {
        "name": "topk k=2 cf=1.0",
        "moe": {"router": "topk", "k": 2, "capacity_factor": 1.0, "router_options": {"noise_std": 0.0}},
    },
    {
        "name": "topk k=2 cf=1.0 padded",
        "moe": {
            "router": "topk",
            "k": 2,
            "capacity_factor": 1.0,
            "router_options": {"noise_std": 0.0},
            "backend": "padded",
        },
    },
    {
        "name": "topk dropless",
        "moe": {"router": "topk", "k": 2, "capacity_factor": None, "router_options": {"noise_std": 0.0}},
    },
    {
        "name": "topk dropless padded",
        "moe": {
            "router": "topk",
            "k": 1,
            "capacity_factor": None,
            "router_options": {"noise_std": 0.0},
            "backend": "padded",
        },
    },
    {"name": "expert choice", "moe": {"router": "expert_choice", "capacity_factor": 1.0}},
    {"name": "expert choice padded", "moe": {"router": "expert_choice", "capacity_factor": 2.0, "backend": "padded"}},
    {"name": "soft", "moe": {"router": "soft", "router_options": {"slots_per_expert": 2}}},
    {
        "name": "topk, DDP (no EP)",
        "ep_size": 1,
        "moe": {"router": "topk", "k": 2, "router_options": {"noise_std": 0.0}},
    },
    {
        "name": "topk, every aux loss",
        "moe": {"router": "topk", "k": 2, "aux_loss_weights": ALL_AUX, "router_options": {"noise_std": 0.0}},
    },
    {
        "name": "expert choice, every aux loss, DDP",
        "ep_size": 1,
        "moe": {"router": "expert_choice", "capacity_factor": 1.0, "aux_loss_weights": ALL_AUX},
    },
]


def test_expert_parallel_layer_equals_one_process(tmp_path):
    run_workers("moe_layer", 2, tmp_path, CASES)
    for rank in range(2):
        diffs = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(diffs) == {c["name"] for c in CASES}
        for case, values in diffs.items():
            assert {"output", "input grad", "aux loss", "grad experts.w1"} <= set(values)
            assert any(key.startswith("grad router.") for key in values)  # the router's gradient is compared
            bad = {k: v for k, v in values.items() if not v <= 1e-5}
            assert not bad, f"rank {rank}, {case}: {bad}"


@pytest.mark.parametrize(("ep_size", "fsdp"), [(2, False), (2, True), (1, True)], ids=["ep", "fsdp+ep", "fsdp"])
def test_checkpoints_reshard_both_ways(ep_size, fsdp, tmp_path):
    import workers

    # One process, no process group: a model after one SGD step (momentum buffers exist), saved with DCP.
    model = workers.tiny_model(seed=0)
    optimizer = workers.sgd_step(model, seed=0)
    one = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3, "rng": torch.get_rng_state()}
    save_sharded(tmp_path / "one.dcp", one, model, optimizer, None)
    torch.save(one, tmp_path / "one.pt")
    run_workers("checkpoints", 2, tmp_path, ep_size, fsdp)
    tag = f"ep{ep_size}{'-fsdp' if fsdp else ''}"

    expert = "1.experts.w1"  # (E=4, D, H): with EP experts 0-1 on rank 0, 2-3 on rank 1; FSDP slices gathered
    index = list(one["model"]).index(expert)  # its number in the optimizer state
    for rank in range(2):  # 1 -> 2: each rank holds its experts, dense tensors whole (FSDP: its slice)
        rows = slice(2 * rank, 2 * rank + 2) if ep_size == 2 else slice(None)
        dump = torch.load(tmp_path / f"loaded{rank}-{tag}.pt")
        for how in ("loaded", "localized"):
            state = dump[how]
            assert torch.equal(state["model"][expert], one["model"][expert][rows])
            assert torch.equal(state["model"]["0.weight"], one["model"]["0.weight"])
            momentum = state["optimizer"]["state"][index]["momentum_buffer"]
            assert torch.equal(momentum, one["optimizer"]["state"][index]["momentum_buffer"][rows])
            assert state["step"] == 3 and state["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]
        sharded = sorted(k for k in one["model"] if fsdp and (ep_size == 1 or not k.startswith("1.experts.")))
        assert dump["sharded"] == {
            "loaded": sharded,
            "localized": sharded,
            "model": sharded,
        }  # FSDP: EP shards stay whole
        for key, value in dump["model"].items():  # and the model took them
            assert torch.equal(value, one["model"][key][rows] if key.startswith("1.experts.") else one["model"][key])

    # 2 -> 1: read whole in this process: the shards side by side, the dense tensors of rank 0 (= rank 1's).
    saved = [torch.load(tmp_path / f"saved{rank}-{tag}.pt") for rank in range(2)]
    whole = read_checkpoint(tmp_path / f"two-{tag}.dcp")
    experts = torch.cat([s["model"][expert] for s in saved]) if ep_size == 2 else saved[0]["model"][expert]
    assert torch.equal(whole["model"][expert], experts)
    assert whole["model"][expert].shape == one["model"][expert].shape
    for key in ("0.weight", "1.router.weight"):
        assert torch.equal(whole["model"][key], saved[0]["model"][key])
        assert torch.equal(saved[0]["model"][key], saved[1]["model"][key])  # reduced gradients: still replicas
    momentum = [s["optimizer"]["state"][index]["momentum_buffer"] for s in saved]
    expected = torch.cat(momentum) if ep_size == 2 else momentum[0]
    assert torch.equal(whole["optimizer"]["state"][index]["momentum_buffer"], expected)
    assert whole["step"] == 4
    model.load_state_dict(whole["model"])  # the single-process model takes it as it is


def test_sync_batchnorm_on_two_processes_equals_one_process(tmp_path):
    run_workers("sync_bn", 2, tmp_path, timeout=60)
    for rank in range(2):
        diffs = torch.load(tmp_path / f"rank{rank}.pt")
        assert diffs.pop("converted") == 3  # every BatchNorm, 1d and 2d
        assert diffs.pop("plain output") > 1e-2  # per-rank statistics are not the global batch's
        assert {"grad conv.1.weight 1", "buffer bn_seq.num_batches_tracked", "eval output"} <= set(diffs)
        bad = {k: v for k, v in diffs.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"


def test_a_failing_worker_is_reported_and_nothing_hangs(tmp_path):
    # No timer: a hang ends at the timeout, where run_workers kills the workers and raises TimeoutError, not this.
    with pytest.raises(WorkerFailed, match="failed on purpose"):
        run_workers("raises", 2, tmp_path, timeout=30)


# A tiny ViT (LayerNorm: no batch statistics, which would be per rank) with MoE MLPs in both blocks:
# 4 experts, top-2 with capacity, no router noise (per rank by design), aux losses of the global batch.
# Mixup pairs rows across the global batch, grad clipping sums the norm over expert shards: both must
# match too.
# 120 images / batch 16 = 7 steps per epoch; 2.86 epochs = 20 steps.
TINY_VIT = [
    "model.name=vit_moe_tiny_patch4_32",
    "model.kwargs={depth: 2, embed_dim: 16, num_heads: 2, placement: all}",
    "model.moe={num_experts: 4, capacity_factor: 1.0, aux_loss_weights: {importance: 0.1, switch: 0.1}, "
    "router_options: {noise_std: 0.0}}",
    "data.batch_size=16",
    "data.eval_batch_size=15",  # 40 test images: a last batch of 10, split 5 / 5; every batch cut 8 / 7
    "data.mixup_alpha=0.4",
    "optim.lr=0.05",
    "optim.grad_clip=1.0",
    "train.epochs=2.86",
    "train.progress=false",
    "train.tensorboard=false",
    "train.threads=1",
]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# How the two processes hold the model: experts split over them; dense weights sharded by FSDP (units
# of 100 parameters, so each block is one), the experts too (no EP) or not (EP keeps them whole).
LAYOUTS = {
    "ep": ["train.expert_parallel=2"],
    "fsdp": ["train.fsdp=true", "train.fsdp_unit_params=100"],
    "fsdp+ep": ["train.fsdp=true", "train.fsdp_unit_params=100", "train.expert_parallel=2"],
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process reference run, trained once for every layout: (its config overrides, Trainer)."""
    root = tmp_path_factory.mktemp("one")
    common = [*TINY_VIT, f"data.data_dir={write_cifar(root / 'data')}", f"train.out_dir={root}"]
    threads = torch.get_num_threads()
    one = Trainer(load_config(None, [*common, "train.run_name=one"]))
    one.fit()
    torch.set_num_threads(threads)  # train.threads=1 set it for the process
    return common, one


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_twenty_steps_on_two_processes_equal_one_process(layout, one_process, tmp_path, one_thread):
    common, one = one_process
    common = [*common, f"train.out_dir={tmp_path}"]  # the last word wins: the 2-process run writes here
    run_workers("train", 2, tmp_path, [*common, "train.run_name=two", *LAYOUTS[layout]], timeout=90)

    two_records, one_records = records(tmp_path / "two"), records(one.run_dir)
    assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == [7, 14, 20]
    for a, b in zip(two_records, one_records, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["test"]["nll"] == pytest.approx(b["test"]["nll"], abs=1e-5)
        assert a["test"]["top1"] == b["test"]["top1"]
        assert a["routing"].keys() == b["routing"].keys()
        for layer in a["routing"]:  # summed over ranks: the same loads as one process
            assert a["routing"][layer]["tokens_per_expert"] == pytest.approx(b["routing"][layer]["tokens_per_expert"])
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())  # rank 0's; all 40 test images scored
    assert summary["test"]["samples"] == 40 and summary["total_params"] == one.profile["total_params"]
    assert summary["processes"] == 2
    assert summary["fsdp_units"] == (["blocks.0", "blocks.1"] if "fsdp" in layout else None)  # then the root
    # 2 -> 1: the sharded checkpoint, read whole in this process, holds one process's weights.
    assert (tmp_path / "two" / "checkpoint.dcp").is_dir() and not (tmp_path / "two" / "checkpoint.pt").exists()
    two = load_checkpoint(tmp_path / "two")
    assert two["step"] == 20 and two["config"]["train"]["expert_parallel"] == (2 if "ep" in layout else 1)
    reference = one.state_dict()
    for key, value in reference["model"].items():
        assert torch.allclose(two["model"][key], value, atol=1e-5), key
    for i, state in reference["optimizer"]["state"].items():
        assert torch.allclose(two["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"], atol=1e-5)
    assert two["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    resumed = Trainer(load_config(None, [*common, "train.run_name=two"]), resume=True)  # on one process
    assert resumed.step == 20 and torch.equal(resumed.model.state_dict()[key], two["model"][key])


# The standard CIFAR CNN (BatchNorm everywhere, channels-last) with its last stage MoE, experts split
# over the two processes: with train.sync_bn its 20 steps are one process's too. A CNN's sums over
# 16·32·32 pixels round differently in any other order, and training amplifies that (at lr 0.05 one
# process on 1 and on 2 threads ends 7e-4 apart), so lr is 0.01: losses then agree to ~5e-6 and
# weights and running statistics to ~1e-4, while per-rank BatchNorm is 2e-2 and 0.16 away.
TINY_CNN = [
    "model.name=cnn_resnet_cifar_moe",
    "model.kwargs={width: 8}",
    "model.moe={capacity_factor: 1.0, router_options: {noise_std: 0.0}}",
    "data.batch_size=16",
    "data.eval_batch_size=15",
    "optim.lr=0.01",
    "train.epochs=2.86",
    "train.progress=false",
    "train.tensorboard=false",
    "train.threads=1",
]


def test_a_batchnorm_cnn_with_sync_bn_on_two_processes_equals_one_process(tmp_path, one_thread):
    common = [*TINY_CNN, f"data.data_dir={write_cifar(tmp_path / 'data')}", f"train.out_dir={tmp_path}"]
    one = Trainer(load_config(None, [*common, "train.run_name=one"]))
    one.fit()
    for sync in (True, False):
        name = f"two-sync{sync}"
        two_args = [*common, f"train.run_name={name}", f"train.sync_bn={str(sync).lower()}", "train.expert_parallel=2"]
        run_workers("train", 2, tmp_path, two_args, timeout=120)
        two_records, one_records = records(tmp_path / name), records(one.run_dir)
        assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == [7, 14, 20]
        gaps = [
            abs(x - y)
            for a, b in zip(two_records, one_records, strict=True)
            for x, y in ((a["train_loss"], b["train_loss"]), (a["test"]["nll"], b["test"]["nll"]))
        ]
        if not sync:  # per-rank statistics: another model
            assert max(gaps) > 1e-2, gaps
            continue
        assert max(gaps) < 5e-5, gaps
        two = load_checkpoint(tmp_path / name)
        running = [k for k in one.model.state_dict() if k.endswith("running_var")]
        assert len(running) > 5 and two["config"]["train"]["sync_bn"]
        for key, value in one.state_dict()["model"].items():  # weights and running statistics alike
            assert torch.allclose(two["model"][key].float(), value.float(), atol=5e-4), key


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_augment_only_their_rows_and_reassemble_one_process_batch(world_size):
    # No process group: ShardedLoader only slices. Each rank augments its own rows (crop, flip and
    # RandAugment with per-image seeds); together they are exactly the batch one process builds.
    from visionmoe.data.datasets import ImageTensors
    from visionmoe.data.loader import TensorLoader
    from visionmoe.distributed import ShardedLoader, shard_rows
    from visionmoe.train.data import Augment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = ImageTensors(images, torch.arange(40) % 10, [str(i) for i in range(10)])
    augment = Augment(padding=2, flip=True, randaugment=9)
    ranks = [ShardedLoader(TensorLoader(data, 16, augment=augment, seed=3), r, world_size) for r in range(world_size)]
    reference = list(TensorLoader(data, 16, augment=augment, seed=3))
    per_rank = [list(loader) for loader in ranks]
    assert all(len(batches) == len(reference) == 2 for batches in per_rank)
    for step, (x, y) in enumerate(reference):
        for r in range(world_size):
            rows = shard_rows(16, r, world_size)
            rx, ry = per_rank[r][step]
            assert torch.equal(rx, x[rows]) and torch.equal(ry, y[rows])


def test_a_rank_whose_piece_of_a_batch_is_all_unreadable_skips_the_step_with_every_rank(tmp_path, one_thread):
    # Under torchrun each rank decodes only its rows of a batch. One row per rank and one unreadable image:
    # once per epoch one rank's piece is empty. That rank used to drop the batch and take one step fewer,
    # while the other's gradient all-reduce waited on it (a hang). Now every rank skips that step, as one
    # process skips the batch: the same epochs, steps and schedule. In evaluation the rank forwards a blank
    # image instead (expert-parallel layers exchange rows in every forward), which is not scored.
    from standins import write_tiny_imagenet

    root = write_tiny_imagenet(tmp_path / "data", num_classes=3, per_class=4, size=16)
    bad = sorted((root / "tiny-imagenet-200" / "train" / "n00000000" / "images").iterdir())[0]
    bad.write_bytes(b"not an image")
    (root / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG").write_bytes(b"not an image")  # rank 0's, batch 1
    overrides = [
        "data.dataset=tiny-imagenet",
        f"data.data_dir={root}",
        "data.loader=stream",
        "data.image_size=16",
        "data.workers=0",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.skip_corrupt=true",
        "model.name=cnn_resnet_cifar_moe",
        "model.kwargs={width: 8}",
        "train.epochs=2",
        f"train.out_dir={tmp_path}",
        "train.run_name=two",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "train.expert_parallel=2",  # its all_to_all in every forward: evaluation must keep the ranks together too
    ]
    run_workers("train", 2, tmp_path, overrides, timeout=120)
    assert [(r["epoch"], r["step"]) for r in records(tmp_path / "two")] == [(1.0, 6), (2.0, 12)]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stopped"] == "completed"
    assert summary["test"]["samples"] == 5  # six validation images, one unreadable; rank 0's blank not scored
