"""lata-report on fabricated run directories with known numbers."""

import csv
import json
import os
from importlib.metadata import entry_points

import pandas as pd
import pytest

from lata.results.report import build_report, main
from lata.results.tables import best_by_score, best_points, collect

METHODS = ("ta", "ties")
WEIGHTINGS = ("uniform", "linear_rank")
LAMS = (0.3, 0.6, 1.0)
BEST = {("ta", "uniform"): 0.3, ("ta", "linear_rank"): 0.6, ("ties", "uniform"): 1.0, ("ties", "linear_rank"): 0.6}
OFFSET = {("ta", "uniform"): 0.0, ("ta", "linear_rank"): 0.05, ("ties", "uniform"): 0.1, ("ties", "linear_rank"): 0.15}
PNG = b"\x89PNG\r\n\x1a\n"


def metrics_of(method, weighting, lam):
    """Every series peaks at its BEST lambda; ppl grows with lambda."""
    gap = abs(lam - BEST[method, weighting])
    o = OFFSET[method, weighting]
    return {"zoo_math": {"exact_match_strict": 0.5 + o - 0.3 * gap, "exact_match_flexible": 0.6 + o - 0.3 * gap,
                         "samples": 40.0},
            "zoo_code": {"pass@1": 0.4 + o - 0.2 * gap, "samples": 40.0},
            "zoo_ppl": {"token_perplexity": 10.0 + 5 * lam + o, "word_perplexity": 30.0 + lam, "tokens": 500.0,
                        "samples": 5.0}}


def reference_metrics(math, code, ppl):
    return {"zoo_math": {"exact_match_strict": math, "exact_match_flexible": math + 0.05, "samples": 40.0},
            "zoo_code": {"pass@1": code, "samples": 40.0},
            "zoo_ppl": {"token_perplexity": ppl, "word_perplexity": ppl + 20, "tokens": 500.0, "samples": 5.0}}


REFERENCES = {"instruct": reference_metrics(0.05, 0.0, 9.0), "math": reference_metrics(0.3, 0.02, 9.5)}


def summary(method, weighting="linear_rank", lam=1.0, metrics=None, evaluated=None):
    s = {"family": {"base": "b", "instruct": "i", "experts": {"math": "m", "code": "c"}},
         "merge": {"method": method, "lam": lam, "lams": {}, "density": 0.2, "p": 0.9, "topk_scope": "tensor",
                   "anchor": "instruct", "seed": 0},
         "weighting": {"name": weighting, "drop": 0.5, "threshold": 0.95, "normalize": "none", "rest_weight": 1.0,
                       "weights": None},
         "run_dir": "somewhere"}
    if metrics is not None:
        s["metrics"] = metrics
    if evaluated is not None:
        s["evaluated"] = evaluated
    return s


