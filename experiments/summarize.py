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
- Fisher merging and RegMean (multitask_data_aware) appear in multitask's tables as two more
  methods (uniform weights, lambda 1).
- lata_vs_learned (rules fixed before the runs):
  1. Does any layer weighting beat uniform? Per expert set and method (TA, TIES), each weighting at
     its best lambda minus uniform at its best lambda, against two standard errors of uniform's
     score: "ahead", "behind" or "cannot tell". The weightings: multitask's (uniform, linear_rank,
     log_rank, lines at lambda 0.7 and 1), shuffle_control's on math+code (mean over its seeds),
     and the learned ones (lambda 1 only; per objective, the mean over the calibration seeds, their
     sd shown).
  2. How close are LATA's weights to the learned ones? Per expert set, objective and expert, at
     lambda 1 (TA's runs: the weights are learned once for TA and TIES), Spearman's rho between the
     learned block weights and LATA's ranking (the negated similarity to the instruction vector:
     the less instruction-like a block, the higher LATA weighs it), averaged over the seeds. The
     seeds' own agreement is the mean rho between the learned weights of every two seeds. A mean
     rho at or beyond the two-sided 5% critical value of one rho over the family's blocks (exact,
     from every permutation; conservative for a mean of seeds) is "same ranking" or "opposite
     ranking"; else "no rank agreement".
  3. What it says about the paper's claim, per expert set: where a learned weighting is "ahead" of
     uniform for a method, the family has layer structure that data can find, and LATA's
     similarities find it only if their ranking agrees (rule 2) with that objective's weights; where
     no learned weighting is ahead, the family shows no layer structure that a weighting learned
     from these examples exploits, and LATA's loss to uniform does not show that the similarities
     pick the wrong blocks.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from functools import lru_cache
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
    "multitask_data_aware": "lata experiment=multitask_data_aware",
    "multitask_seeds": "lata experiment=multitask_seeds",
    "forgetting": "lata experiment=forgetting",
    "ablation_weighting": "lata experiment=ablation_weighting",
    "ablation_threshold": "lata experiment=ablation_threshold",
    "lambda_sweep": "lata experiment=lambda_sweep",
    "lata_vs_lines": "lata experiment=lata_vs_lines",
    "shuffle_control": "lata experiment=shuffle_control",
    "lata_vs_learned": "lata experiment=lata_vs_learned",
}
#: the data-aware methods (their rows join multitask's tables)
DATA_AWARE = ("fisher", "regmean")
#: the learned weighting's rows in lata_vs_learned, one label per objective
LEARNED = {"entropy": "learned (entropy)", "likelihood": "learned (likelihood)"}


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
        data_aware = tables.get("multitask_data_aware")
        mt = tables["multitask"] if data_aware is None else pd.concat([tables["multitask"], data_aware])
        parts += _multitask(merged_rows(mt), figures, claims)
    if tables.get("multitask_seeds") is not None:
        parts += _multitask_seeds(merged_rows(tables["multitask_seeds"]))
    if tables.get("forgetting") is not None and refs is not None:
        parts += _forgetting(merged_rows(tables["forgetting"]), refs, figures, claims)
    parts += _ablations(tables, figures, claims)
    if tables.get("lata_vs_lines") is not None:
        parts += _lata_vs_lines(merged_rows(tables["lata_vs_lines"]), tables.get("shuffle_control"), claims)
    if tables.get("lata_vs_learned") is not None and tables.get("multitask") is not None:
        parts += _lata_vs_learned(merged_rows(tables["lata_vs_learned"]), merged_rows(tables["multitask"]),
                                  tables.get("shuffle_control"), root / "lata_vs_learned", figures, claims)
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
            f"{pct(own['code'][CODE])}% on code; docs/zoo.md lists builds of the same config in other environments "
            "that scored otherwise (the build is deterministic within an environment, not across them), so "
            "numbers compare within one run of make reproduce only")


def merged_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table.evaluated == "merged"]


def _multitask(mt: pd.DataFrame, figures: Path, claims: list) -> list[str]:
    """Per expert set, the best lambda of every method x weighting; for math + code, the figures
    and the claims of LATA against uniform weights."""
    free, aware = mt[~mt.method.isin(DATA_AWARE)], mt[mt.method.isin(DATA_AWARE)]
    lams = ", ".join(f"{x:g}" for x in sorted(free.lam.unique()))
    intro = (f"`{COMMANDS['multitask']}`: {len(free)} points ({free.experts.nunique()} expert sets x "
             f"{free.method.nunique()} methods x {free.weighting.nunique()} weightings x lambda {lams}), DARE's and "
             "DELLA's with mask seed 0 (their spread over seeds: multitask_seeds); each row is the best lambda of "
             "its line.")
    if not aware.empty:
        intro += (f" With them, `{COMMANDS['multitask_data_aware']}`: {len(aware)} points, "
                  f"{' and '.join(sorted(aware.method.unique()))} with uniform weights at lambda 1 from 32 "
                  "calibration examples per expert (the zoo's training examples of its task).")
    parts = ["## multitask", "", intro, ""]
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


