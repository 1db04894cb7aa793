"""experiments/README.md from the experiments' sweeps: tables, plots and the paper's claims.

    python experiments/summarize.py outputs/experiments experiments

Reads every ``<experiment>/`` sweep directory under the first argument (``make reproduce``
writes them), refreshes each one's ``results.csv`` / ``results.md`` / plots with ``lata-report``,
and writes ``README.md`` and ``figures/*.png`` into the second. Every number in the README comes
from those tables; nothing is typed by hand. Decisions:
- The task score is the mean of zoo_math's strict exact match (200 problems) and zoo_code's
  pass@1 (100 problems); its standard error is that of the two binomial means, so a difference
  under two standard errors is reported as "cannot tell".
- Utility is the held-out Shakespeare token perplexity (lower is better).
- LATA's weightings are threshold, linear_rank and log_rank; uniform is the method without LATA.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd

from lata.results.plots import new_figure, save_figure
from lata.results.report import build_report, collect

MATH, CODE, UA, PPL = ("zoo_math/exact_match_strict", "zoo_code/pass@1", "zoo_ua/compliance",
                       "zoo_ppl/token_perplexity")
N = {MATH: 200, CODE: 100, UA: 100}
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


def best_per(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group, the row with the best task score (lower lambda on a tie)."""
    ordered = frame.sort_values(keys + ["task_score", "lam"], ascending=[True] * len(keys) + [False, True])
    return ordered.groupby(keys, sort=True).head(1).reset_index(drop=True)