def write_run(directory, data, mtime=None):
    directory.mkdir(parents=True)
    (directory / "summary.json").write_text(json.dumps(data))
    if mtime is not None:
        os.utime(directory / "summary.json", (mtime, mtime))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 methods x 2 weightings x 3 lambdas (jobs 0..11) and two unmerged references (12, 13)."""
    root = tmp_path_factory.mktemp("sweep")
    job = 0
    for method in METHODS:
        for weighting in WEIGHTINGS:
            for lam in LAMS:
                write_run(root / str(job), summary(method, weighting, lam, metrics_of(method, weighting, lam)),
                          mtime=1_000_000 + job)
                job += 1
    for role, metrics in REFERENCES.items():
        write_run(root / str(job), summary("none", metrics=metrics, evaluated=role), mtime=1_000_000 + job)
        job += 1
    # decoys: Hydra's and W&B's folders are never read
    write_run(root / "0" / ".hydra", summary("ta", lam=9.0, metrics=metrics_of("ta", "uniform", 0.3)))
    write_run(root / "0" / "wandb" / "x", summary("ta", lam=9.0, metrics=metrics_of("ta", "uniform", 0.3)))
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, build_report(sweep, out)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_has_one_row_per_point_with_the_right_numbers(report):
    _, written = report
    rows = read_csv(written["results.csv"])
    assert len(rows) == 14 and len({r["run"] for r in rows}) == 14
    assert [r["evaluated"] for r in rows[:2]] == ["instruct", "math"]  # references first
    assert all(r["evaluated"] == "merged" for r in rows[2:])
    assert "zoo_math/samples" not in rows[0] and "zoo_ppl/tokens" in rows[0]
    job = 0
    by_run = {r["run"]: r for r in rows}
    for method in METHODS:
        for weighting in WEIGHTINGS:
            for lam in LAMS:
                row, m = by_run[str(job)], metrics_of(method, weighting, lam)
                assert (row["method"], row["weighting"], float(row["lam"])) == (method, weighting, lam)
                assert row["density"] == ("0.2" if method == "ties" else "")  # unused parameters stay empty
                assert "p" not in row and "epsilon" not in row and row["lams"] == ""  # no row has them
                assert row["drop"] == ("0.5" if weighting == "linear_rank" else "")
                for column, value in [("zoo_math/exact_match_strict", m["zoo_math"]["exact_match_strict"]),
                                      ("zoo_math/exact_match_flexible", m["zoo_math"]["exact_match_flexible"]),
                                      ("zoo_code/pass@1", m["zoo_code"]["pass@1"]),
                                      ("zoo_ppl/token_perplexity", m["zoo_ppl"]["token_perplexity"])]:
                    assert float(row[column]) == value, (job, column)
                # task_score: mean of the primary metrics of the scored tasks (ppl is not scored)
                expected = (m["zoo_math"]["exact_match_strict"] + m["zoo_code"]["pass@1"]) / 2
                assert float(row["task_score"]) == pytest.approx(expected, rel=1e-12)
                job += 1
    ref = by_run["13"]
    assert (ref["method"], ref["lam"], ref["weighting"], ref["evaluated"]) == ("none", "", "", "math")
    assert float(ref["task_score"]) == pytest.approx((0.3 + 0.02) / 2)


def test_best_lambda_is_the_known_best(sweep):
    best = best_points(collect(sweep))
    assert {(r.method, r.weighting): r.lam for r in best.itertuples()} == BEST
    assert len(best) == 4


def test_best_by_score_takes_the_highest_score_and_the_lower_lambda_on_a_tie():
    frame = pd.DataFrame({"line": ["a", "a", "a", "b", "b", "c"], "lam": [1.0, 0.5, 0.7, 0.3, 0.6, 0.9],
                          "score": [0.8, 0.8, 0.2, 0.1, 0.4, float("nan")]})
    best = best_by_score(frame, ["line"], score="score")
    assert best["line"].tolist() == ["a", "b", "c"] and best["lam"].tolist() == [0.5, 0.6, 0.9]


def test_plots_and_markdown(sweep, report):
    out, written = report
    expected = {"lambda_zoo_math.png", "lambda_zoo_code.png", "lambda_zoo_ppl.png", "lambda_task_score.png",
                "best_lambda.png", "tradeoff_zoo_ppl.png"}
    assert expected <= set(written)
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000, name
    assert not (sweep / "results.csv").exists()  # --out respected
    md = (out / "results.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    assert "zoo_math/exact_match_strict" in header and "task_score" in header
    assert "zoo_math/exact_match_flexible" not in header  # primary metrics only
    rows = [line for line in lines if line.startswith("| 1")]
    assert rows[0].startswith("| 12 | none |") and "instruct" in rows[0]
    assert rows[1].startswith("| 13 | none |") and "math" in rows[1]
    assert "## Best lambda" in md and "![best_lambda](best_lambda.png)" in md


def test_missing_data_skips_plots(tmp_path):
    """One lambda and no ppl task: no lambda or trade-off plot, no error."""
    metrics = {"zoo_math": {"exact_match_strict": 0.4, "samples": 10.0}}
    write_run(tmp_path / "a", summary("ta", metrics=metrics))
    write_run(tmp_path / "b", summary("ties", metrics=metrics))
    written = build_report(tmp_path)
    assert set(written) == {"results.csv", "results.md", "best_lambda.png"}
    # no metrics at all (benchmark=none): only the table
    write_run(tmp_path / "only" / "c", summary("ta"))
    assert set(build_report(tmp_path / "only")) == {"results.csv", "results.md"}


def test_duplicate_points_keep_the_newest(tmp_path):
    old = summary("ta", lam=0.5, metrics={"zoo_math": {"exact_match_strict": 0.1}})
    new = summary("ta", lam=0.5, metrics={"zoo_math": {"exact_match_strict": 0.2}})
    new["merge"]["density"] = 0.7  # unused by ta: still the same point
    write_run(tmp_path / "first" / "0", new, mtime=2_000_000)
    write_run(tmp_path / "resumed" / "0", old, mtime=1_000_000)
    table = collect(tmp_path)
    assert len(table) == 1 and table.loc[0, "zoo_math/exact_match_strict"] == 0.2
    assert table.loc[0, "run"] == "first/0"


def test_per_expert_lambdas_are_compact(tmp_path):
    s = summary("ta", lam=1.0, metrics={"zoo_math": {"exact_match_strict": 0.1}})
    s["merge"]["lams"] = {"math": 0.5, "code": -1.0}
    write_run(tmp_path / "0", s)
    assert collect(tmp_path).loc[0, "lams"] == "code=-1,math=0.5"


def test_columns_follow_the_registries(tmp_path):
    """New methods and weightings bring their own columns; a user's method the report cannot
    import keeps the keys its summary recorded."""
    della = summary("della", lam=0.5, metrics={"zoo_math": {"exact_match_strict": 0.3}})
    della["merge"] = {"method": "della", "lam": 0.5, "lams": {}, "anchor": "instruct", "density": 0.6,
                      "epsilon": 0.1, "seed": 2}
    della["weighting"] = {"name": "lines", "normalize": "none", "rest_weight": None, "alpha": 0.2, "beta": 0.8}
    mine = summary("my_lab.methods.Sharp", lam=0.5, metrics={"zoo_math": {"exact_match_strict": 0.4}})
    mine["merge"] = {"method": "my_lab.methods.Sharp", "lam": 0.5, "lams": {}, "anchor": "instruct", "sharpness": 3.0}
    write_run(tmp_path / "0", della)
    write_run(tmp_path / "1", mine)
    table = collect(tmp_path).set_index("method")
    assert table.loc["della", ["density", "epsilon", "seed", "alpha", "beta"]].tolist() == [0.6, 0.1, 2, 0.2, 0.8]
    assert table.loc["my_lab.methods.Sharp", "sharpness"] == 3.0
    assert "p" not in table.columns and "gamma" not in table.columns and "topk_scope" not in table.columns


def test_expert_sets_and_ablated_keys_become_columns_only_where_they_vary(tmp_path):
    from lata.results.tables import series_labels

    for i, experts in enumerate(({"math": "m", "code": "c"}, {"ua": "u", "math": "m"})):
        s = summary("ta", lam=0.5, metrics={"zoo_math": {"exact_match_strict": 0.1 * (i + 1)}})
        s["family"]["experts"] = experts
        write_run(tmp_path / "sets" / str(i), s)
    table = collect(tmp_path / "sets")
    assert sorted(table["experts"]) == ["code+math", "math+ua"] and "anchor" not in table.columns
    assert series_labels(table).nunique() == 2  # one line per expert set
    forget = summary("ta", lam=-1.0, metrics={"zoo_ua": {"compliance": 0.0}})
    forget["family"].update(experts={"ua": "u"}, target="u")
    forget["merge"]["anchor"] = "base"
    write_run(tmp_path / "sets" / "2", forget)
    table = collect(tmp_path / "sets").set_index("experts")
    assert table.loc["ua", "target"] == "ua" and table.loc["ua", "anchor"] == "base"


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no summary.json under {tmp_path}"):
        build_report(tmp_path)


def test_cli(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "0", summary("ta", metrics={"zoo_math": {"exact_match_strict": 0.4}}))
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "out" / "results.csv") in printed and str(tmp_path / "out" / "results.md") in printed
    assert main([str(tmp_path / "nothing")]) == 2
    assert "lata-report: error:" in capsys.readouterr().err
    script = entry_points(group="console_scripts", name="lata-report")
    assert [e.value for e in script] == ["lata.results.report:main"]
