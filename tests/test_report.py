"""The results table: averages with binomial standard errors, ordering, below-base marks, guided − plain."""

import math

import pytest

from merge_dag.evaluation.report import ScoreTable, format_results


def _results(rows: dict[str, dict[str, float]], n: int = 100) -> list[dict]:
    return [
        {
            "model": m,
            "metrics": [[t, "exact_match", v, 0.0, n] for t, v in per.items()]
            + [[t, "logprob", -1.0, 0.1, n] for t in per],
        }
        for m, per in rows.items()
    ]


RESULTS = _results(
    {
        "merged/ties": {"zoo_a": 0.6, "zoo_b": 0.5},
        "model/base": {"zoo_a": 0.5, "zoo_b": 0.5},
        "merged/ties_lewis": {"zoo_a": 0.7, "zoo_b": 0.6},
        "model/expert_a": {"zoo_a": 0.9, "zoo_b": 0.4},
        "merged/dare": {"zoo_a": 0.2, "zoo_b": 0.3},
    }
)


def test_averages_and_standard_errors_are_binomial():
    t = ScoreTable.from_results(RESULTS)
    assert t.tasks == ["zoo_a", "zoo_b"] and t.metric == "exact_match"
    assert t.average("merged/ties") == pytest.approx(0.55)
    se_a, se_b = math.sqrt(0.6 * 0.4 / 100), math.sqrt(0.5 * 0.5 / 100)
    assert t.se("merged/ties", "zoo_a") == pytest.approx(se_a)
    assert t.se_average("merged/ties") == pytest.approx(math.sqrt(se_a**2 + se_b**2) / 2)
    d, se = t.diff("merged/ties_lewis", "merged/ties")
    assert d == pytest.approx(0.1) and se == pytest.approx(
        math.hypot(t.se_average("merged/ties_lewis"), t.se_average("merged/ties"))
    )


def test_table_puts_base_first_sorts_merges_and_marks_those_below_the_base():
    text = format_results(
        ScoreTable.from_results(RESULTS),
        base="model/base",
        pairs=[("LEWIS", "ties", "ties_lewis"), ("missing", "linear", "regmean")],
    )
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    assert rows[0] == "| model | a | b | avg ± SE | Δ avg vs base |"
    labels = [r.split(" | ")[0].removeprefix("| ") for r in rows[1:6]]
    assert labels == ["base (base)", "expert_a (expert)", "ties_lewis", "ties", "dare"]
    assert rows[1].endswith("|  |")  # no Δ for the base itself
    assert "▼ below base" in rows[5] and "▼" not in "".join(rows[2:5])
    assert rows[5].split(" | ")[-1].startswith("-0.250 ± ")
    # guided − plain: only pairs whose both recipes were evaluated
    assert rows[6] == "| guided − plain | a | b | avg ± SE |"
    assert rows[7].startswith("| ties_lewis − ties | +0.100 | +0.100 | +0.100 ± ")
    assert len(rows) == 8
    assert "▼ 1 merge(s) score below the base on average." in text
    assert "exact_match per task on 100 documents" in text


def test_a_model_evaluated_on_some_tasks_is_averaged_and_compared_on_those():
    res = RESULTS + _results({"merged/partial": {"zoo_a": 0.9}})
    t = ScoreTable.from_results(res)
    assert not t.complete("merged/partial") and t.average("merged/partial") == pytest.approx(0.9)
    d, se = t.diff("merged/partial", "model/base")  # over zoo_a only: 0.9 - 0.5
    assert d == pytest.approx(0.4) and se == pytest.approx(math.hypot(math.sqrt(0.09 / 100), math.sqrt(0.25 / 100)))
    text = format_results(t, base="model/base", pairs=[])
    row = next(r for r in text.splitlines() if r.startswith("| partial |"))
    assert row.startswith("| partial | 0.900 | — | 0.900 ± 0.030* | +0.400 ± ")
    assert "* evaluated on some of the tasks only" in text
