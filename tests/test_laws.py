"""The laws' fits on synthetic data with known constants, their errors, and `hyperflux law` on fabricated runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hyperflux import laws
from hyperflux.cli import EXIT_INPUT, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRESSURES = 2.0 ** np.arange(-6, 5)  # the sweep, 2^-6 .. 2^4


def law_density(pressures: np.ndarray, c: float, a0: float, a1: float) -> np.ndarray:
    log_p = np.log(pressures)
    return c * np.exp(-a0 * log_p - a1 * log_p**2)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ----------------------------------------------------------------- pressure law
def test_pressure_law_recovers_exact_constants():
    fit = laws.fit_pressure_law(PRESSURES, law_density(PRESSURES, 0.03, 0.6, 0.02))
    assert (fit.c, fit.a0, fit.a1) == pytest.approx((0.03, 0.6, 0.02), rel=1e-9)
    assert fit.r2 == pytest.approx(1.0) and fit.n == len(PRESSURES)
    assert (fit.p_min, fit.p_max) == (2.0**-6, 2.0**4)


def test_pressure_law_recovers_constants_under_noise():
    rng = np.random.default_rng(0)
    densities = law_density(PRESSURES, 0.05, 0.5, 0.03) * np.exp(rng.normal(0, 0.02, len(PRESSURES)))
    fit = laws.fit_pressure_law(PRESSURES, densities)
    assert fit.c == pytest.approx(0.05, rel=0.05)
    assert fit.a0 == pytest.approx(0.5, abs=0.02)
    assert fit.a1 == pytest.approx(0.03, abs=0.005)
    assert 0.99 < fit.r2 < 1.0


def test_pure_power_law_fixes_a1_at_zero():
    fit = laws.fit_pressure_law(PRESSURES, law_density(PRESSURES, 0.04, 0.7, 0.0), quadratic=False)
    assert (fit.c, fit.a0, fit.a1) == pytest.approx((0.04, 0.7, 0.0), rel=1e-9)
    assert laws.predict_pressure(fit, 0.04) == pytest.approx(1.0)


def test_reference_fit_of_the_authors_resnet50_cifar10_points():
    pressures, densities = zip(*laws.AUTHORS_RESNET50_CIFAR10, strict=True)
    fit = laws.fit_pressure_law(pressures, densities)
    assert fit.c == pytest.approx(0.031286, rel=1e-4)  # 3.13 with densities in %
    assert fit.a0 == pytest.approx(0.61005, abs=1e-4)
    assert fit.a1 == pytest.approx(0.019497, abs=1e-5)
    assert fit.r2 == pytest.approx(0.99819, abs=1e-4)  # method.md: about 0.998, a0 0.6, a1 0.02
    power = laws.fit_pressure_law(pressures, densities, quadratic=False)
    assert power.a0 == pytest.approx(0.5473, abs=1e-3) and power.r2 == pytest.approx(0.9877, abs=1e-3)


@pytest.mark.parametrize("density", [0.8, 0.2, 0.05, 0.01, 0.004])
def test_prediction_inverts_the_fit(density):
    pressures, densities = zip(*laws.AUTHORS_RESNET50_CIFAR10, strict=True)
    fit = laws.fit_pressure_law(pressures, densities)
    pressure = laws.predict_pressure(fit, density)
    assert fit.p_min <= pressure <= fit.p_max
    assert fit.density(pressure) == pytest.approx(density, rel=1e-9)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_prediction_inverts_an_exact_power_law_whose_quadratic_term_fits_as_rounding(density):
    """S = 0.1 P^-0.5 exactly: a1 comes out near 1e-16, where the textbook root formula cancels."""
    pressures = [0.01, 0.1, 1.0, 10.0]
    fit = laws.fit_pressure_law(pressures, [0.1 * p**-0.5 for p in pressures])
    assert abs(fit.a1) < 1e-12
    assert laws.predict_pressure(fit, density) == pytest.approx((density / 0.1) ** -2, rel=1e-9)


def test_prediction_outside_the_fitted_range_is_refused():
    fit = laws.fit_pressure_law(PRESSURES, law_density(PRESSURES, 0.03, 0.6, 0.02))
    for density in (0.99, 1e-6):
        with pytest.raises(ValueError, match="fitted range"):
            laws.predict_pressure(fit, density)
    with pytest.raises(ValueError, match="positive"):
        laws.predict_pressure(fit, 0.0)


def test_pressure_law_input_errors():
    with pytest.raises(ValueError, match="at least 3 points"):
        laws.fit_pressure_law([0.5, 1.0], [0.2, 0.1], quadratic=False)
    # three parameters: three points fit exactly, R^2 1 whatever they are
    with pytest.raises(ValueError, match="at least 4 points"):
        laws.fit_pressure_law([0.5, 1.0, 2.0], [0.2, 0.3, 0.1])
    assert laws.fit_pressure_law([0.5, 1.0, 2.0], [0.2, 0.3, 0.1], quadratic=False).n == 3
    with pytest.raises(ValueError, match="pressures must be positive"):
        laws.fit_pressure_law([0.0, 1.0, 2.0, 4.0], [0.3, 0.2, 0.1, 0.05])
    with pytest.raises(ValueError, match="densities must be positive"):
        laws.fit_pressure_law([0.5, 1.0, 2.0, 4.0], [0.3, -0.2, 0.1, 0.05])
    with pytest.raises(ValueError, match="as many"):
        laws.fit_pressure_law([0.5, 1.0, 2.0], [0.3, 0.2])
    with pytest.raises(ValueError, match="distinct"):
        laws.fit_pressure_law([1.0, 1.0, 2.0, 2.0], [0.3, 0.2, 0.1, 0.1])


def rows(densities, phase="pruning", **extra) -> list[dict]:
    return [{"epoch": e, "phase": phase, "density": d, **extra} for e, d in enumerate(densities, 1)]


def test_converged_density_judges_the_last_pruning_epochs():
    settled = rows([1.0, 0.5, 0.2, 0.101, 0.1005, 0.1, 0.1, 0.1])
    assert laws.converged_density(settled, window=5, tol=0.02) == 0.1
    assert laws.converged_density(settled, window=6, tol=0.02) is None  # 0.2 is in the window
    assert laws.converged_density(rows([1.0, 0.5, 0.3, 0.2, 0.15, 0.12]), window=3) is None
    assert laws.converged_density(rows([1.0, 0.5]), window=5) is None  # too short to tell
    # regrowth releases the pressure: those epochs do not count
    released = settled + rows([0.12, 0.15], phase="regrowth")
    assert laws.converged_density(released) == 0.1
    with pytest.raises(ValueError, match="window"):
        laws.converged_density(settled, window=1)


# ----------------------------------------------------------------- Neural Pruning Law
def test_power_law_recovers_the_exponent_inside_the_window_only():
    importance = np.geomspace(1e-3, 1e3, 60)
    density = np.minimum(0.02 * importance**-0.55, 1.0)
    density[density > 0.5] = 0.9  # outside the window: would spoil the fit if used
    density[density <= 0.005] = 1e-4
    fit = laws.fit_power_law(density, importance)
    inside = int(np.sum((density > 0.005) & (density <= 0.5)))
    assert fit.n == inside and inside >= 10
    assert fit.exponent == pytest.approx(0.55, rel=1e-9) and fit.c == pytest.approx(0.02, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    narrow = laws.fit_power_law(density, importance, lo=0.05, hi=0.2)
    assert narrow.n < inside and narrow.exponent == pytest.approx(0.55)


def test_power_law_under_noise_and_errors():
    rng = np.random.default_rng(1)
    importance = np.geomspace(1e-2, 1e2, 40)
    density = 0.03 * importance**-1.45 * np.exp(rng.normal(0, 0.05, 40))
    fit = laws.fit_power_law(density, importance)
    assert fit.exponent == pytest.approx(1.45, abs=0.05) and fit.r2 > 0.98
    with pytest.raises(ValueError, match="at least 3 points"):
        laws.fit_power_law([0.9, 0.8, 0.1, 0.2], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="importances must be positive"):
        laws.fit_power_law([0.3, 0.2, 0.1], [1.0, 0.0, 3.0])


def test_nplh_series_takes_positive_values_of_the_pruning_epochs():
    metrics = [
        {"phase": "pruning", "density": 0.9, "pressure": 0.0, "flux_min": -1.0, "flux_p01": 0.1},
        {"phase": "pruning", "density": 0.4, "pressure": 0.5, "flux_min": 0.2, "flux_p01": None},
        {"phase": "regrowth", "density": 0.45, "pressure": 0.0, "flux_min": 0.1, "flux_p01": 0.1},
    ]
    series = laws.nplh_series(metrics)
    assert series["pressure"] == ([0.4], [0.5], 1, None)
    assert series["flux_min"] == ([0.4], [0.2], 1, None)
    assert series["flux_p01"] == ([0.9], [0.1], 0, None)
    assert "importance_min" not in series


def test_nplh_series_of_a_baseline_run_is_its_pruning_thresholds():
    metrics = [
        {"phase": "prune", "density": 0.8, "importance_min": 0.01},
        {"phase": "prune", "density": 0.6, "importance_min": None},  # an epoch without a pruning step
        {"phase": "prune", "density": 0.5, "importance_min": 0.03},
        {"phase": "train", "density": 0.5, "importance_min": 0.0},
    ]
    assert laws.nplh_series(metrics) == {"importance_min": ([0.8, 0.5], [0.01, 0.03], 1, None)}


def test_the_pressure_of_a_target_driven_run_is_no_threshold():
    """The controller raises and releases the pressure as it chases a target: fitted, it gave exponents of
    either sign with R^2 near 0, printed like a law."""
    metrics = [
        {"phase": "pruning", "density": d, "pressure": p, "flux_min": 0.1}
        for d, p in ((0.5, 0.2), (0.2, 1.0), (0.1, 0.0), (0.05, 0.6))
    ]
    series = laws.nplh_series(metrics)
    assert series["pressure"].not_a_law is not None and "fell during pruning" in series["pressure"].not_a_law
    assert series["flux_min"].not_a_law is None


# ----------------------------------------------------------------- the command line
def fabricate_run(
    folder: Path, pressure: float | None, densities: list[float], finished: bool = True, lr: float = 0.01
) -> Path:
    """A run as the trainer leaves it, as far as the laws read it: recipe.yaml, metrics.jsonl and, once it
    finished, summary.json."""
    folder.mkdir(parents=True)
    if finished:
        (folder / "summary.json").write_text("{}")
    p = "null" if pressure is None else repr(pressure)
    (folder / "recipe.yaml").write_text(
        f"name: fake\nhyperflux: {{pressure: {p}, exact_target: false}}\noptimizer: {{lr: {lr}}}\n"
    )
    lines = []
    for epoch, density in enumerate(densities, 1):
        row = {"epoch": epoch, "phase": "pruning", "density": density, "pressure": pressure or 0.0}
        row |= {"flux_min": (pressure or 1.0) * 0.8, "flux_p01": (pressure or 1.0) * 1.2}
        lines.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def sweep(tmp_path: Path, pressures: list[float]) -> list[str]:
    runs = []
    for p in pressures:
        final = float(law_density(np.array([p]), 0.03, 0.6, 0.02)[0])
        runs.append(str(fabricate_run(tmp_path / f"p{p:g}", p, [1.0, 3 * final, *[final] * 6])))
    return runs


def test_law_pressure_prints_the_fit_predicts_and_writes_the_plot(tmp_path, capsys):
    runs = sweep(tmp_path, [0.125, 1.0, 8.0, 64.0])
    unconverged = str(fabricate_run(tmp_path / "short", 4.0, [1.0, 0.5, 0.2]))
    out = tmp_path / "plots"
    assert main(["law", "pressure", *runs, unconverged, "--predict", "0.03", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not converged" in printed and "short" in printed
    assert "these runs" in printed and "a0 0.6000  a1 0.0200  R^2 1.0000  (4 points)" in printed
    assert "a0 0.6101  a1 0.0195  R^2 0.9982  (9 points)" in printed  # the authors' reference
    assert "constant pressure for density 3%: P 1" in printed
    data = (out / "pressure_law.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_law_nplh_prints_exponents_and_writes_the_plot(tmp_path, capsys):
    importance = np.geomspace(0.01, 100, 12)
    run = fabricate_run(tmp_path / "run", None, [])
    lines = [
        json.dumps({"phase": "pruning", "density": d, "pressure": i, "flux_min": i, "flux_p01": -i})
        for i, d in zip(importance, 0.02 * importance**-0.5, strict=True)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["law", "nplh", str(run), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "pressure: k 0.5000  R^2 1.0000" in printed and "flux_min: k 0.5000" in printed
    assert "flux_p01: not fitted" in printed and "12 non-positive left out" in printed
    assert (tmp_path / "nplh.png").read_bytes().startswith(PNG_MAGIC)
    # a folder that is no run fails before anything is printed: the error is the one line
    assert main(["law", "nplh", str(run), str(tmp_path / "nowhere"), "--out", str(tmp_path)]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and "not a run folder" in captured.err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("too few", "2 converged runs; the fit needs at least 4"),
        ("not constant", "not a run under a positive constant pressure"),
        ("density zero", "2 converged runs; the fit needs at least 4"),  # the zero run left out
        ("missing", "not a run folder"),
    ],
)
def test_law_pressure_errors_are_one_line(tmp_path, capsys, case, message):
    runs = sweep(tmp_path, [0.5, 2.0])
    if case == "not constant":
        runs.append(str(fabricate_run(tmp_path / "trajectory", None, [1.0, 0.5, 0.5, 0.5, 0.5, 0.5])))
    elif case == "density zero":
        runs.append(str(fabricate_run(tmp_path / "empty", 64.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])))
    elif case == "missing":
        runs.append(str(tmp_path / "nowhere"))
    assert main(["law", "pressure", *runs, "--out", str(tmp_path)]) == EXIT_INPUT
    assert message in one_line_error(capsys)
    assert not (tmp_path / "pressure_law.png").exists()


def test_law_pressure_leaves_out_a_run_at_density_0_and_counts_a_folder_given_twice_once(tmp_path, capsys):
    runs = sweep(tmp_path, [0.125, 1.0, 8.0, 64.0])
    empty = str(fabricate_run(tmp_path / "empty", 64.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert main(["law", "pressure", *runs, runs[0], empty, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{empty}: P 64, density 0, left out" in out
    assert out.count(f"{runs[0]}: P 0.125") == 1 and "(4 points)" in out


def test_law_pressure_leaves_out_unfinished_runs_warns_of_other_recipes_and_plots_before_predicting(
    tmp_path, capsys
):
    runs = sweep(tmp_path, [0.125, 1.0, 8.0, 64.0])
    stopped = str(fabricate_run(tmp_path / "stopped", 2.0, [1.0, 0.1, 0.1, 0.1, 0.1, 0.1], finished=False))
    other = str(fabricate_run(tmp_path / "other", 0.5, [1.0, 0.05, *[0.04] * 5], lr=0.1))
    out = tmp_path / "plots"
    # 50%: above every fitted density, a prediction refused after the fit is printed and plotted
    assert (
        main(["law", "pressure", *runs, stopped, other, "--predict", "0.5", "--out", str(out)]) == EXIT_INPUT
    )
    captured = capsys.readouterr()
    assert f"{stopped}: P 2, unfinished (epoch 6, no summary.json), left out" in captured.out
    assert f"warning: {other} differs from {runs[0]} in more than its pressure: optimizer.lr" in captured.out
    assert "(5 points)" in captured.out and (out / "pressure_law.png").exists()


def test_law_nplh_says_why_a_series_or_a_run_is_not_fitted_and_reads_a_folder_once(tmp_path, capsys):
    importance = np.geomspace(0.01, 100, 12)
    run = fabricate_run(tmp_path / "run", None, [])
    pressures = importance.copy()
    pressures[5] = 0.001  # released once, as a controller does
    lines = [
        json.dumps({"phase": "pruning", "density": d, "pressure": p, "flux_min": i, "flux_p01": i})
        for i, p, d in zip(importance, pressures, 0.02 * importance**-0.5, strict=True)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "recipe.yaml").write_text("name: dense\n")
    (dense / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "phase": "dense", "density": 1.0}) + "\n")
    assert main(["law", "nplh", str(run), str(dense), str(run), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "pressure: not fitted, the pressure fell during pruning" in printed
    assert printed.count("flux_min: k 0.5000") == 1
    assert f"{dense}: no importance series" in printed


def test_law_nplh_error_when_nothing_can_be_fitted(tmp_path, capsys):
    run = fabricate_run(tmp_path / "run", 1.0, [0.9, 0.3])  # two points: too few
    assert main(["law", "nplh", str(run), "--out", str(tmp_path)]) == EXIT_INPUT
    assert "no series of these runs could be fitted" in one_line_error(capsys)
    assert main(["law", "nplh", str(run), "--lo", "0.5", "--hi", "0.1"]) == EXIT_INPUT
    assert "--lo" in one_line_error(capsys)


# ----------------------------------------------------------------- the sweep
SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke-digits.yaml"


def test_sweep_recipe_is_the_paper_form_under_a_constant_pressure():
    recipe = laws.sweep_recipe(SMOKE, 0.25, 7, ["optimizer.lr=0.002"])
    hf = recipe["hyperflux"]
    assert (hf["pressure"], hf["target_sparsity"], hf["pressure_schedule"]) == (0.25, None, None)
    assert (hf["pruning_epochs"], hf["regrowth_epochs"], hf["exact_target"]) == (7, 0, False)
    assert recipe["method"] == "hyperflux-paper" and recipe["optimizer"]["lr"] == 0.002
    assert recipe["name"] == "smoke-digits-P0.25"
    assert laws.sweep_recipe(SMOKE, np.float64(0.25), 7)["hyperflux"]["pressure"] == 0.25  # numpy's repr
    with pytest.raises(ValueError, match="must be positive"):
        laws.sweep_recipe(SMOKE, 0.0, 7)


def test_law_pressure_sweep_runs_skips_finished_runs_and_fits(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "plots"
    argv = ["law", "pressure", "--sweep", str(SMOKE), "--pressures", "0.25", "1", "4", "16", "--epochs", "3"]
    argv += ["--window", "2", "--tol", "10", "--runs", str(runs), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("epochs into") == 4 and "(4 points)" in printed
    densities = []
    for p in ("0.25", "1", "4", "16"):
        rows = [json.loads(line) for line in (runs / f"P{p}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["pressure"] for r in rows] == [float(p)] * 3
        densities.append(rows[-1]["density"])
    assert densities[0] > densities[1] > densities[2] > densities[3]  # more pressure, fewer weights
    assert main(argv) == 0  # a second call trains nothing and fits the same runs
    again = capsys.readouterr().out
    assert "epochs into" not in again and "(4 points)" in again
    assert (out / "pressure_law.png").read_bytes().startswith(PNG_MAGIC)
    changed = [*argv[:10], "4", *argv[11:]]  # --epochs 4: the finished runs belong to another recipe
    assert main(changed) == EXIT_INPUT
    assert "holds a finished run of another recipe" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pressures", "1", "2", "3"], "give --sweep RECIPE too"),
        ([], "give run folders"),
        (["--sweep", str(SMOKE), "--pressures", "1", "2", "3"], "at least 4 pressures"),
        (["--sweep", str(SMOKE), "--epochs", "3"], "must be at least --window"),
        # a percentage given for a fraction, refused before any run of the sweep
        (
            ["--sweep", str(SMOKE), "--predict", "2"],
            "--predict takes a density as a fraction (0.02 for 2%), got 2",
        ),
    ],
)
def test_law_pressure_sweep_errors(tmp_path, capsys, argv, message):
    assert main(["law", "pressure", *argv, "--runs", str(tmp_path / "runs")]) == EXIT_INPUT
    assert message in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()
