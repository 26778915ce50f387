"""The grid algebra of a sweep: a preset × a grid of override axes × seeds, each MoE configuration with its
dense twin, and the names of their run directories. Pure: nothing here trains or writes.

    sweep = Sweep("topk", "cifar10_moe", grids=[{"model.moe.k": [1, 2]}], seeds=(0, 1, 2))
    [r.name for r in sweep.runs("runs/topk")]      # -> ["k=1-s0", "k=1,twin=flops-s0", "k=2-s0", ...]

**Axes.** A grid maps an axis to its values. A config key (``"model.moe.k": [1, 2]``) sets that
key; a named axis maps labels to override bundles (``"backbone": {"standard": ["model.name=..."],
"depthwise": [...]}``), for settings that move together. A sweep may hold several grids (one factor
at a time, as ablations are usually run): their runs are pooled, and an axis a grid does not vary
takes its *default*, the first value it is listed with, so a configuration shared by two grids is
trained once. An axis is named by its key's last part (``k``), or by the whole key where two keys
end alike.

**Run directories** are ``<out>/<key>-s<seed>``, the key naming the configuration by its axis
values in the sweep's axis order: ``backbone=depthwise,width=16-s0`` and its dense twin
``backbone=depthwise,width=16,twin=flops-s0`` (characters other than letters, digits and ``._+-``
become ``-``; a key over 100 characters is cut and ends in a hash of the whole). Each run directory
also holds ``sweep_run.json`` (study, axes, seed, pairing), so ``visionmoe report`` needs nothing else.

**Matched pairs by construction.** With ``twins=True`` every configuration gets a second run with
``model.dense_twin=flops`` under the same seed. What the pair shares, from how
:class:`~visionmoe.train.Trainer` seeds a run:

- *data*: the same training subset, batches and augmentation (the loader's batches are a function
  of (seed, epoch, step)), the same test set; mixup/cutmix are seeded per step;
- *initialisation*: ``torch.manual_seed(seed)`` precedes model construction, and the twin is a deep
  copy of the MoE model with each MoE layer swapped for a dense FFN, so every non-MoE weight (stem,
  convs, norms, attention, classifier) starts identical; a data-dependent init
  (``init_from_data``) sees the same images;
- *not shared*: the dense FFN that replaces an MoE layer is freshly initialised (from the RNG after
  the MoE model's construction), so it matches no expert; and the training RNG, reseeded with the
  seed before step 1, drifts apart once the MoE draws random numbers the twin does not (router
  noise), so dropout / drop-path masks differ after the first noisy routing step.

Studies without a dense twin (Rokah et al.'s heads) name a ``baseline`` instead, an axis value whose
configuration is the reference of the others under the same seed.

:mod:`visionmoe.studies.sweep` runs what this expands to.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

TWIN = "flops"  # the twin of a pair: equal active FLOPs
RUN_FILE = "sweep_run.json"  # in every run directory: the Run it holds (for the worker and the report)
MAX_KEY = 100


def parse_axis(text: str) -> tuple[str, list[Any]] | None:
    """``"model.moe.k=1,2"`` -> ``("model.moe.k", [1, 2])``; None for an override with one value.

    Values split at commas outside brackets and quotes, each parsed as YAML, so
    ``model.kwargs.moe_stages=-1,[1, 2],all`` has three values and ``model.kwargs.depths=[2,2,2]`` one.
    """
    key, sep, values = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not key=value (e.g. model.moe.k=1,2)")
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(values):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    parts.append(values[start:])
    if len(parts) == 1:
        return None
    parsed = []
    for part in parts:
        try:
            parsed.append(yaml.safe_load(part))
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ValueError(f"override {text!r}: cannot parse the value {part!r} as YAML ({problem})") from None
    return key, parsed


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-4"`` -> (0, 1, 2, 3, 4); ``"0,2,5"`` -> (0, 2, 5); ranges and lists mix (``"0-2,7"``)."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, dash, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise ValueError(f"seeds must look like 0-4 or 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct ints >= 0, got {text!r}")
    return tuple(seeds)


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _slug(text: str) -> str:
    """Filesystem-safe: brackets, quotes and spaces dropped, other runs of unsafe characters -> '-'."""
    text = re.sub(r"[\[\]{}()'\" ]", "", text)  # [1, 2] -> 1,2 ; a leading '-' (a negative number) stays
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text) or "_"


PER_RUN = {
    "train.seed": "use --seeds",
    "train.out_dir": "use --out",
    "train.run_name": "named by its configuration and seed",
}
"""Config keys a sweep sets for each run, after every other override: setting them otherwise has no effect."""


def refuse_per_run(override: str) -> None:
    """Raise if ``override`` (``key=value``, or a key) sets a key of :data:`PER_RUN`: it would have no effect."""
    if (key := override.partition("=")[0].strip()) in PER_RUN:
        raise ValueError(f"{override}: the sweep sets {key} for each run ({PER_RUN[key]})")


def axis_keys(grids: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Config key -> the axis that sets it: a key axis's own key, and every key a named axis's bundles set."""
    keys: dict[str, str] = {}
    for grid in grids:
        for axis, values in grid.items():
            if isinstance(values, Mapping):
                for bundle in values.values():
                    for override in bundle:
                        keys.setdefault(override.partition("=")[0].strip(), axis)
            else:
                keys.setdefault(axis, axis)
    return keys


