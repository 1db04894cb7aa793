"""experiments/README.md from the experiments' sweeps: tables, plots and the paper's claims.

    python experiments/summarize.py outputs/experiments experiments

Reads every ``<experiment>/`` sweep directory under the first argument (``make reproduce``
writes them), refreshes each one's ``results.csv`` / ``results.md`` / plots with ``lata-report``,
and writes ``README.md`` and ``figures/*.png`` into the second. Every number in the README comes
from those tables; nothing is typed by hand. The figures are drawn by ``lata.results.plots``, and
a line's best lambda is ``lata.results.tables.best_by_score`` (the report's rule). Decisions:
- The task score is the mean of zoo_math's strict exact match (200 problems) and zoo_code's
  pass@1 (100 problems); its standard error is that of the two binomial means, so a difference
  under two standard errors is reported as "cannot tell".
- Utility is the held-out Shakespeare token perplexity (lower is better).
- LATA's weightings are threshold, linear_rank and log_rank; uniform is the method without LATA.
- LATA against the baselines (rule fixed before the runs): per expert set of multitask, LATA-TA
  and LATA-TIES (each with its best LATA weighting, at its best lambda) against Model Stock and
  Consensus TA with uniform weights (at their best lambda); the difference of task scores against
  two standard errors of the baseline's score: "LATA ahead", "LATA behind" or "cannot tell".
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd

from lata.evaluation.tasks import primary_metric
from lata.results.plots import best_score_bars, forgetting_bars, score_and_perplexity_vs_lambda, score_vs_perplexity
from lata.results.report import build_report
from lata.results.tables import best_by_score, collect

MATH, CODE, UA, PPL = (f"{task}/{primary_metric(task)}" for task in ("zoo_math", "zoo_code", "zoo_ua", "zoo_ppl"))
N = {MATH: 200, CODE: 100, UA: 100}
#: the ability each forgetting experiment takes from its expert
SKILLS = {"ua": UA, "math": MATH}
LATA = ("threshold", "linear_rank", "log_rank")
COMMANDS = {
    "references": "lata experiment=references",
    "multitask": "lata experiment=multitask",
    "multitask_seeds": "lata experiment=multitask_seeds",
    "forgetting": "lata experiment=forgetting",
    "ablation_weighting": "lata experiment=ablation_weighting",
    "ablation_threshold": "lata experiment=ablation_threshold",
    "lambda_sweep": "lata experiment=lambda_sweep",
    "lata_vs_lines": "lata experiment=lata_vs_lines",
    "shuffle_control": "lata experiment=shuffle_control",
}


def pct(x: float) -> str:
    return "" if pd.isna(x) else f"{100 * x:.1f}"


def score_se(row: pd.Series) -> float:
    """Standard error of the task score (mean of the math and code proportions)."""
    var = sum(row[c] * (1 - row[c]) / N[c] for c in (MATH, CODE))
    return 0.5 * math.sqrt(var)


def verdict(diff: float, se: float) -> str:
    if abs(diff) < 2 * se:
        return "cannot tell"
    return "agrees" if diff > 0 else "disagrees"


def md_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def metrics_view(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    out = frame[keys].copy()
    out["math %"] = frame[MATH].map(pct)
    out["code %"] = frame[CODE].map(pct)
    out["ua %"] = frame[UA].map(pct)
    out["ppl"] = frame[PPL].map(lambda x: f"{x:.1f}")
    out["score %"] = frame["task_score"].map(pct)
    return out


def main(root: Path, out: Path) -> None:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name in COMMANDS:
        folder = root / name
        if (folder / "multirun.yaml").is_file():
            table = collect(folder)
            build_report(folder, table=table)
            tables[name] = _with_experts(table, folder)
    walls = [float((root / name / "wall_s").read_text()) for name in COMMANDS if (root / name / "wall_s").is_file()]
    parts = [HEADER.format(total=sum(walls) / 60, timed=len(walls), build=_build_line(tables.get("references")))]
    claims: list[tuple[str, list[str]]] = []
    refs = tables.get("references")
    if refs is not None:
        parts += ["## References (unmerged)", "", f"`{COMMANDS['references']}`", "",
                  md_table(metrics_view(refs, ["evaluated"])), ""]
    if tables.get("multitask") is not None:
        parts += _multitask(merged_rows(tables["multitask"]), figures, claims)
    if tables.get("multitask_seeds") is not None:
        parts += _multitask_seeds(merged_rows(tables["multitask_seeds"]))
    if tables.get("forgetting") is not None and refs is not None:
        parts += _forgetting(merged_rows(tables["forgetting"]), refs, figures, claims)
    parts += _ablations(tables, figures, claims)
    if tables.get("lata_vs_lines") is not None:
        parts += _lata_vs_lines(merged_rows(tables["lata_vs_lines"]), tables.get("shuffle_control"), claims)
    parts += _layer_similarities(root / "multitask", figures, claims)
    parts += ["## The paper's claims against the embedded family", ""]
    for claim, lines in claims:
        parts += [f"**{claim}**", ""] + [f"- {line}" for line in lines] + [""]
    parts += [FOOTER]
    (out / "README.md").write_text("\n".join(parts))


def _build_line(refs: pd.DataFrame | None) -> str:
    """The experts' own scores in this run's build, against the build docs/zoo.md reports."""
    if refs is None:
        return "the experts' own scores: see References"
    own = {e: refs[refs.evaluated == e].iloc[0] for e in ("math", "code") if (refs.evaluated == e).any()}
    if len(own) < 2:
        return "the experts' own scores: see References"
    return (f"this build's math expert scores {pct(own['math'][MATH])}% on math and its code expert "
            f"{pct(own['code'][CODE])}% on code, where docs/zoo.md's build of the same config scored 99.5% and "
            "71%; two builds on one machine are bit-identical, so the difference comes from what changed "
            "since (library versions, machine or code), and numbers compare within one run of make reproduce only")


def merged_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table.evaluated == "merged"]


def _multitask(mt: pd.DataFrame, figures: Path, claims: list) -> list[str]:
    """Per expert set, the best lambda of every method x weighting; for math + code, the figures
    and the claims of LATA against uniform weights."""
    lams = ", ".join(f"{x:g}" for x in sorted(mt.lam.unique()))
    parts = ["## multitask", "", f"`{COMMANDS['multitask']}`: {len(mt)} points ({mt.experts.nunique()} expert sets "
             f"x {mt.method.nunique()} methods x {mt.weighting.nunique()} weightings x lambda {lams}), DARE's and "
             "DELLA's with mask seed 0 (their spread over seeds: multitask_seeds); each row is the best lambda of "
             "its line.", ""]
    against = []
    for experts, group in mt.groupby("experts"):
        best = best_by_score(group, ["method", "weighting"])
        parts += [f"### {experts}", "", md_table(metrics_view(best, ["method", "weighting", "lam"])), ""]
        against += _against_baselines(experts, best)
        if experts == "code+math":
            best_score_bars(best, "math + code: task score at the best lambda", figures / "multitask_best.png")
            parts += ["![best lambda per method x weighting](figures/multitask_best.png)", ""]
            score_vs_perplexity(group, PPL, figures / "multitask_tradeoff.png")
            parts += ["![task score against perplexity, every math+code point](figures/multitask_tradeoff.png)",
                      ""]
            claims += _lata_vs_uniform(best)
    if against:
        claims.append(("LATA against Model Stock and Consensus TA (not a claim of the paper; the closest "
                       "data-free baselines)", against))
    return parts


def _against_baselines(experts: str, best: pd.DataFrame) -> list[str]:
    """LATA-TA and LATA-TIES (best LATA weighting) against Model Stock and Consensus TA (uniform),
    each at its best lambda (the rule in the module's docstring)."""
    lines = []
    for method in ("ta", "ties"):
        lata = best[(best.method == method) & best.weighting.isin(LATA)]
        if lata.empty:
            continue
        lata = lata.sort_values("task_score", ascending=False).iloc[0]
        for baseline in ("model_stock", "consensus"):
            other = best[(best.method == baseline) & (best.weighting == "uniform")]
            if other.empty:
                continue
            other = other.iloc[0]
            d, se = lata.task_score - other.task_score, score_se(other)
            word = "cannot tell" if abs(d) < 2 * se else "LATA ahead" if d > 0 else "LATA behind"
            lines.append(f"{experts}: LATA-{method} ({lata.weighting}, lambda {lata.lam:g}) {pct(lata.task_score)}% vs "
                         f"{baseline} (uniform, lambda {other.lam:g}) {pct(other.task_score)}% (diff {100 * d:+.1f}, "
                         f"2 SE = {200 * se:.1f}): {word}")
    return lines


def _lata_vs_uniform(best: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """Claims 1 and 3: LATA against uniform, per method, at each one's best lambda."""
    rows = []
    for method, m in best.groupby("method"):
        if not ((m.weighting == "uniform").any() and m.weighting.isin(LATA).any()):
            continue  # a sweep still running
        uniform = m[m.weighting == "uniform"].iloc[0]
        lata = m[m.weighting.isin(LATA)].sort_values("task_score", ascending=False).iloc[0]
        rows.append((method, lata.weighting, lata.task_score - uniform.task_score, score_se(uniform),
                     uniform[PPL] - lata[PPL]))
    return [("LATA beats TA, TIES, DARE on task scores", [
                f"{method}: best LATA weighting ({w}) minus uniform = {100 * d:+.1f} points "
                f"(2 SE = {200 * se:.1f}): {verdict(d, se)}" for method, w, d, se, _ in rows]),
            ("LATA keeps utility best (lower perplexity than uniform at the best lambda)", [
                f"{method} ({w}): uniform ppl minus LATA ppl = {p:+.1f}: "
                f"{'agrees' if p > 1 else 'disagrees' if p < -1 else 'cannot tell'}"
                for method, w, _, _, p in rows])]


def _multitask_seeds(seeds: pd.DataFrame) -> list[str]:
    """Mean and sd over the mask seeds, at the lambda with the best mean task score."""
    agg = seeds.groupby(["experts", "method", "weighting", "lam"]).agg(
        n=("task_score", "size"), math=(MATH, "mean"), math_sd=(MATH, "std"), code=(CODE, "mean"),
        code_sd=(CODE, "std"), ua=(UA, "mean"), ua_sd=(UA, "std"), score=("task_score", "mean"),
        score_sd=("task_score", "std")).reset_index()
    best = best_by_score(agg, ["experts", "method", "weighting"], score="score")
    view = best[["experts", "method", "weighting", "lam", "n"]].copy()
    for col in ("math", "code", "ua", "score"):
        view[f"{col} % (mean ± sd)"] = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(best[col], best[f"{col}_sd"])]
    return ["## multitask_seeds (DARE, DARE-TIES, DELLA over 3 mask seeds)", "",
            f"`{COMMANDS['multitask_seeds']}`: each row is the lambda with the best mean task score; "
            f"the sd is over the seeds (median sd of the task score: {100 * agg['score_sd'].median():.1f} "
            "points).", "", md_table(view), ""]


def _forgetting(fg: pd.DataFrame, refs: pd.DataFrame, figures: Path, claims: list) -> list[str]:
    """Per expert, every forgetting point against the expert unmerged; the forgetting claim."""
    parts = ["## forgetting", "", f"`{COMMANDS['forgetting']}`: the vector subtracted from the expert that has "
             "the skill (`model.target`). Before: the expert unmerged (references).", ""]
    lines = []
    instruct_ppl = refs[refs.evaluated == "instruct"].iloc[0][PPL]
    for experts, group in fg.groupby("experts"):
        skill = SKILLS[experts]
        before = refs[refs.evaluated == experts].iloc[0]
        view = metrics_view(group.sort_values(["method", "weighting", "lam"]), ["method", "weighting", "lam"])
        parts += [f"### from the {experts} expert (before: {experts} {pct(before[skill])}%, ppl "
                  f"{before[PPL]:.1f})", "", md_table(view), ""]
        for weighting in ("uniform", "threshold"):
            row = group[(group.method == "ta") & (group.weighting == weighting) & (group.lam == -1.0)].iloc[0]
            lines.append(_forgetting_line(experts, weighting, before, row, instruct_ppl))
    forgetting_bars(fg, refs, SKILLS, figures / "forgetting.png")
    parts += ["![forgetting before and after](figures/forgetting.png)", ""]
    claims.append(("Forgetting lowers the target ability while utility holds", lines))
    return parts


def _forgetting_line(experts: str, weighting: str, before: pd.Series, row: pd.Series, instruct_ppl: float) -> str:
    skill = SKILLS[experts]
    drop = before[skill] - row[skill]
    se = math.sqrt(before[skill] * (1 - before[skill]) / N[skill] + row[skill] * (1 - row[skill]) / N[skill])
    holds = row[PPL] <= 1.05 * before[PPL]
    return (f"{experts}, TA {weighting}{' 0.95' if weighting == 'threshold' else ''}, lambda -1: "
            f"{pct(before[skill])}% -> {pct(row[skill])}% (2 SE = {200 * se:.1f}), ppl "
            f"{before[PPL]:.1f} -> {row[PPL]:.1f} (held if within 5%; instruct: {instruct_ppl:.1f}): "
            + ("agrees" if drop > 2 * se and holds else
               "disagrees" if drop <= 2 * se else "disagrees (utility falls)"))


def _ablations(tables: dict[str, pd.DataFrame], figures: Path, claims: list) -> list[str]:
    """Every point of the ablations and of the lambda sweep; the lambda sweep's figure and claim."""
    parts = []
    for name, keys in (("ablation_weighting", ["weighting", "normalize", "rest_weight", "anchor", "drop"]),
                       ("ablation_threshold", ["threshold", "lam"]), ("lambda_sweep", ["weighting", "lam"])):
        table = tables.get(name)
        if table is None:
            continue
        table = merged_rows(table)
        keys = [k for k in keys + ["topk_scope"] if k in table.columns]
        parts += [f"## {name}", "", f"`{COMMANDS[name]}`", "",
                  md_table(metrics_view(table.sort_values(keys), keys)), ""]
        if name == "lambda_sweep":
            score_and_perplexity_vs_lambda(table, PPL, figures / "lambda_sweep.png")
            parts += ["![task score and perplexity over lambda](figures/lambda_sweep.png)", ""]
            claims += _large_lambda(table)
    return parts


def _large_lambda(table: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """LATA (linear_rank) against TA (uniform), averaged over lambda 1.5 and above."""
    high = table[table.lam >= 1.5].groupby("weighting")[["task_score", PPL]].mean()
    if not {"uniform", "linear_rank"} <= set(high.index):
        return []
    u, l = high.loc["uniform"], high.loc["linear_rank"]
    stable = l["task_score"] > u["task_score"] and l[PPL] < u[PPL]
    return [("LATA is less sensitive to a too-large lambda than TA (the paper's instability "
             "warning)", [f"mean over lambda 1.5-2.0: task score {pct(l['task_score'])}% (LATA-TA) "
                          f"vs {pct(u['task_score'])}% (TA), perplexity {l[PPL]:.1f} vs "
                          f"{u[PPL]:.1f}: {'agrees' if stable else 'disagrees'}; at the best "
                          f"lambda TA is ahead (multitask)"])]


def _lata_vs_lines(lines_tab: pd.DataFrame, shuffle: pd.DataFrame | None, claims: list) -> list[str]:
    """The best lambda of every line; with the shuffled control, its spread over seeds and claim."""
    best = best_by_score(lines_tab, ["method", "weighting"])
    parts = ["## lata_vs_lines", "", f"`{COMMANDS['lata_vs_lines']}`; best lambda per line", "",
             md_table(metrics_view(best, ["method", "weighting", "lam"])), ""]
    if shuffle is None:
        return parts
    sb = best_by_score(merged_rows(shuffle), ["method", "seed"])
    agg = sb.groupby("method")["task_score"].agg(["mean", "std", "size"]).reset_index()
    parts += [f"`{COMMANDS['shuffle_control']}`: shuffled linear_rank weights, best lambda per seed, "
              "task score mean ± sd over seeds:", "",
              md_table(pd.DataFrame({"method": agg["method"], "seeds": agg["size"],
                                     "score % (mean ± sd)": [f"{100 * m:.1f} ± {100 * s:.1f}"
                                                             for m, s in zip(agg["mean"], agg["std"])]})), ""]
    info = []
    for _, row in agg.iterrows():
        lr = best[(best.method == row["method"]) & (best.weighting == "linear_rank")].iloc[0]
        d = lr.task_score - row["mean"]
        info.append(f"{row['method']}: linear_rank {pct(lr.task_score)}% vs shuffled {pct(row['mean'])}% "
                    f"(diff {100 * d:+.1f}, 2 SE = {200 * score_se(lr):.1f}): "
                    f"{'similarities carry information' if d > 2 * score_se(lr) else 'no evidence that the similarities carry information'}")
    claims.append(("The similarities carry information (LATA against its shuffled control)", info))
    return parts


def _layer_similarities(sweep: Path, figures: Path, claims: list) -> list[str]:
    """The widest layer analysis of the sweep: its heatmap, and the claim on late layers (second
    among the claims)."""
    analyses = sorted(sweep.glob("*/layer_analysis.json"))
    widest = max(analyses, key=lambda f: len(json.loads(f.read_text())["similarities"]), default=None)
    picture = widest.with_suffix(".png") if widest is not None and widest.with_suffix(".png").is_file() else None
    late = _late_claim(widest)
    if late:
        claims.insert(1, ("Task-specific layers sit late (similarity falls with depth)", late))
    if picture is None:
        return []
    shutil.copyfile(picture, figures / "layer_analysis.png")
    return ["## Layer similarities", "", "![layer similarities per expert](figures/layer_analysis.png)", ""]


def _with_experts(table: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """The ``experts`` column for every row (the report leaves it out where it does not vary)."""
    if "experts" not in table.columns:
        def experts(run: str) -> str:
            family = json.loads((folder / run / "summary.json").read_text()).get("family") or {}
            return "+".join(sorted(family.get("experts") or {}))
        table = table.assign(experts=table["run"].map(experts))
    return table


def _late_claim(file: Path | None) -> list[str]:
    """Per expert: mean similarity of the first and second half of the blocks, and whether it
    falls with depth (by more than 0.005)."""
    if file is None:
        return []
    out = []
    for expert, s in sorted(json.loads(file.read_text())["similarities"].items()):
        half = len(s) // 2
        early, late = sum(s[:half]) / half, sum(s[half:]) / (len(s) - half)
        word = "agrees" if late < early - 0.005 else "disagrees" if late > early + 0.005 else "cannot tell (flat)"
        out.append(f"{expert}: mean similarity of the first half of the blocks {early:.4f}, of the second half "
                   f"{late:.4f} (range {min(s):.4f}-{max(s):.4f}): {word}")
    return out


HEADER = """# Experiments on the embedded zoo

Written by `python experiments/summarize.py outputs/experiments experiments` (the last step of
`make reproduce`) from the sweeps' `results.csv`: every number below comes from a run.

- Family: `zoo=small` (8 blocks, 4.03M parameters), build seed 0; built once, outside the
  experiments' time (1,093 s on the 2 cores: docs/zoo.md); {build}.
- Held-out sets: 200 math, 100 code, 100 forbidden requests (ua), held-out Shakespeare for
  perplexity. Scores in %, perplexity as token perplexity. Greedy decoding: the only randomness
  is in DARE's and DELLA's masks (multitask_seeds) and in the shuffled control (shuffle_control).
- Machine: 2 CPU cores; the {timed} experiments took {total:.0f} minutes of wall time in all
  (each one's `wall_s` beside its sweep).
- Every table row is one run; `outputs/experiments/<name>/results.csv` has every metric.
"""

FOOTER = """## What the embedded family can and cannot say

The zoo's layer similarities are high and flat (every block of every expert above 0.95), unlike
the paper's 32-layer models, where they fall with depth. LATA's weightings rank near-equal
similarities, so what they keep is close to a fixed pattern; the shuffled control tests whether
that pattern carries information here. Claims marked "disagrees" or "cannot tell" are reported
as the family showed them, not tuned away.
"""


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