def bar_plot(best: pd.DataFrame, title: str, path: Path) -> None:
    methods = sorted(best["method"].unique())
    weightings = [w for w in ("uniform", "threshold", "linear_rank", "log_rank", "lines", "shuffled")
                  if w in set(best["weighting"])]
    fig = new_figure(figsize=(9, 4))
    ax = fig.add_subplot()
    width = 0.8 / len(weightings)
    for j, w in enumerate(weightings):
        values = [best[(best.method == m) & (best.weighting == w)]["task_score"].max() for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], values, width, label=w)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods)
    ax.set_ylabel("task score at the best lambda")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=3)
    save_figure(fig, path)


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
    parts = [HEADER.format(total=sum(walls) / 60, timed=len(walls))]

    refs = tables.get("references")
    if refs is not None:
        parts += ["## References (unmerged)", "", f"`{COMMANDS['references']}`", "",
                  md_table(metrics_view(refs, ["evaluated"])), ""]
    claims = []

    mt = tables.get("multitask")
    if mt is not None:
        mt = mt[mt.evaluated == "merged"]
        parts += ["## multitask", "", f"`{COMMANDS['multitask']}`: {len(mt)} points (3 expert sets x 6 methods x "
                  "5 weightings x lambda 0.7, 1.0), DARE's and DELLA's with mask seed 0 (their spread over "
                  "seeds: multitask_seeds); each row is the best lambda of its line.", ""]
        for experts, group in mt.groupby("experts"):
            best = best_per(group, ["method", "weighting"])
            parts += [f"### {experts}", "", md_table(metrics_view(best, ["method", "weighting", "lam"])), ""]
            if experts == "code+math":
                bar_plot(best, "math + code: task score at the best lambda", figures / "multitask_best.png")
                parts += ["![best lambda per method x weighting](figures/multitask_best.png)", ""]
                _tradeoff_plot(group, figures / "multitask_tradeoff.png")
                parts += ["![task score against perplexity, every math+code point](figures/multitask_tradeoff.png)",
                          ""]
                # claims 1 and 3: LATA against uniform, per method, at each one's best lambda
                rows = []
                for method, m in best.groupby("method"):
                    if not ((m.weighting == "uniform").any() and m.weighting.isin(LATA).any()):
                        continue  # a sweep still running
                    uniform = m[m.weighting == "uniform"].iloc[0]
                    lata = m[m.weighting.isin(LATA)].sort_values("task_score", ascending=False).iloc[0]
                    rows.append((method, lata.weighting, lata.task_score - uniform.task_score, score_se(uniform),
                                 uniform[PPL] - lata[PPL]))
                claims.append(("LATA beats TA, TIES, DARE on task scores", [
                    f"{method}: best LATA weighting ({w}) minus uniform = {100 * d:+.1f} points "
                    f"(2 SE = {200 * se:.1f}): {verdict(d, se)}" for method, w, d, se, _ in rows]))
                claims.append(("LATA keeps utility best (lower perplexity than uniform at the best lambda)", [
                    f"{method} ({w}): uniform ppl minus LATA ppl = {p:+.1f}: "
                    f"{'agrees' if p > 1 else 'disagrees' if p < -1 else 'cannot tell'}"
                    for method, w, _, _, p in rows]))

    seeds = tables.get("multitask_seeds")
    if seeds is not None:
        seeds = seeds[seeds.evaluated == "merged"]
        agg = seeds.groupby(["experts", "method", "weighting", "lam"]).agg(
            n=("task_score", "size"), math=(MATH, "mean"), math_sd=(MATH, "std"), code=(CODE, "mean"),
            code_sd=(CODE, "std"), ua=(UA, "mean"), ua_sd=(UA, "std"), score=("task_score", "mean"),
            score_sd=("task_score", "std")).reset_index()
        best = (agg.sort_values(["experts", "method", "weighting", "score", "lam"],
                                ascending=[True, True, True, False, True])
                .groupby(["experts", "method", "weighting"]).head(1))
        view = best[["experts", "method", "weighting", "lam", "n"]].copy()
        for col in ("math", "code", "ua", "score"):
            view[f"{col} % (mean ± sd)"] = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(best[col], best[f"{col}_sd"])]
        parts += ["## multitask_seeds (DARE, DARE-TIES, DELLA over 3 mask seeds)", "",
                  f"`{COMMANDS['multitask_seeds']}`: each row is the lambda with the best mean task score; "
                  f"the sd is over the seeds (median sd of the task score: {100 * agg['score_sd'].median():.1f} "
                  "points).", "", md_table(view), ""]

    fg = tables.get("forgetting")
    if fg is not None and refs is not None:
        fg = fg[fg.evaluated == "merged"]
        parts += ["## forgetting", "", f"`{COMMANDS['forgetting']}`: the vector subtracted from the expert that has "
                  "the skill (`model.target`). Before: the expert unmerged (references).", ""]
        lines = []
        instruct_ppl = refs[refs.evaluated == "instruct"].iloc[0][PPL]
        for experts, group in fg.groupby("experts"):
            skill = {"ua": UA, "math": MATH}[experts]
            before = refs[refs.evaluated == experts].iloc[0]
            view = metrics_view(group.sort_values(["method", "weighting", "lam"]), ["method", "weighting", "lam"])
            parts += [f"### from the {experts} expert (before: {experts} {pct(before[skill])}%, ppl "
                      f"{before[PPL]:.1f})", "", md_table(view), ""]
            for weighting in ("uniform", "threshold"):
                row = group[(group.method == "ta") & (group.weighting == weighting) & (group.lam == -1.0)].iloc[0]
                drop = before[skill] - row[skill]
                se = math.sqrt(before[skill] * (1 - before[skill]) / N[skill] + row[skill] * (1 - row[skill]) / N[skill])
                holds = row[PPL] <= 1.05 * before[PPL]
                lines.append(f"{experts}, TA {weighting}{' 0.95' if weighting == 'threshold' else ''}, lambda -1: "
                             f"{pct(before[skill])}% -> {pct(row[skill])}% (2 SE = {200 * se:.1f}), ppl "
                             f"{before[PPL]:.1f} -> {row[PPL]:.1f} (held if within 5%; instruct: {instruct_ppl:.1f}): "
                             + ("agrees" if drop > 2 * se and holds else
                                "disagrees" if drop <= 2 * se else "disagrees (utility falls)"))
        _forgetting_plot(fg, refs, figures / "forgetting.png")
        parts += ["![forgetting before and after](figures/forgetting.png)", ""]
        claims.append(("Forgetting lowers the target ability while utility holds", lines))

    for name, keys in (("ablation_weighting", ["weighting", "normalize", "rest_weight", "anchor", "drop"]),
                       ("ablation_threshold", ["threshold", "lam"]), ("lambda_sweep", ["weighting", "lam"])):
        table = tables.get(name)
        if table is None:
            continue
        table = table[table.evaluated == "merged"]
        keys = [k for k in keys + ["topk_scope"] if k in table.columns]
        parts += [f"## {name}", "", f"`{COMMANDS[name]}`", "",
                  md_table(metrics_view(table.sort_values(keys), keys)), ""]
        if name == "lambda_sweep":
            _lambda_plot(table, figures / "lambda_sweep.png")
            parts += ["![task score and perplexity over lambda](figures/lambda_sweep.png)", ""]
            high = table[table.lam >= 1.5].groupby("weighting")[["task_score", PPL]].mean()
            if {"uniform", "linear_rank"} <= set(high.index):
                u, l = high.loc["uniform"], high.loc["linear_rank"]
                stable = l["task_score"] > u["task_score"] and l[PPL] < u[PPL]
                claims.append(("LATA is less sensitive to a too-large lambda than TA (the paper's instability "
                               "warning)", [f"mean over lambda 1.5-2.0: task score {pct(l['task_score'])}% (LATA-TA) "
                                            f"vs {pct(u['task_score'])}% (TA), perplexity {l[PPL]:.1f} vs "
                                            f"{u[PPL]:.1f}: {'agrees' if stable else 'disagrees'}; at the best "
                                            f"lambda TA is ahead (multitask)"]))

    lines_tab, shuffle = tables.get("lata_vs_lines"), tables.get("shuffle_control")
    if lines_tab is not None:
        lines_tab = lines_tab[lines_tab.evaluated == "merged"]
        best = best_per(lines_tab, ["method", "weighting"])
        parts += ["## lata_vs_lines", "", f"`{COMMANDS['lata_vs_lines']}`; best lambda per line", "",
                  md_table(metrics_view(best, ["method", "weighting", "lam"])), ""]
        if shuffle is not None:
            shuffle = shuffle[shuffle.evaluated == "merged"]
            sb = best_per(shuffle, ["method", "seed"])
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

    analyses = sorted((root / "multitask").glob("*/layer_analysis.json"))
    widest = max(analyses, key=lambda f: len(json.loads(f.read_text())["similarities"]), default=None)
    picture = widest.with_suffix(".png") if widest is not None and widest.with_suffix(".png").is_file() else None
    late = _late_claim(widest)
    if late:
        claims.insert(1, ("Task-specific layers sit late (similarity falls with depth)", late))
    if picture is not None:
        shutil.copyfile(picture, figures / "layer_analysis.png")
        parts += ["## Layer similarities", "", "![layer similarities per expert](figures/layer_analysis.png)", ""]

    parts += ["## The paper's claims against the embedded family", ""]
    for claim, lines in claims:
        parts += [f"**{claim}**", ""] + [f"- {line}" for line in lines] + [""]
    parts += [FOOTER]
    (out / "README.md").write_text("\n".join(parts))


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