def _lata_vs_learned(learned: pd.DataFrame, mt: pd.DataFrame, shuffle: pd.DataFrame | None, sweep: Path,
                     figures: Path, claims: list) -> list[str]:
    """Rules 1-3 of lata_vs_learned (the module's docstring): every weighting against uniform, the
    rank agreement of LATA's weights with the learned ones, and what the two say together."""
    sets, methods = set(learned.experts), set(learned.method)
    others = [mt[mt.experts.isin(sets) & mt.method.isin(methods)
                 & mt.weighting.isin(["uniform", *LATA, "lines"])].assign(label=lambda f: f.weighting)]
    if shuffle is not None:
        shuffled = merged_rows(shuffle)
        others.append(shuffled[shuffled.method.isin(methods)].assign(label="shuffled"))
    lv = pd.concat([*others, learned.assign(label=[LEARNED[o] for o in learned.objective])], ignore_index=True)
    agg = lv.groupby(["experts", "method", "label", "lam"]).agg(
        n=("task_score", "size"), score=("task_score", "mean"), score_sd=("task_score", "std"),
        **{c: (c, "mean") for c in (MATH, CODE, UA, PPL)}).reset_index()
    best = best_by_score(agg, ["experts", "method", "label"], score="score")
    order = {w: i for i, w in enumerate(["uniform", *LATA, "lines", "shuffled", *LEARNED.values()])}
    best = best.sort_values(["experts", "method", "label"], key=lambda c: c.map(order) if c.name == "label" else c)
    view = best[["experts", "method", "label", "lam", "n"]].rename(columns={"label": "weighting"})
    view["math %"], view["code %"] = best[MATH].map(pct), best[CODE].map(pct)
    view["ua %"], view["ppl"] = best[UA].map(pct), best[PPL].map(lambda x: f"{x:.1f}")
    view["score %"] = [pct(m) if n == 1 else f"{pct(m)} ± {pct(sd)}" for m, sd, n in
                       zip(best.score, best.score_sd, best.n)]
    parts = ["## lata_vs_learned", "", f"`{COMMANDS['lata_vs_learned']}`: {len(learned)} points of learned weights "
             f"(lambda 1), beside multitask's points of the same expert sets and methods and shuffle_control's "
             "(math+code). Each row the lambda with the best (mean) task score; rows over seeds (n > 1) give the "
             "mean ± sd over them (calibration samples for the learned weights, permutations for shuffled).", "",
             md_table(view), ""]
    beats, ahead = [], {}
    for (experts, method), group in best.groupby(["experts", "method"]):
        uniform = group[group.label == "uniform"]
        if uniform.empty:
            continue
        u = uniform.iloc[0]
        se = score_se(u)
        for _, row in group[group.label != "uniform"].iterrows():
            d = row.score - u.score
            word = "cannot tell" if abs(d) < 2 * se else "ahead" if d > 0 else "behind"
            if word == "ahead" and row.label in LEARNED.values():
                ahead.setdefault(experts, []).append((method, row.label))
            beats.append(f"{experts}, {method}: {row.label} {pct(row.score)}% vs uniform {pct(u.score)}% "
                         f"(diff {100 * d:+.1f}, 2 SE = {200 * se:.1f}): {word}")
    claims.append(("Does any layer weighting beat uniform on this family? (lata_vs_learned, rule 1)", beats))
    ranks = _learned_ranks(learned, sweep)
    if ranks.empty:
        return parts
    parts += ["Rank agreement at lambda 1 (TA's runs): Spearman's rho of the learned block weights with LATA's "
              f"ranking (the negated similarity) and between seeds; critical value {ranks.crit.iloc[0]:.3f} "
              f"({ranks.blocks.iloc[0]} blocks, two-sided 5%).", "",
              md_table(ranks[["experts", "objective", "expert", "seeds", "rho_lata", "rho_seeds", "agreement"]]), ""]
    shown = learned[(learned.method == "ta") & (learned.objective == "likelihood") & (learned.calibration_seed == 0)]
    picture = sweep / shown.run.iloc[0] / "layer_analysis.png" if not shown.empty else None
    if picture is not None and picture.is_file():
        shutil.copyfile(picture, figures / "learned_vs_lata.png")
        parts += [f"![learned (likelihood, calibration seed 0) and LATA's weights, {shown.experts.iloc[0]}]"
                  "(figures/learned_vs_lata.png)", ""]
    claims.append(("LATA's weights against the learned ones (rule 2)", [
        f"{r.experts}, {r.objective}, expert {r.expert}: rho with LATA {r.rho_lata} over {r.seeds} seeds; between "
        f"seeds {r.rho_seeds}: {r.agreement}" for r in ranks.itertuples()]))
    says = []
    for experts in sorted(lv.experts.unique()):
        found = ahead.get(experts, [])
        if not found:
            says.append(f"{experts}: no learned weighting is ahead of uniform (TA or TIES): this family shows no "
                        "layer structure that weights learned from these examples exploit, and LATA's loss to "
                        "uniform does not show that the similarities pick the wrong blocks")
            continue
        for method, label in found:
            objective = next(o for o, name in LEARNED.items() if name == label)
            agree = ranks[(ranks.experts == experts) & (ranks.objective == objective)].agreement
            match = "finds it" if (agree == "same ranking").all() and len(agree) else "miss it"
            says.append(f"{experts}: {label} is ahead of uniform with {method}: the family has layer structure that "
                        f"data can find; LATA's similarities {match} (rule 2: "
                        f"{', '.join(agree) or 'no weights read'})")
    claims.append(("What this says about the paper's claim that the similarities pick the layers to keep "
                   "(rule 3)", says))
    return parts


