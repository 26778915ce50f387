"""Typed run configuration: dataclasses, YAML presets and ``key=value`` overrides.

A run is described by one :class:`Config` of five sections::

    data    which dataset, where, batch sizes, augmentation
    model   which registered model, its keyword arguments, MoE settings, dense twin
    optim   optimiser, schedule, regularisation, aux-loss scale
    train   epochs, seed, run directory, devices and speed options, checkpoints, logging
    eval    test-time options and calibration bins

Presets live in ``configs/*.yaml`` (each opens with the command that runs it and the result to
expect); :func:`load_config` reads a preset by path or by name, and :func:`apply_overrides` applies
``section.key=value`` strings from the command line. Every value is checked against its field's type
(the machinery, which knows nothing of a run, is :mod:`visionmoe.train.typed`) and
:meth:`Config.validate` checks ranges, so a bad value fails before any data is loaded. The MoE
settings are one typed value, ``model.moe`` (a :class:`visionmoe.MoEConfig`): see :class:`ModelConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from visionmoe.jsonl import write_atomic
from visionmoe.layers.moe import MoEConfig
from visionmoe.train.typed import build, parse_yaml, plain, set_path, yaml_problem

DATASETS = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "shards")
LOADERS = ("auto", "memory", "stream")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "linear", "constant")
DENSE_TWINS = (None, "flops", "params")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's presets


@dataclass
class DataConfig:
    """Dataset and input pipeline.

    ``dataset``: cifar10 / cifar100 (official pickles), tiny-imagenet (official layout),
    imagefolder (``<data_dir>/<train_split>/<class>/*`` and ``<data_dir>/<test_split>/...``, e.g.
    ImageNet-1K or the JPEG CIFAR-10 copy), shards (``<data_dir>/<split>/*.tar`` in the WebDataset
    layout, written by ``visionmoe shards``). ``data_dir``: the data root (default ``$VISIONMOE_DATA``,
    else ``~/.cache/visionmoe/data``).

    ``loader``: ``memory`` decodes each split once into uint8 tensors (fast; CIFAR- and Tiny-ImageNet
    sized data); ``stream`` reads and decodes files per batch in ``workers`` processes (ImageNet
    scale; :mod:`visionmoe.data.stream`), with random-resized crops (``crop_scale``), flip and
    RandAugment for training, resize + centre crop (``crop_pct``) for evaluation, ImageNet's
    normalisation, and no ``crop_padding``; ``auto`` streams shards, and an ImageFolder whose decoded
    pixels would take over a quarter of this machine's memory.
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    train_split: str = "train"
    test_split: str = "test"
    image_size: int | None = None  # resize on decode (ImageFolder, Tiny-ImageNet); None keeps the size
    num_classes: int | None = None  # None: from the dataset
    batch_size: int = 512
    eval_batch_size: int = 1024
    crop_padding: int = 4  # random crop after zero padding; 0 disables
    flip: bool = True
    randaugment: int | None = None  # magnitude (0-30) of RandAugment, 2 ops per image; null disables
    mixup_alpha: float = 0.0  # timm Mixup; 0 disables
    cutmix_alpha: float = 0.0
    train_subset: int | None = None  # a fixed random subset of N training images (quick runs, tests)
    test_subset: int | None = None
    loader: str = "auto"  # memory | stream | auto (see above)
    workers: int = 2  # stream: decoding processes (0: in the training process)
    prefetch: int = 2  # stream: batches each worker keeps ready (memory: workers × prefetch batches)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # stream: random-resized crop's area range
    crop_pct: float = 0.875  # stream: evaluation centre crop = image_size / crop_pct resized, then cropped
    skip_corrupt: bool = False  # stream: drop unreadable images (counted, warned) instead of stopping


@dataclass
class ModelConfig:
    """``name``: a registered visionmoe model or any timm model; ``kwargs`` go to its constructor.

    ``moe``: the MoE settings, an :class:`visionmoe.MoEConfig` (num_experts, router, k,
    capacity_factor, eval_capacity_factor, aux_loss_weights, ...) of the fields set here, each
    type-checked like any other field (``model.moe.num_experts=16``); the model merges it over its
    family's default (:meth:`~visionmoe.MoEConfig.merged`: a field left out keeps the default, and a
    new router drops the default's router settings). ``capacity_factor: null`` is dropless routing.
    It is the one place for them: ``model.kwargs.moe`` is refused. ``moeify`` turns a
    plain timm model into an MoE model (``placement``, ``upcycle``, ``hidden_dim`` and the MoE
    settings of ``moe``). ``dense_twin`` trains the model's matched dense twin instead ("flops":
    equal active FLOPs, "params": equal total parameters).
    """

    name: str = "cifar_airbench_moe"
    kwargs: dict[str, Any] = field(default_factory=dict)
    moe: MoEConfig | None = None
    moeify: dict[str, Any] | None = None
    dense_twin: str | None = None


@dataclass
class OptimConfig:
    """Optimiser and schedule. Learning rates are per step; ``warmup_epochs`` may be fractional.

    Weight decay skips biases, norm weights and everything ``model.no_weight_decay()`` names.
    The loss is cross-entropy (label smoothing) + ``aux_loss_scale`` × the MoE layers' aux losses.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # the schedule's final lr, as a fraction of ``lr``
    milestones: tuple[float, ...] = ()  # step schedule: epochs at which lr *= gamma
    gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm
    aux_loss_scale: float = 1.0


@dataclass
class TrainConfig:
    """The run: length, seed, where it writes, speed options, checkpoints and logging."""

    epochs: float = 10.0  # may be fractional: the last epoch stops part-way
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = None  # default: <config name>-s<seed>
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    # glibc keeps freed memory for reuse instead of unmapping it (visionmoe.allocator): the same results, CPU
    # steps up to a third faster at large batches, the process at its peak resident memory. Process-wide.
    keep_freed_memory: bool = True
    channels_last: bool = True
    compile: bool = False
    amp: bool = True  # bf16 autocast on CUDA; ignored on the CPU (no fast bf16 there)
    checkpoint_every_steps: int | None = None  # also checkpoint mid-epoch (each epoch always)
    eval_every: int = 1  # epochs
    log_every: int = 50  # steps between progress-bar metric refreshes
    tensorboard: bool = True
    progress: bool = True
    time_limit_minutes: float | None = None  # stop training (and evaluate) once this much time is spent
    expert_parallel: int = 1  # under torchrun: processes each MoE layer's experts are spread over (divides E)
    # Under torchrun: shard what is not expert-parallel (weights, gradients, optimiser state) over the
    # ranks with FSDP2 instead of replicating it (DDP); nothing to shard in one process, where it is moot.
    fsdp: bool = False
    fsdp_unit_params: int = 1_000_000  # a block (element of a Sequential/ModuleList) this big is its own unit
    # Under torchrun: the routers' aux losses balance the global batch (their per-expert sums all-reduced,
    # as one process computes them) rather than each rank's share.
    global_aux_loss: bool = True
    # Under torchrun: BatchNorm normalises with the global batch's statistics (SyncBatchNorm; on the CPU
    # visionmoe's own) rather than each rank's rows. Off by default, as in timm: it costs a collective per layer.
    sync_bn: bool = False


@dataclass
class EvalConfig:
    tta_flip: bool = False  # average logits over the image and its mirror
    calibration_bins: int = 15
    # After training, the test set again in fixed batches of each of these sizes (summary.json's
    # "test_by_batch_size"): a model whose routing mixes samples (Soft MoE over the batch) depends on them.
    batch_sizes: tuple[int, ...] = ()


@dataclass
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts of plain values; ``model.moe`` holds only the MoE settings that are set."""
        values = asdict(self)
        if self.model.moe is not None:
            values["model"]["moe"] = self.model.moe.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Config:
        """Build from nested dicts; unknown keys and wrongly typed values raise one-line errors."""
        return build(cls, values, source)

    def validate(self, *, saved: bool = False) -> Config:
        """Range checks; returns self. Called before any data is loaded.

        A new run's config is also refused for values earlier versions took (``data.num_classes=0``,
        ``optim.betas`` out of range), for settings it would ignore and for a model section that cannot
        build its model (built on the meta device). ``saved=True`` (a trained run's own config, read
        back for eval or resume) skips those: they were the run's settings when it trained, and
        rebuilding it must not depend on checks added since. Whether this machine has the
        ``train.device`` named is the :class:`~visionmoe.train.Trainer`'s check (:func:`parse_device`),
        so a sweep can be validated on a machine without the GPUs its runs will train on.
        """
        d, o, t = self.data, self.optim, self.train
        _one_of("data.dataset", d.dataset, DATASETS)
        _one_of("data.loader", d.loader, LOADERS)
        _one_of("optim.name", o.name, OPTIMIZERS)
        _one_of("optim.schedule", o.schedule, SCHEDULES)
        _one_of("model.dense_twin", self.model.dense_twin, DENSE_TWINS)
        checks = [
            ("data.batch_size", d.batch_size, d.batch_size >= 1, ">= 1"),
            ("data.eval_batch_size", d.eval_batch_size, d.eval_batch_size >= 1, ">= 1"),
            ("data.crop_padding", d.crop_padding, d.crop_padding >= 0, ">= 0"),
            ("data.mixup_alpha", d.mixup_alpha, d.mixup_alpha >= 0, ">= 0"),
            ("data.cutmix_alpha", d.cutmix_alpha, d.cutmix_alpha >= 0, ">= 0"),
            ("data.randaugment", d.randaugment, d.randaugment is None or 0 <= d.randaugment <= 30, "0-30 or null"),
            ("data.image_size", d.image_size, d.image_size is None or d.image_size >= 8, ">= 8 or null"),
            ("data.train_subset", d.train_subset, d.train_subset is None or d.train_subset >= 1, ">= 1 or null"),
            ("data.test_subset", d.test_subset, d.test_subset is None or d.test_subset >= 1, ">= 1 or null"),
            ("data.workers", d.workers, d.workers >= 0, ">= 0"),
            ("data.prefetch", d.prefetch, d.prefetch >= 1, ">= 1"),
            ("data.crop_scale", d.crop_scale, 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "0 < min <= max <= 1"),
            ("data.crop_pct", d.crop_pct, 0 < d.crop_pct <= 1, "in (0, 1]"),
            ("optim.lr", o.lr, o.lr > 0, "> 0"),
            ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
            ("train.epochs", t.epochs, t.epochs > 0, "> 0"),  # before the ranges it bounds (warm-up)
            ("optim.warmup_epochs", o.warmup_epochs, 0 <= o.warmup_epochs <= t.epochs, "in [0, train.epochs]"),
            ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
            ("optim.gamma", o.gamma, 0 < o.gamma <= 1, "in (0, 1]"),
            ("optim.label_smoothing", o.label_smoothing, 0 <= o.label_smoothing < 1, "in [0, 1)"),
            ("optim.grad_clip", o.grad_clip, o.grad_clip is None or o.grad_clip > 0, "> 0 or null"),
            ("optim.aux_loss_scale", o.aux_loss_scale, o.aux_loss_scale >= 0, ">= 0"),
            ("train.seed", t.seed, t.seed >= 0, ">= 0"),
            ("train.threads", t.threads, t.threads is None or t.threads >= 1, ">= 1 or null"),
            ("train.eval_every", t.eval_every, t.eval_every >= 1, ">= 1"),
            ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
            ("train.expert_parallel", t.expert_parallel, t.expert_parallel >= 1, ">= 1 (1: no expert parallelism)"),
            ("train.fsdp_unit_params", t.fsdp_unit_params, t.fsdp_unit_params >= 1, ">= 1 parameters"),
            ("eval.calibration_bins", self.eval.calibration_bins, self.eval.calibration_bins >= 1, ">= 1"),
        ]
        for key, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"{key}={value!r} is out of range; expected {expected}")
        if any(not isinstance(b, int) or b < 1 for b in self.eval.batch_sizes):
            raise ValueError(f"eval.batch_sizes={self.eval.batch_sizes!r}; expected a list of ints >= 1")
        if t.checkpoint_every_steps is not None and t.checkpoint_every_steps < 1:
            raise ValueError(f"train.checkpoint_every_steps={t.checkpoint_every_steps!r}; expected >= 1 or null")
        if t.time_limit_minutes is not None and t.time_limit_minutes <= 0:
            raise ValueError(f"train.time_limit_minutes={t.time_limit_minutes!r}; expected > 0 or null")
        if (d.mixup_alpha > 0 or d.cutmix_alpha > 0) and d.batch_size % 2:
            raise ValueError(
                f"data.batch_size={d.batch_size!r} is odd; mixup/cutmix (data.mixup_alpha={d.mixup_alpha!r}, "
                f"data.cutmix_alpha={d.cutmix_alpha!r}) expected an even batch size"
            )
        if t.run_name is not None and (t.run_name in (".", "..") or any(c in t.run_name for c in "/\\")):
            raise ValueError(
                f"train.run_name={t.run_name!r}; expected a directory name (no '/', not '.' or '..'): "
                "the run's directory is train.out_dir/train.run_name"
            )
        parse_device(t.device, "train.device", here=False)  # whether this machine has it: the Trainer's check
        if list(o.milestones) != sorted(o.milestones) or any(m <= 0 for m in o.milestones):
            raise ValueError(f"optim.milestones={o.milestones!r}; expected increasing epochs > 0")
        if saved:
            return self
        # Values earlier versions accepted, which saved runs may hold: 0 classes meant "from the dataset",
        # and SGD never reads the betas.
        added = [
            ("data.num_classes", d.num_classes, d.num_classes is None or d.num_classes >= 1, ">= 1 or null"),
            ("optim.betas", o.betas, all(0 <= b < 1 for b in o.betas), "each in [0, 1)"),
        ]
        for key, value, ok, expected in added:
            if not ok:
                raise ValueError(f"{key}={value!r} is out of range; expected {expected}")
        # Settings that one dataset or schedule reads and the others would drop without a word.
        ignored = [
            ("data.image_size", d.image_size is not None and d.dataset in ("cifar10", "cifar100"), "is 32 px; null"),
            ("data.download", d.download and d.dataset not in ("cifar10", "cifar100"), "cannot download it; false"),
            ("data.train_split", d.train_split != "train" and d.dataset != "imagefolder", "has fixed splits; 'train'"),
            ("data.test_split", d.test_split != "test" and d.dataset != "imagefolder", "has fixed splits; 'test'"),
        ]
        for key, dropped, why in ignored:
            if dropped:
                value = getattr(d, key.split(".")[1])
                reason, expected = why.split("; ")
                raise ValueError(
                    f"{key}={value!r} would be ignored: data.dataset={d.dataset!r} {reason}; expected {expected}"
                )
        # Settings only some schedules read.
        by_schedule = [
            ("optim.milestones", list(o.milestones), bool(o.milestones), ("step",), "optim.milestones=[]"),
            ("optim.gamma", o.gamma, o.gamma != OptimConfig.gamma, ("step",), f"optim.gamma={OptimConfig.gamma}"),
            (
                "optim.min_lr_ratio",
                o.min_lr_ratio,
                o.min_lr_ratio != OptimConfig.min_lr_ratio,
                ("cosine", "linear"),
                f"optim.min_lr_ratio={OptimConfig.min_lr_ratio}",
            ),
        ]
        for key, value, set_, readers, default in by_schedule:
            if set_ and o.schedule not in readers:
                raise ValueError(
                    f"{key}={value!r} would be ignored by optim.schedule={o.schedule!r} (read by "
                    f"{' and '.join(map(repr, readers))} only); set optim.schedule={readers[0]}, or {default}"
                )
        if late := [m for m in o.milestones if m >= t.epochs]:
            raise ValueError(
                f"optim.milestones={list(o.milestones)!r} would be ignored past train.epochs={t.epochs!r} "
                f"({late} never reached); expected milestones < train.epochs"
            )
        from visionmoe.train.build import check_model_config  # the model section, on the meta device (a cycle)

        check_model_config(self.model, d.num_classes or {"cifar100": 100, "tiny-imagenet": 200}.get(d.dataset, 10))
        return self


def parse_device(value: str, key: str, *, here: bool = True) -> torch.device:
    """The device ``value`` names: "auto" (CUDA where available, else the CPU), "cpu" or "cuda[:N]".

    A one-line error names ``key`` and the value for a string torch does not parse (``cudax``,
    ``cuda:-1``) or another kind of device; ``here`` also refuses a CUDA device this machine lacks.
    """
    expected = "expected 'auto', 'cpu' or 'cuda[:N]'"
    if value == "auto":
        return torch.device("cuda" if here and torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a device; {expected}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={value!r} is not a device visionmoe trains on; {expected}")
    if here and device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={value!r}, but CUDA is not available on this machine; expected 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{key}={value!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"expected 'cuda:0' to 'cuda:{torch.cuda.device_count() - 1}', 'auto' or 'cpu'"
            )
    return device


def _one_of(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {list(choices)}")


# ---- presets and overrides ------------------------------------------------------------------


def preset_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml")) if config_dir.is_dir() else []


def find_preset(name_or_path: str | Path, config_dir: Path = CONFIG_DIR) -> Path:
    """A preset file: an existing path, else ``<config_dir>/<name>.yaml``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = config_dir / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"no config {str(name_or_path)!r}; presets in {_shown(config_dir)}: {preset_names(config_dir)}"
    )


def _shown(path: Path) -> str:
    """``path`` for an error message: as given, or ``configs/...`` for the packaged presets (never this
    machine's absolute path to them; messages can end up in committed manifests)."""
    try:
        return str(Path("configs") / path.relative_to(CONFIG_DIR))
    except ValueError:
        return str(path)


def _find_base(base: Any, path: Path) -> Path:
    """The file that ``base:`` in preset ``path`` names: a path relative to ``path``'s folder (or absolute);
    a bare name (``cifar10_moe``, ``cifar10_moe.yaml``) next to ``path`` (not ``path`` itself), else among the
    packaged presets."""
    if not isinstance(base, str) or not base.strip():
        got = "an empty name" if isinstance(base, str) else type(base).__name__
        raise ValueError(f"{_shown(path)}: base={base!r}: expected a preset name or a path to a .yaml file, got {got}")
    given = Path(base).expanduser()
    candidate = given if given.is_absolute() else path.parent / given
    if candidate.is_file():
        return candidate
    if given.name != base:  # a path: only relative to the file
        raise FileNotFoundError(
            f"{_shown(path)}: base={base!r}: no file {_shown(candidate)} (a path in base: is relative to the file)"
        )
    name = given.stem if given.suffix in (".yaml", ".yml") else given.name
    for folder in (path.parent, CONFIG_DIR):
        found = folder / f"{name}.yaml"
        if found.is_file() and found.resolve() != path.resolve():  # cf/x.yaml may extend the packaged x
            return found
    raise FileNotFoundError(
        f"{_shown(path)}: base={base!r}: no {name}.yaml next to it nor among the packaged presets "
        f"{preset_names(CONFIG_DIR)}"
    )


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated :class:`Config` from a preset (or the defaults) with ``key=value`` overrides applied."""
    if name_or_path is None:
        config = Config()
    else:
        path = find_preset(name_or_path)
        values = _read_preset(path, seen=())
        values.setdefault("name", path.stem)
        config = build(Config, values, _shown(path))
    return apply_overrides(config, overrides).validate()


def _read_preset(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A preset's values; ``base: <preset>`` merges them over another preset's (sections key by key).

    ``seen``: the presets whose base this one is, as found (relative where the user's path was)."""
    if path.resolve() in {p.resolve() for p in seen}:
        raise ValueError(f"preset {_shown(path)} is its own base (via {[_shown(p) for p in seen]})")
    try:
        values = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"cannot parse {_shown(path)}: {yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{_shown(path)} must hold a mapping of config sections, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    merged = _read_preset(_find_base(base, path), (*seen, path))
    merged.pop("name", None)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` overrides (values parsed as YAML: 0.1, true, null, [1, 2], {a: 1}).

    A key into a section (``model.moe.k=1``, checked against :class:`visionmoe.MoEConfig`'s fields)
    or a dict field (``model.kwargs.width=64``) sets that entry.
    """
    values = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=0.05)")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: cannot parse {text!r} ({yaml_problem(error)})") from None
        set_path(values, Config, key.split("."), value, item)
    return build(Config, values, "config")


def save_config(config: Config, path: Path) -> None:
    write_atomic(path, yaml.safe_dump(plain(config.to_dict()), sort_keys=False))


__all__ = [
    "CONFIG_DIR",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "find_preset",
    "load_config",
    "parse_device",
    "plain",
    "preset_names",
    "save_config",
]
