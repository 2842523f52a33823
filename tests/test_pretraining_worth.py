"""The pretraining-worth benchmark's pairing rule: a random run is read at equal minutes, at the
end of its schedule when it took the MoCo pipeline's minutes, and every other draw is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.pretraining_worth import Counting, median_minutes_a_step, paired_gains, read_curves, summary

MOCO = [(1.0, 0.970), (2.0, 0.980)]  # (minutes, test top-1); 0.5 min of pretraining makes 2.5


def test_each_draw_is_read_by_its_own_minutes() -> None:
    random = {
        0: [(1.2, 0.960), (2.55, 0.979)],  # 2% over the budget: the same minutes, read at its end
        1: [(1.5, 0.970), (3.0, 0.990)],  # 20% over: read at 2.5 min, mid-schedule
        2: [(1.0, 0.950), (2.0, 0.975)],  # 20% under: its final model
    }
    gains = paired_gains({0: MOCO, 1: MOCO, 2: MOCO, 3: MOCO}, random, offset=0.5)
    assert sorted(gains) == [0, 1, 2]  # paired draws only
    assert [round(gains[d].gain, 6) for d in (0, 1, 2)] == [0.001, 0.010, 0.005]
    assert [gains[d].mismatch for d in (0, 1, 2)] == ["", "read before its schedule ended", "ended sooner"]
    assert gains[0].budget == pytest.approx(2.5)


def test_the_summary_names_the_draws_that_had_other_minutes() -> None:
    random = {0: [(2.5, 0.975)], 1: [(1.0, 0.96), (4.0, 0.99)]}
    text, metrics = summary({0: MOCO, 1: MOCO}, random, 1.5, [Counting("(a)", 1 / 3)])
    assert metrics["gain_per_study"] == pytest.approx(100 * (0.005 + 0.020) / 2)
    assert "draw 1 4.0 min against 2.5, read before its schedule ended" in text
    assert "draw 0" not in text


def test_steady_minutes_charge_every_run_the_median_step(tmp_path: Path) -> None:
    rows = {"moco": "100:0.98:1.0 200:0.985:4.0", "random": "100:0.97:1.0 250:0.99:2.5"}  # 0.02 and 0.01 a step
    path = tmp_path / "runs.csv"
    path.write_text("draw,init,curve\n" + "".join(f"0,{init},{curve}\n" for init, curve in rows.items()))
    assert median_minutes_a_step([path]) == pytest.approx(0.015)  # the median of 0.02 and 0.01
    curves = read_curves(path, minutes_a_step=0.015)
    assert curves["moco"][0] == [(1.5, 0.98), (3.0, 0.985)]  # the slowed second half no longer counts
    assert read_curves(path)["random"][0] == [(1.0, 0.97), (2.5, 0.99)]  # measured minutes by default
