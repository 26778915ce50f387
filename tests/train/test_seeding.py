"""The seed rule (visionmoe.seeding): its values are pinned, because every saved run depends on them."""

import pytest
import torch

from visionmoe.data import ImageTensors, TensorLoader
from visionmoe.seeding import RANK_SEED_STRIDE, loader_seed, rank_seed, step_seed


def test_seed_values_are_pinned():
    # seed·1_000_003 + epoch·7_919 + step·104_729, reduced mod 2**63
    assert loader_seed(0, 0) == 0
    assert loader_seed(3, 2) == 3 * 1_000_003 + 2 * 7_919 == 3_015_847
    assert loader_seed(3, 2, 5) == 3_015_847 + 5 * 104_729 == 3_539_492
    assert loader_seed(-1, 0) == 2**63 - 1_000_003  # a negative seed wraps into torch's seed range
    # mixup: seed·1_000_003 + step; rank r: seed + r·1_000_003
    assert step_seed(0, 7) == 7 and step_seed(2, 7) == 2_000_013
    assert RANK_SEED_STRIDE == 1_000_003 and rank_seed(5, 0) == 5 and rank_seed(5, 2) == 2_000_011
    with pytest.raises(ValueError, match="epoch, step"):
        loader_seed(0, 1, 2, 3)


def test_the_loader_draws_from_the_pinned_seeds():
    images = torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).reshape(10, 3, 2, 2)
    data = ImageTensors(images, torch.arange(10), [str(i) for i in range(10)])
    seen = []

    def augment(batch, generator):
        seen.append(generator.initial_seed())
        return batch

    loader = TensorLoader(data, batch_size=4, augment=augment, seed=3)
    # epoch 2's order: a permutation drawn from seed 3·1_000_003 + 2·7_919
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3_015_847))
    assert torch.equal(loader.order(2), expected)
    list(loader)  # epoch 0, steps 0 and 1: augmentation keys (0, 1) and (0, 2)
    assert seen == [3_000_009 + 104_729, 3_000_009 + 2 * 104_729]


def test_the_trainer_seeds_mixup_by_the_step_seed(cifar10_root, tmp_path):
    from visionmoe.train import Trainer, load_config

    overrides = ["model.name=cnn_resnet_cifar_moe", "model.kwargs={width: 8}", "data.batch_size=16",
                 "data.mixup_alpha=0.8", "train.seed=2", f"data.data_dir={cifar10_root}",
                 f"train.out_dir={tmp_path}", "train.progress=false"]  # fmt: skip
    trainer = Trainer(load_config(None, overrides))
    seeds, mix = [], trainer.mixer

    def spy(x, y, seed):
        seeds.append(seed)
        return mix(x, y, seed=seed)

    trainer.mixer = spy
    x, y = next(iter(trainer.train_loader))
    for trainer.step in (0, 7):
        trainer.train_step(x, y)
    assert seeds == [2_000_006, 2_000_013]  # 2·1_000_003 + step
