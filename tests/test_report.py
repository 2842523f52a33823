import statistics
from pathlib import Path

import pytest
import torch

from fewshot import report, tracking
from fewshot.errors import UserError


def _fake_run(tags: dict, top1: float, seconds: float, diagonal: int) -> str:
    with tracking.start_run(run_name="known", tags=tags) as run:
        run.log_metrics({"test_top1": top1, "test_top2": min(1.0, top1 + 0.02), "test_top5": 1.0,
                         "wall_seconds": seconds})  # fmt: skip
        matrix = torch.zeros(10, 10, dtype=torch.long)
        matrix.fill_diagonal_(diagonal)
        matrix[0, 1] = 5
        run.log_evaluation("test", {1: top1}, matrix, "known")
    return run.run_id


def test_table_rows_come_from_logged_runs(tracking_store: str, tmp_path: Path) -> None:
    cnn = [0.95, 0.97, 0.93]
    ids = [_fake_run({"job": "baseline", "model": "cnn", "seed": s}, a, 60, 90) for s, a in enumerate(cnn)]
    ids.append(_fake_run({"job": "linear_eval", "probe": "linear", "seed": 0}, 0.96, 5, 95))
    ids.append(_fake_run({"job": "something_else"}, 0.5, 1, 50))  # not a method: ignored
    built = report.build_report(ids, "test report")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in built.markdown.splitlines() if line.startswith("| ")}
    cnn_row = rows["CNN (report's)"].split(" | ")
    assert cnn_row[1] == f"{100 * statistics.mean(cnn):.2f} ± {100 * statistics.stdev(cnn):.2f}"
    assert cnn_row[2] == "93.00" and cnn_row[3] == "" and cnn_row[6] == "3" and cnn_row[7] == "60 s"
    assert rows["MoCo + linear"].split(" | ")[1] == "96.00 ± 0.00"
    assert "Report: MoCo + linear" in rows and "Published: Bad GAN" in rows
    assert "MLP1" not in rows  # no MLP1 run was logged, so no invented row
    assert built.rows["CNN (report's)"].confusion[0, 0] == 270 and built.rows["CNN (report's)"].confusion[0, 1] == 15
    paths = report.write_report(built, tmp_path)
    assert paths[0].read_text() == built.markdown
    assert "CNN (report's),0.950000" in paths[1].read_text()


def test_failed_runs_are_left_out(tracking_store: str) -> None:
    good = _fake_run({"job": "baseline", "model": "mlp1", "seed": 0}, 0.7, 10, 70)
    with pytest.raises(RuntimeError), tracking.start_run(tags={"job": "baseline", "model": "mlp1"}) as run:
        run.log_metrics({"test_top1": 0.1})
        bad = run.run_id
        raise RuntimeError("boom")
    built = report.build_report([good, bad], "t")
    assert built.rows["MLP1"].top1 == [0.7]


def test_empty_store_is_a_clear_error(tracking_store: str) -> None:
    with pytest.raises(UserError, match="no finished runs"):
        report.build_report([], "t")


def test_top1_column_is_single_view_and_tta_stands_beside(tracking_store: str) -> None:
    plain = _fake_run({"job": "linear_eval", "probe": "linear", "seed": 0}, 0.96, 5, 95)
    with tracking.start_run(run_name="tta", tags={"job": "semisup", "init": "moco", "seed": "0"}) as run:
        run.log_metrics({"test_top1": 0.99, "test_top2": 1.0, "test_top5": 1.0, "test_plain_top1": 0.98,
                         "test_plain_top2": 0.995, "test_plain_top5": 0.999, "wall_seconds": 9})  # fmt: skip
        with_tta = run.run_id
    built = report.build_report([plain, with_tta], "t")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in built.markdown.splitlines()}
    assert rows["MoCo + semi-supervised"][1:5] == ["98.00 ± 0.00", "98.00", "99.00", "99.50"]
    assert rows["MoCo + linear"][1:4] == ["96.00 ± 0.00", "96.00", ""]  # no TTA: no figure in that column
    assert "MoCo + semi-supervised,0.980000,0.000000,0.980000,0.990000,0.995000" in built.csv