def _values(axis: str, values: Any) -> dict[str, tuple[str, ...]]:
    """label -> overrides of one axis: a key's values, or a named axis's bundles."""
    if isinstance(values, Mapping):
        if "." in axis or "=" in axis or "," in axis:
            raise ValueError(f"a named axis needs a plain name (no '.', '=' or ','), got {axis!r}")
        return {str(label): tuple(bundle) for label, bundle in values.items()}
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"axis {axis!r} needs a non-empty list of values (or a mapping of named bundles)")
    if "." not in axis:
        raise ValueError(f"axis {axis!r} with a list of values must be a config key such as model.moe.k")
    return {_label(v): (f"{axis}={json.dumps(v)}",) for v in values}


@dataclass
class Run:
    """One training run of a sweep: a configuration (axis values) under one seed."""

    study: str
    preset: str
    key: str  # the configuration, without the seed
    seed: int
    axes: dict[str, str]  # axis name -> value label
    overrides: tuple[str, ...]  # everything that defines the run (seed, directory included)
    out_dir: str
    twin: str | None = None  # "flops" for the dense twin of a pair
    reference: str | None = None  # key of the configuration this one is compared against
    analyze: dict[str, Any] | None = (
        None  # visionmoe.analysis.trained_run.analyze_run keyword arguments, after training
    )

    @property
    def name(self) -> str:
        return f"{self.key}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir).expanduser() / self.name  # out_dir as given (a "~" stays in configs)

    def config(self, runtime: Sequence[str] = ()):
        """The validated config; ``runtime`` overrides change no result (threads, progress bar)."""
        from visionmoe.train.config import load_config

        return load_config(self.preset, [*self.overrides, *runtime])

    def finished(self) -> bool:
        """Trained as asked (:func:`ended_as_asked`) and, if the sweep analyses runs, analysed."""
        done = ended_as_asked(self.run_dir, lambda: self.config().train.time_limit_minutes)
        return done and (not self.analyze or (self.run_dir / "analysis.json").is_file())

    @property
    def spec_file(self) -> Path:
        """``<run_dir>/sweep_run.json``: this run, as the worker and ``visionmoe report`` read it."""
        return self.run_dir / RUN_FILE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """The text of :attr:`spec_file`."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Run:
        values = dict(values)
        values["overrides"] = tuple(values["overrides"])
        return cls(**values)

    @classmethod
    def load(cls, spec_file: str | Path) -> Run:
        """The run a :attr:`spec_file` describes."""
        return cls.from_dict(json.loads(Path(spec_file).read_text()))


def ended_as_asked(run_dir: Path, time_limit: Callable[[], float | None]) -> bool:
    """Whether ``run_dir``'s ``summary.json`` ends the run its config asks for: it trained every epoch, or it
    stopped at a time limit equal to ``time_limit()`` (the limit asked now). A run stopped by a limit that is
    no longer asked (another, or none) is not finished: it resumes from its checkpoint and trains on."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    stopped = json.loads(summary.read_text()).get("stopped", "completed")
    if stopped != "time_limit":
        return stopped == "completed"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return (saved.get("train") or {}).get("time_limit_minutes") == time_limit()


