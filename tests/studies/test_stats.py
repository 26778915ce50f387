"""Statistics against values computed by hand on a small table of fake runs."""

import json
import math

import pytest

from visionmoe.studies import contrast_gaps, epoch_gaps, gap_tests, load_runs, paired_gaps, summarize, t_interval
from visionmoe.studies.report import write_report
from visionmoe.studies.stats import pairs_with_model, rho_trend


def fake_run(root, study, key, seed, top1, *, reference=None, twin=False, axes=None, rho=0.1):
    run_dir = root / f"{key}-s{seed}"
    run_dir.mkdir(parents=True)
    summary = {
        "name": study,
        "model": "m",
        "dense_twin": "flops" if twin else None,
        "seed": seed,
        "epochs": 1,
        "test": {"top1": top1 / 100, "top5": 1.0, "nll": 1.0, "ece": 0.1},
        "best_top1": top1 / 100,
        "rho": 0.0 if twin else rho,
        "total_params": 1000,
        "active_params": 500,
        "flops_per_image": 2e6,
        "train_seconds": 60.0,
        "images_per_s": 100.0,
        "stopped": "completed",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    spec = {"study": study, "key": key, "seed": seed, "axes": axes or {}, "reference": reference}
    (run_dir / "sweep_run.json").write_text(json.dumps(spec))
    return run_dir


@pytest.fixture
def table(tmp_path):
    # Config A against its twin B, seeds 0-2: A = 81, 83, 80; B = 80, 80, 82 -> gaps +1, +3, -2.
    # A also has a seed 3 whose twin never finished.
    for seed, a, b in [(0, 81, 80), (1, 83, 80), (2, 80, 82)]:
        fake_run(tmp_path, "s", "k=1", seed, a, reference="k=1,twin=flops", axes={"k": "1"})
        fake_run(tmp_path, "s", "k=1,twin=flops", seed, b, twin=True, axes={"k": "1"})
    fake_run(tmp_path, "s", "k=1", 3, 85, reference="k=1,twin=flops", axes={"k": "1"})
    return load_runs([tmp_path])


def test_long_table(table):
    assert len(table) == 7
    assert table.attrs["axes"] == ["k"]
    row = table[(table["config"] == "k=1") & (table["seed"] == 0)].iloc[0]
    assert row["top1"] == pytest.approx(81) and row["reference"] == "k=1,twin=flops" and not row["is_twin"]
    assert row["k"] == "1" and row["train_minutes"] == 1.0 and row["study"] == "s"


def test_runs_are_listed_in_numeric_order(tmp_path):
    for width in (32, 8, 16):
        for seed in (10, 2):
            fake_run(tmp_path, "s", f"width={width}", seed, 80.0, axes={"width": str(width)})
    table = load_runs([tmp_path])
    assert list(table["config"].drop_duplicates()) == ["width=8", "width=16", "width=32"]
    assert list(table[table["config"] == "width=8"]["seed"]) == [2, 10]


def test_per_configuration(table):
    configs = summarize(table).set_index("config")
    # twin: 80, 80, 82 -> mean 80.6667; deviations -2/3, -2/3, 4/3; s² = (4/9 + 4/9 + 16/9) / 2 = 4/3, s = 1.1547;
    # t(0.975, 2) = 4.302653, half-width = 4.302653 · 1.1547 / √3 = 2.8684
    twin = configs.loc["k=1,twin=flops"]
    assert twin["n"] == 3
    assert twin["mean"] == pytest.approx(80.6667, abs=1e-4)
    assert twin["std"] == pytest.approx(1.1547, abs=1e-4)
    assert twin["ci_low"] == pytest.approx(80.6667 - 2.8684, abs=1e-3)
    assert twin["ci_high"] == pytest.approx(80.6667 + 2.8684, abs=1e-3)
    assert configs.loc["k=1", "n"] == 4  # 81, 83, 80, 85


def test_pairs_by_hand(table):
    per_seed, pairs = paired_gaps(table)
    assert per_seed["gap"].tolist() == pytest.approx([1, 3, -2])
    p = pairs.iloc[0]
    # gaps +1, +3, -2: mean 2/3; deviations 1/3, 7/3, -8/3; s² = (1 + 49 + 64) / 9 / 2 = 6.3333, s = 2.5166;
    # standard error s/√3 = 1.4530; t = 0.6667 / 1.4530 = 0.4588; with 2 degrees of freedom the two-sided
    # p-value is 1 − t/√(2 + t²) = 1 − 0.4588/1.4868 = 0.6914; CI = 2/3 ± 4.302653 · 1.4530 = 2/3 ± 6.2518.
    assert p["n"] == 3 and p["reference"] == "k=1,twin=flops"
    assert p["mean_gap"] == pytest.approx(2 / 3)
    assert p["std_gap"] == pytest.approx(2.5166, abs=1e-4)
    assert p["ci_low"] == pytest.approx(2 / 3 - 6.2518, abs=1e-3)
    assert p["ci_high"] == pytest.approx(2 / 3 + 6.2518, abs=1e-3)
    assert p["t_stat"] == pytest.approx(0.4588, abs=1e-4)
    assert p["t_p"] == pytest.approx(0.6914, abs=1e-4)
    # Two of three gaps (+1, +3) share the sign of the mean (+).
    assert p["same_sign"] == 2
    # Wilcoxon: |gaps| 1, 3, 2 rank 1, 3, 2; W+ = 1 + 3 = 4, W− = 2, statistic min = 2. Exactly, W+ over the 8
    # sign patterns takes 0, 1, 2, 3, 3, 4, 5, 6, so P(W ≤ 2) = 3/8 and the two-sided p = 0.75.
    assert p["w_stat"] == 2 and p["w_p"] == pytest.approx(0.75)
    # seed 3 has no twin; with 3 non-zero gaps the smallest possible Wilcoxon p is 2/2³ = 0.25.
    assert "1 seed(s) without a reference run" in p["note"]
    assert "smallest p = 0.25" in p["note"]


def write_curve(run_dir, test_top1, train_top1, every=1):
    """metrics.jsonl of one run: epoch e (from 1) logs train_top1[e-1], and test_top1[e-1] every ``every``."""
    lines = []
    for epoch, (test, train) in enumerate(zip(test_top1, train_top1, strict=True), 1):
        record = {"epoch": epoch, "train_loss": 1.0, "train_top1": train / 100}
        if epoch % every == 0:
            record["test"] = {"top1": test / 100, "nll": 1.0}
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_gaps_by_epoch_by_hand(tmp_path):
    # Seeds 0-1, 3 epochs. MoE test 50/60/70 and 52/58/74; twin 55/60/65 and 50/62/70:
    # test gaps -5/0/+5 and +2/-4/+4 -> means -1.5, -2, +4.5; training gaps -10/-5/0 and -6/-3/+2 -> -8, -4, +1.
    moe = {0: ([50, 60, 70], [40, 50, 60]), 1: ([52, 58, 74], [44, 52, 62])}
    twin = {0: ([55, 60, 65], [50, 55, 60]), 1: ([50, 62, 70], [50, 55, 60])}
    for seed in (0, 1):
        write_curve(fake_run(tmp_path, "s", "r=4", seed, moe[seed][0][-1], reference="r=4,twin=flops"), *moe[seed])
        write_curve(fake_run(tmp_path, "s", "r=4,twin=flops", seed, twin[seed][0][-1], twin=True), *twin[seed])
    # a pair whose runs have no records, and one whose twin evaluated only at epoch 2: no rows, one row
    fake_run(tmp_path, "s", "r=1", 0, 50.0, reference="r=1,twin=flops")
    fake_run(tmp_path, "s", "r=1,twin=flops", 0, 50.0, twin=True)
    write_curve(fake_run(tmp_path, "s", "r=2", 0, 61.0, reference="r=2,twin=flops"), [1, 60, 61], [0, 0, 0])
    write_curve(fake_run(tmp_path, "s", "r=2,twin=flops", 0, 0.0, twin=True), [9, 63, 9], [0, 0, 0], every=2)
    per_seed, by_epoch = epoch_gaps(load_runs([tmp_path]))

    four = by_epoch[by_epoch["config"] == "r=4"]
    assert four["epoch"].tolist() == [1, 2, 3] and four["n"].tolist() == [2, 2, 2]
    assert four["mean_gap"].tolist() == pytest.approx([-1.5, -2, 4.5])
    assert four["mean_train_gap"].tolist() == pytest.approx([-8, -4, 1])
    # epoch 1: gaps -5, +2: mean -1.5, s = 7/√2 = 4.9497, half-width t(0.975, 1) · s/√2 = 12.7062 · 3.5 = 44.47
    assert four["ci_low"].iloc[0] == pytest.approx(-1.5 - 44.4717, abs=1e-3)
    assert four["ci_high"].iloc[0] == pytest.approx(-1.5 + 44.4717, abs=1e-3)
    seed1 = per_seed[(per_seed["config"] == "r=4") & (per_seed["seed"] == 1)]
    assert seed1["gap"].tolist() == pytest.approx([2, -4, 4]) and seed1["top1_ref"].tolist() == pytest.approx(
        [50, 62, 70]
    )
    two = by_epoch[by_epoch["config"] == "r=2"]
    assert two["epoch"].tolist() == [2] and two["mean_gap"].tolist() == pytest.approx([-3]) and two["n"].item() == 1
    assert "r=1" not in set(by_epoch["config"])
    assert epoch_gaps(load_runs([tmp_path]), "best_top1")[1].empty  # not logged per epoch

    files = write_report([tmp_path], tmp_path / "report")
    assert (tmp_path / "report" / "s_gap_by_epoch.png") in files["plots"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### Pairs by epoch" in text and "| r=4 − r=4,twin=flops | 2 | -1.50 [-45.97, 42.97] (-8.0) |" in text


def test_contrast_compares_two_configurations_seed_by_seed(table, tmp_path):
    # k=2 (seeds 0-2: 84, 82, 83) against k=1 (81, 83, 80): gaps +3, -1, +3; mean 5/3; deviations 4/3, -8/3, 4/3;
    # s² = (16 + 64 + 16) / 9 / 2 = 16/3, s = 2.3094; standard error 4/3; t = (5/3) / (4/3) = 1.25;
    # two-sided p with 2 degrees of freedom = 1 − t/√(2 + t²) = 1 − 1.25/1.8875 = 0.3377.
    for seed, top1 in [(0, 84), (1, 82), (2, 83)]:
        fake_run(tmp_path, "s", "k=2", seed, top1, reference="k=2,twin=flops", axes={"k": "2"})
    both = load_runs([tmp_path])  # the fixture's runs and these
    per_seed, pairs = contrast_gaps(both, [("k=2", "k=1")])
    assert per_seed["gap"].tolist() == pytest.approx([3, -1, 3])  # seed 3 of k=1 has no k=2 run
    p = pairs.iloc[0]
    assert (p["config"], p["reference"], p["n"], p["same_sign"]) == ("k=2", "k=1", 3, 2)
    assert p["mean_gap"] == pytest.approx(5 / 3)
    assert p["std_gap"] == pytest.approx(2.3094, abs=1e-4)
    assert p["t_stat"] == pytest.approx(1.25) and p["t_p"] == pytest.approx(0.3377, abs=1e-4)
    # The sweep's own pairs are untouched: k=1 against its twin as before; k=2's twin never ran.
    pairs = paired_gaps(both)[1].set_index("config")
    assert pairs.loc["k=1", "mean_gap"] == pytest.approx(2 / 3) and pairs.loc["k=2", "n"] == 0
    with pytest.raises(ValueError, match="contrast k=3:k=1: no study has both"):
        contrast_gaps(both, [("k=3", "k=1")])


def test_degenerate_gaps_give_nan_and_a_note():
    one = gap_tests([81.0], [80.0])
    assert one["n"] == 1 and one["mean_gap"] == 1 and math.isnan(one["t_p"]) and math.isnan(one["w_p"])
    assert "n=1 < 2" in one["note"]
    zero = gap_tests([80.0, 81.0, 82.0], [80.0, 81.0, 82.0])
    assert zero["mean_gap"] == 0 and zero["same_sign"] == 0 and math.isnan(zero["t_p"]) and math.isnan(zero["w_p"])
    assert "all gaps zero" in zero["note"]
    equal = gap_tests([81.0, 82.0, 83.0], [80.0, 81.0, 82.0])  # +1 each: s = 0, t undefined
    assert math.isnan(equal["t_p"]) and "all gaps equal" in equal["note"]
    # Wilcoxon on +1, +1, +1: W− = 0; exactly, P(W+ = 6) = 1/8, two-sided p = 2/8.
    assert equal["w_stat"] == 0 and equal["w_p"] == pytest.approx(0.25)


def test_t_interval_by_hand():
    # 1, 2, 3, 4: mean 2.5, s = √(5/3) = 1.2910; t(0.975, 3) = 3.182446; half = 3.182446 · 1.2910 / 2 = 2.0543
    mean, std, low, high = t_interval([1, 2, 3, 4])
    assert (mean, std) == pytest.approx((2.5, 1.2910), abs=1e-4)
    assert (low, high) == pytest.approx((2.5 - 2.0543, 2.5 + 2.0543), abs=1e-4)
    assert math.isnan(t_interval([5.0])[1])


def test_rho_trend_by_hand(tmp_path):
    """The gap's line against ρ. Study h: MoE r=1 (ρ 0.1) and r=3 (ρ 0.3) against twins at 80%, seeds 0-1;
    gaps −5, −3 at ρ 0.1 and −1, +1 at ρ 0.3. Study w moves ρ by 0.01 only: no line."""
    for key, rho, tops in (("r=1", 0.1, (75, 77)), ("r=3", 0.3, (79, 81))):
        for seed, top1 in enumerate(tops):
            fake_run(tmp_path / "h", "h", key, seed, top1, reference=f"{key},twin=flops", axes={"r": key}, rho=rho)
            fake_run(tmp_path / "h", "h", f"{key},twin=flops", seed, 80, twin=True, axes={"r": key})
    for key, rho in (("w=8", 0.20), ("w=16", 0.21)):
        for seed in (0, 1):
            fake_run(tmp_path / "w", "w", key, seed, 70 + seed, reference=f"{key},twin=flops", axes={"w": key}, rho=rho)
            fake_run(tmp_path / "w", "w", f"{key},twin=flops", seed, 75, twin=True, axes={"w": key})
    table = load_runs([tmp_path / "h", tmp_path / "w"])
    per_seed, pairs = paired_gaps(table)
    trend = rho_trend(per_seed, pairs_with_model(pairs, table))
    assert trend["study"].tolist() == ["h"]  # w's ρ spread (0.01) is below MIN_RHO_SPREAD
    t = trend.iloc[0]
    # Means −4 at ρ 0.1 and 0 at ρ 0.3: slope 20 points per unit ρ, intercept −6, the line 0 at ρ 0.3.
    # Residuals ∓1: SSE 4, 2 degrees of freedom, s² = 2; Sxx = 4 · 0.1² = 0.04; se = √(2 / 0.04) = 7.0711;
    # CI 20 ± t(0.975, 2) · se = 20 ± 4.302653 · 7.0711 = 20 ± 30.425; t = 2.8284, p = 1 − t/√(2 + t²) = 0.10557.
    assert (t["model"], t["pairs"], t["n"]) == ("m", 2, 4)
    assert (t["rho_min"], t["rho_max"]) == pytest.approx((0.1, 0.3))
    assert t["slope"] == pytest.approx(20.0) and t["intercept"] == pytest.approx(-6.0)
    assert (t["slope_low"], t["slope_high"]) == pytest.approx((20 - 30.425, 20 + 30.425), abs=1e-3)
    assert t["p"] == pytest.approx(0.10557, abs=1e-5)
    assert t["gap_at_max"] == pytest.approx(0.0, abs=1e-9)
    assert t["zero_at"] == pytest.approx(0.3) and t["zero_in_range"]
    # in the report's first section, per 0.1 ρ
    write_report([tmp_path / "h", tmp_path / "w"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| m | h | 2 (4) | 0.10–0.30 | +2.00 [-1.04, +5.04] | 0.106 | +0.00 | 0.30 (inside the ρ reached) |" in text
    assert (tmp_path / "report" / "trend.csv").is_file()


def test_rho_trend_of_a_falling_line_never_reaches_zero(tmp_path):
    for key, rho, top1 in (("r=1", 0.1, 78), ("r=2", 0.2, 76), ("r=3", 0.3, 75)):
        fake_run(tmp_path, "h", key, 0, top1, reference=f"{key},twin=flops", axes={"r": key}, rho=rho)
        fake_run(tmp_path, "h", f"{key},twin=flops", 0, 80, twin=True, axes={"r": key})
    table = load_runs([tmp_path])
    per_seed, pairs = paired_gaps(table)
    t = rho_trend(per_seed, pairs_with_model(pairs, table)).iloc[0]
    assert t["slope"] < 0 and math.isnan(t["zero_at"]) and not t["zero_in_range"]
    assert rho_trend(per_seed.iloc[0:0], pairs).empty