def _learned_ranks(lv: pd.DataFrame, sweep: Path) -> pd.DataFrame:
    """Per expert set, objective and expert: the mean rho (over seeds) of the learned weights with
    LATA's ranking and between seeds, and the verdict of rule 2."""
    rows = lv[(lv.weighting == "learned") & (lv.method == "ta") & (lv.lam == 1.0)]
    found = {}
    for _, row in rows.iterrows():
        file = sweep / row.run / "layer_analysis.json"
        if file.is_file():
            data = json.loads(file.read_text())
            found.setdefault((row.experts, row.objective), []).append(data)
    out = []
    for (experts, objective), analyses in sorted(found.items()):
        for expert in sorted(analyses[0]["weights"]):
            learned = [pd.Series(a["weights"][expert]) for a in analyses]
            lata = -pd.Series(analyses[0]["similarities"][expert])
            rho = [spearman(w, lata) for w in learned]
            pairs = [spearman(a, b) for i, a in enumerate(learned) for b in learned[i + 1:]]
            crit = spearman_critical(len(lata))
            mean = sum(rho) / len(rho)
            word = "same ranking" if mean >= crit else "opposite ranking" if mean <= -crit else "no rank agreement"
            spread = f" ± {pd.Series(rho).std():.2f}" if len(rho) > 1 else ""
            out.append({"experts": experts, "objective": objective, "expert": expert, "seeds": len(rho),
                        "rho_lata": f"{mean:+.2f}{spread}",
                        "rho_seeds": f"{sum(pairs) / len(pairs):+.2f}" if pairs else "",
                        "agreement": word, "crit": crit, "blocks": len(lata)})
    return pd.DataFrame(out)


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rho (average ranks for ties); 0 where either side is constant."""
    ra, rb = a.rank(), b.rank()
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(ra.corr(rb))


@lru_cache(maxsize=None)
def spearman_critical(n: int, level: float = 0.05) -> float:
    """The smallest |rho| whose two-sided p under independence is at most ``level``: exact, from
    every permutation of n ranks (n <= 9), else the normal approximation z / sqrt(n - 1)."""
    if n > 9:
        from statistics import NormalDist
        return NormalDist().inv_cdf(1 - level / 2) / math.sqrt(n - 1)
    from bisect import bisect_left
    from itertools import permutations

    base = n * (n * n - 1)
    values = sorted(round(abs(1 - 6 * sum((i - p) ** 2 for i, p in enumerate(perm)) / base), 12)
                    for perm in permutations(range(n)))
    for v in sorted(set(values)):
        if (len(values) - bisect_left(values, v)) / len(values) <= level:
            return v
    return 1.0


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
  experiments' time (about 18 minutes on the 2 cores: docs/zoo.md); {build}.
- Held-out sets: 200 math, 100 code, 100 forbidden requests (ua), held-out Shakespeare for
  perplexity. Scores in %, perplexity as token perplexity. Greedy decoding: the only randomness
  is in DARE's and DELLA's masks (multitask_seeds), in the shuffled control (shuffle_control) and
  in the calibration examples drawn for the learned weights (lata_vs_learned).
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