@dataclass
class Sweep:
    """A preset, grids of override axes, seeds, and how runs are paired.

    Args:
        name: the study's name (a column of the report's tables).
        preset: a config preset (``configs/<name>.yaml``) or a YAML path.
        grids: one or more mappings of axis -> values (see the module docstring); ``({},)`` is
            the preset alone.
        overrides: ``key=value`` strings applied to every run, before the axes.
        seeds: the seeds every configuration is trained under.
        twins: also train each configuration's dense twin of equal active FLOPs, as its reference.
        baseline: instead of twins, ``{axis: value}``: that configuration is the reference of the
            configurations that differ from it on this axis only.
        analyze: keyword arguments of :func:`visionmoe.analysis.trained_run.analyze_run` to run on each trained
            run (e.g. ``{"what": ["hessian", "landscape"]}``); None for no analysis.
    """

    name: str
    preset: str
    grids: Sequence[Mapping[str, Any]] = ({},)
    overrides: Sequence[str] = ()
    seeds: Sequence[int] = (0,)
    twins: bool = True
    baseline: Mapping[str, Any] | None = None
    analyze: Mapping[str, Any] | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.twins and self.baseline:
            raise ValueError("a sweep pairs runs with their dense twins or with a baseline, not both")

    def axis_names(self) -> dict[str, str]:
        """grid key -> axis name: the key's last part, or the whole key where two keys end alike."""
        keys = list(dict.fromkeys(k for grid in self.grids for k in grid))
        short = {k: k.rsplit(".", 1)[-1] for k in keys}
        return {k: k if sum(s == short[k] for s in short.values()) > 1 else short[k] for k in keys}

    def axes(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """axis name -> (label -> overrides), in order of first appearance; first label = default."""
        names = self.axis_names()
        axes: dict[str, dict[str, tuple[str, ...]]] = {}
        for grid in self.grids:
            for key, values in grid.items():
                for label, bundle in _values(key, values).items():
                    axes.setdefault(names[key], {}).setdefault(label, bundle)
        return axes

    def configurations(self) -> list[dict[str, str]]:
        """Every configuration as axis name -> label, grids pooled, duplicates dropped, in grid order."""
        axes, names = self.axes(), self.axis_names()
        defaults = {name: next(iter(values)) for name, values in axes.items()}
        seen, cells = set(), []
        for grid in self.grids:
            labels = [[(names[k], label) for label in _values(k, v)] for k, v in grid.items()]
            for combo in itertools.product(*labels):
                cell = {**defaults, **dict(combo)}
                cell = {name: cell[name] for name in axes}
                if (frozen := tuple(cell.items())) not in seen:
                    seen.add(frozen)
                    cells.append(cell)
        return cells

    def runs(self, out: str | Path, seeds: Sequence[int] | None = None) -> list[Run]:
        """The runs, seed by seed (so a partial sweep holds complete seeds), each MoE run before its twin."""
        axes, cells = self.axes(), self.configurations()
        keys = {tuple(c.items()): config_key(c) for c in cells}
        if len(set(keys.values())) != len(keys):
            dupes = sorted(k for k in keys.values() if list(keys.values()).count(k) > 1)
            raise ValueError(f"axis values {dupes} give the same directory name; use labels that differ in [A-Za-z0-9]")
        baseline = {name: _label(v) for name, v in (self.baseline or {}).items()}
        if unknown := sorted(set(baseline) - set(axes)):
            raise ValueError(f"baseline axis {unknown} is not an axis of the sweep; axes: {list(axes)}")
        for override in (*self.overrides, *axis_keys(self.grids)):
            refuse_per_run(override)
        runs = []
        for seed in self.seeds if seeds is None else seeds:
            for cell in cells:
                key = keys[tuple(cell.items())]
                overrides = [*self.overrides, *(o for name, label in cell.items() for o in axes[name][label])]
                common = {"study": self.name, "preset": self.preset, "seed": seed, "axes": dict(cell)}
                common.update(out_dir=str(out), analyze=dict(self.analyze) if self.analyze else None)
                twin_key = f"{key},twin={TWIN}"
                reference = twin_key if self.twins else _baseline_key(cell, baseline, keys)
                runs.append(
                    Run(key=key, overrides=_run_overrides(overrides, key, seed, out), reference=reference, **common)
                )
                if self.twins:
                    twin_overrides = _run_overrides([*overrides, f"model.dense_twin={TWIN}"], twin_key, seed, out)
                    runs.append(Run(key=twin_key, overrides=twin_overrides, twin=TWIN, **common))
        return runs

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=list))


def config_key(cell: Mapping[str, str]) -> str:
    """The directory name of a configuration: ``name=value`` pairs joined by commas, filesystem-safe."""
    key = ",".join(f"{_slug(name)}={_slug(label)}" for name, label in cell.items()) or "base"
    if len(key) > MAX_KEY:
        key = f"{key[: MAX_KEY - 9]}~{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return key


def _baseline_key(cell: dict[str, str], baseline: Mapping[str, str], keys: Mapping[tuple, str]) -> str | None:
    """The key of the configuration ``cell`` is compared against: ``cell`` with its value on a baseline axis
    replaced by the baseline's (None for the baseline itself, or without a baseline)."""
    reference = None
    for name, label in baseline.items():
        if cell[name] != label:
            ref_cell = {**cell, name: label}
            if tuple(ref_cell.items()) not in keys:
                raise ValueError(f"baseline {name}={label} has no configuration matching {cell}")
            reference = keys[tuple(ref_cell.items())]
    return reference


def _run_overrides(overrides: list[str], key: str, seed: int, out: str | Path) -> tuple[str, ...]:
    return (*overrides, f"train.seed={seed}", f"train.out_dir={json.dumps(str(out))}", f"train.run_name={key}-s{seed}")
