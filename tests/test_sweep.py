"""`sparsec sweep`: a 2 x 1 x 1 grid on the tiny BERT, one backend, run as Ray tasks on a local Ray
instance (started once, by the module's only Ray run); then the resume (a second run executes 0
cells and starts no Ray), the bad-argument errors (exit 2 before Ray starts) and a failed cell."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

FAST = ("--calib-samples", "4", "--calib-seqlen", "32", "--seqlen", "32", "--runs", "5")
GRID = ("--sparsity", "0.5,0.7", "--method", "wanda", "--allocation", "uniform", "--backend", "onnxruntime")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir):
    """Run the grid once (Ray tasks); returns (model dir, sweep dir, CLI output)."""
    from click.testing import CliRunner

    from compiler.cli import main

    model = tiny_model_dir("bert")
    out = tmp_path_factory.mktemp("sweep") / "grid"
    res = CliRunner().invoke(main, ["sweep", str(model), "-o", str(out), *GRID, *FAST, "--max-accuracy-drop", "0.5"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return model, out, res.output


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_grid_runs_as_ray_tasks_and_writes_table_and_plot(sweep):
    _, out, output = sweep
    assert "0 finished before, 2 to run" in output and "ran 2 cells, 0 finished before" in output
    rows = read_rows(out)
    assert [r["key"] for r in rows] == ["wanda-uniform-s50", "wanda-uniform-s70"]
    for row, target in zip(rows, (0.5, 0.7)):
        assert row["status"] == "ok" and row["backend"] == "onnxruntime" and row["quality_metric"] == "embedding_cosine"
        assert abs(float(row["measured_sparsity"]) - target) < 0.02
        speed, low, high = (float(row[k]) for k in ("speedup", "speedup_low", "speedup_high"))
        assert 0 < low <= speed <= high
        assert float(row["dense_p50_ms"]) > 0 and float(row["compiled_p50_ms"]) > 0
        # the table carries the artifact's own figures: held-out quality and the verified speedup
        report = json.loads((out / row["artifact"] / "report.json").read_text())
        assert float(row["quality"]) == pytest.approx(report["evaluation"]["compiled"])
        assert float(row["quality_drop"]) == pytest.approx(1 - report["evaluation"]["compiled"], abs=1e-5)
        assert speed == pytest.approx(report["backends"]["onnxruntime"]["speedup_vs_dense"])
        result = json.loads((out / "cells" / row["key"] / "result.json").read_text())
        assert result["status"] == "ok" and result["cell"]["sparsity"] == target
    assert any(r["pareto"] == "True" for r in rows)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "wanda-uniform-s50" in md and "speedup [95% CI] verdict" in md
    best = min(rows, key=lambda r: -float(r["speedup"]))
    assert f"best within --max-accuracy-drop 0.5: {best['key']} on onnxruntime" in output


def test_rerun_executes_no_cell_and_starts_no_ray(sweep, cli):
    import ray

    model, out, _ = sweep
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/result.json")}
    res = cli("sweep", model, "-o", out, *GRID, *FAST)
    assert res.exit_code == 0, res.output
    assert "2 finished before, 0 to run" in res.output and "ran 0 cells, 2 finished before" in res.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) == 2
    assert not ray.is_initialized()
    assert len(read_rows(out)) == 2


def test_cells_computed_with_other_settings_are_not_reused(sweep):
    from compiler.sweep.grid import SweepSettings, build_grid
    from compiler.sweep.store import finished

    model, out, _ = sweep
    same = SweepSettings(model=str(model), calib_samples=4, calib_seqlen=32, seqlen=32, runs=5)
    assert set(finished(out, build_grid(same, "0.5,0.7", "wanda", "uniform"))) == {"wanda-uniform-s50", "wanda-uniform-s70"}
    other = SweepSettings(model=str(model), calib_samples=4, calib_seqlen=32, seqlen=32, runs=6)
    assert finished(out, build_grid(other, "0.5,0.7", "wanda", "uniform")) == {}
    assert set(finished(out, build_grid(same, "0.5,0.6", "wanda", "uniform"))) == {"wanda-uniform-s50"}


@pytest.mark.parametrize("args, message", [
    (("--sparsity", "1.5"), "--sparsity: 1.5 is outside (0, 1)"),
    (("--sparsity", "0.5,abc"), "--sparsity: 'abc' is not a number"),
    (("--sparsity", ","), "--sparsity: give at least one value"),
    (("--method", "wanda,foo"), "--method foo:"),
    (("--allocation", "bar"), "--allocation bar:"),
    (("--backend", "nope"), "--backend: unknown backend 'nope'"),
    (("--cpus-per-task", "0"), "--cpus-per-task must be > 0"),
    (("--max-accuracy-drop", "-1"), "--max-accuracy-drop must be > 0"),
    (("--runs", "0"), "--runs must be > 0"),
])
def test_bad_arguments_are_one_line_exit_2_before_ray(cli, tmp_path, tiny_model_dir, args, message):
    import ray

    out = tmp_path / "never"
    res = cli("sweep", tiny_model_dir("bert"), "-o", out, *args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not out.exists() and not ray.is_initialized()


def test_failed_cell_writes_error_record_and_is_retried(tmp_path):
    from compiler.sweep.grid import SweepGrid, SweepSettings
    from compiler.sweep.store import failed, finished
    from compiler.sweep.tasks import run_cell

    settings = SweepSettings(model=str(tmp_path / "no-such-model"), calib_samples=4, calib_seqlen=32, seqlen=32, runs=5)
    result = run_cell({"sparsity": 0.5, "method": "wanda", "allocation": "uniform"}, settings.to_dict(), str(tmp_path))
    assert result["status"] == "failed" and "no-such-model" in result["error"] and "\n" not in result["error"]
    grid = SweepGrid(settings, (0.5,), ("wanda",), ("uniform",))
    assert finished(tmp_path, grid) == {} and set(failed(tmp_path, grid)) == {"wanda-uniform-s50"}
    assert (tmp_path / "cells" / "wanda-uniform-s50" / "error.json").is_file()
