"""`stepdistill bench`: suite validation, and a tiny two-objective sweep end to end (training runs in subprocesses)."""
import json

import pytest

from stepdistill.bench import load_suite, run_bench
from stepdistill.errors import InputError
from stepdistill.recipe import RecipeError


def _suite(tmp_path, **fields):
    import yaml

    data = {"name": "tiny", "recipes": ["configs/toy/gmm_vsd.yaml", "configs/toy/gmm_sid.yaml"], "iterations": 30,
            "seeds": [0], "student_nfe": [1, 2], "teacher_nfe": [1, 2], "curve_every": 10, "curve_n": 256,
            "eval_n": 512, **fields}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def test_suite_errors_name_the_problem(tmp_path):
    with pytest.raises(RecipeError, match="exactly one budget"):
        load_suite(_suite(tmp_path, minutes=1.0))
    with pytest.raises(RecipeError, match="exactly one budget"):
        load_suite(_suite(tmp_path, iterations=None))
    with pytest.raises(RecipeError, match="not found: configs/toy/nope.yaml"):
        load_suite(_suite(tmp_path, recipes=["configs/toy/nope.yaml"]))
    with pytest.raises(RecipeError, match="unknown key suite.budget"):
        load_suite(_suite(tmp_path, budget=3))


def test_tiny_bench_end_to_end(tmp_path):
    out, report = tmp_path / "runs", tmp_path / "docs" / "bench.md"
    (tmp_path / "docs" / "bench_assets").mkdir(parents=True)
    (tmp_path / "docs" / "bench_assets" / "notes.txt").write_text("mine")  # a user's file beside the plots
    run_bench(str(_suite(tmp_path)), out, report, quiet=True)
    assert (tmp_path / "docs" / "bench_assets" / "notes.txt").read_text() == "mine"
    text = report.read_text()
    for recipe in ("gmm_vsd", "gmm_sid"):
        assert f"| `{recipe}` |" in text
        run = out / recipe / "seed0"
        curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
        assert [p["step"] for p in curve] == [0, 10, 20, 30] and all(p["energy_distance"] > 0 for p in curve)
        assert all(a["time"] <= b["time"] for a, b in zip(curve, curve[1:]))
        assert set(json.loads((run / "nfe_scores.json").read_text())) == {"1", "2"}
        assert (report.parent / "bench_assets" / f"{recipe}.png").exists()
    assert (report.parent / "bench_assets" / "curves.png").exists()
    assert "| 2 | 2 |" in text and "Registered but not in it:" in text and "Machine:" in text
    # gmm: mode coverage at the trained K beside the energy distances, and the fitted-Gaussian baseline
    head = next(line for line in text.splitlines() if line.startswith("| recipe |"))
    assert head.endswith("| near share | worst mass error | x teacher |")
    row = next(line for line in text.splitlines() if line.startswith("| `gmm_vsd` |")).split(" | ")
    assert row[-3].endswith("%") and row[-2].endswith("%") and 0 <= float(row[-3][:-1]) <= 100
    assert "one Gaussian with the mixture's exact mean and covariance" in text
    assert json.loads((out / "baseline.json").read_text())["near_share"] < 0.2  # a blur between the four modes
    rows = json.loads((out / "bench.json").read_text())
    assert [r["iterations"] for r in rows] == [30, 30]
    # a rerun trains nothing and rewrites the same table
    stamp = (out / "gmm_vsd" / "seed0" / "metrics.json").stat().st_mtime_ns
    run_bench(str(_suite(tmp_path)), out, report, quiet=True)
    assert (out / "gmm_vsd" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp
    assert report.read_text().split("Machine:")[1].split("## ")[0] == text.split("Machine:")[1].split("## ")[0]


def test_jobs_train_runs_side_by_side_and_a_failure_keeps_the_finished_runs(tmp_path):
    from stepdistill.bench import job_threads

    out, report = tmp_path / "runs", tmp_path / "bench.md"
    run_bench(str(_suite(tmp_path, iterations=6, curve_every=3)), out, report, quiet=True, jobs=2)
    text = report.read_text()
    assert f"2 runs at a time, {job_threads(2)} thread(s) each" in text and "--jobs 2" in text
    for recipe in ("gmm_vsd", "gmm_sid"):
        assert (out / recipe / "seed0" / "metrics.json").exists() and (out / recipe / "seed0.log").exists()
    run_bench(str(_suite(tmp_path, iterations=6, curve_every=3)), out, report, quiet=True)  # only scores
    assert f"2 runs at a time, {job_threads(2)} thread(s) each" in report.read_text()  # how they were trained
    (out / "gmm_sid" / "seed0.jobs.json").unlink()
    run_bench(str(_suite(tmp_path, iterations=6, curve_every=3)), out, report, quiet=True)
    assert "unrecorded --jobs" in report.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {name: gmm}\nobjective: {name: vsd, nope: 1}\n")
    with pytest.raises(RecipeError, match="nope"):  # the bad recipe is found while the good one trains
        run_bench(str(_suite(tmp_path, recipes=["configs/toy/gmm_vsd.yaml", str(bad)], iterations=6,
                             curve_every=3)), tmp_path / "runs2", quiet=True, jobs=2)
    assert (tmp_path / "runs2" / "gmm_vsd" / "seed0" / "metrics.json").exists()  # finished, not killed
    with pytest.raises(InputError, match="--jobs 0"):
        run_bench(str(_suite(tmp_path)), out, quiet=True, jobs=0)