def _forgetting_plot(fg: pd.DataFrame, refs: pd.DataFrame, path: Path) -> None:
    fig = new_figure(figsize=(8, 4))
    ax = fig.add_subplot()
    labels, before, after = [], [], []
    for experts, group in fg.groupby("experts"):
        skill = {"ua": UA, "math": MATH}[experts]
        for weighting in ("uniform", "threshold", "linear_rank", "lines"):
            row = group[(group.method == "ta") & (group.weighting == weighting) & (group.lam == -1.0)]
            if len(row):
                labels.append(f"{experts}\n{weighting}")
                before.append(refs[refs.evaluated == experts].iloc[0][skill])
                after.append(row.iloc[0][skill])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], before, 0.4, label="expert, before")
    ax.bar([x + 0.2 for x in xs], after, 0.4, label="TA, lambda -1")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("target ability (ua compliance / math)")
    ax.legend()
    save_figure(fig, path)


def _tradeoff_plot(table: pd.DataFrame, path: Path) -> None:
    """Task score against perplexity, one marker per weighting (uniform: plain methods)."""
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for weighting, group in table.groupby("weighting"):
        ax.scatter(group[PPL], group["task_score"], label=weighting, s=18)
    ax.set_xlabel("token perplexity (lower: more utility kept)")
    ax.set_ylabel("task score")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _lambda_plot(table: pd.DataFrame, path: Path) -> None:
    fig = new_figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for weighting, group in table.groupby("weighting"):
        group = group.sort_values("lam")
        left.plot(group["lam"], group["task_score"], marker="o", label=weighting)
        right.plot(group["lam"], group[PPL], marker="o", label=weighting)
    left.set_xlabel("lambda")
    left.set_ylabel("task score")
    right.set_xlabel("lambda")
    right.set_ylabel("token perplexity")
    left.legend()
    save_figure(fig, path)


HEADER = """# Experiments on the embedded zoo

Written by `python experiments/summarize.py outputs/experiments experiments` (the last step of
`make reproduce`) from the sweeps' `results.csv`: every number below comes from a run.

- Family: `zoo=small` (8 blocks, 4.03M parameters), build seed 0; built once, outside the
  experiments' time (1,093 s on the 2 cores: docs/zoo.md).
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
