"""Stored points as tables: each run's ``summary.json`` -> one pandas row; the best point of a line.

Decisions:
- The parameter columns are the keys the method and weighting registries declare
  (``lata.methods.METHODS``, ``lata.weightings.WEIGHTINGS``); a row fills only those its own
  method and weighting have (density: TIES, Breadcrumbs, DELLA; p: DARE; drop: the rank
  weightings; ...), so an unused key neither splits lines nor tells two identical merges apart,
  and a column no row fills is left out. A method that cannot be imported here (a user's own,
  given by dotted path) keeps every key its summary recorded. Reference rows (``merge=none``)
  have no merge parameters; ``evaluated`` names the unmerged role (``merged`` for every merge).
- ``experts`` (the merged experts), ``target``, ``anchor``, ``normalize`` and ``rest_weight``
  are columns only where the runs differ in them (a sweep over expert sets or an ablation).
- Two runs of the same point (the runner's ``point`` key: same checkpoint contents, merge,
  weighting and benchmark; without that key, the family, method and weighting with their used
  parameters), e.g. a resumed sweep, keep one row: the most recently written summary.json.
- A line is a method x weighting; when the sweep also varies lams or any parameter column, the
  varying values join the line's name so one line never mixes them.
- The best point of a line has the highest task score, the lower lambda on a tie
  (``best_by_score``: the one rule for every table of points).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from lata.config import ROLES, UNMERGED, MergeConfig, WeightingConfig, role_map
from lata.evaluation.tasks import LOWER_IS_BETTER, mean_task_score, primary_metric
from lata.methods import METHODS
from lata.registry import ConfigError, Registry
from lata.weightings import WEIGHTINGS

log = logging.getLogger("lata")

#: what a point merged besides its method and weighting; a column only where a sweep varies it
#: columns shown where they vary among the merged rows; ``calibration`` and ``calibration_seed`` only on
#: points that use calibration data (the source and the seed its examples were drawn with)
CONTEXT_COLUMNS = ["experts", "target", "anchor", "normalize", "rest_weight", "calibration", "calibration_seed"]


def parameter_columns() -> list[str]:
    """Every key a registered method or weighting declares, in registry order, once."""
    keys = [k for registry in (METHODS, WEIGHTINGS) for name in registry.names() for k in registry.parameters(name)]
    return list(dict.fromkeys(keys))


def point_columns() -> list[str]:
    return ["run", "method", "lam", "lams", "weighting", *parameter_columns(), *CONTEXT_COLUMNS, "evaluated"]


def _own_keys(registry: Registry, name: str | None, node: dict, common: tuple[str, ...]) -> list[str]:
    """The keys part ``name`` declares; for a part that cannot be imported, every recorded key."""
    try:
        return list(registry.parameters(name))
    except ConfigError:
        return [k for k in node if k not in common]


# --------------------------------------------------------------------------- one run -> one row

def effective_point(summary: dict) -> dict:
    """The parameters that define a run's point: those its method and weighting use."""
    merge, weighting = summary.get("merge") or {}, summary.get("weighting") or {}
    method = merge.get("method")
    if method == UNMERGED:
        return {"method": UNMERGED, "evaluated": summary.get("evaluated")}
    point = {k: merge.get(k) for k in MergeConfig.COMMON}
    point["lams"] = point["lams"] or {}
    point.update({k: merge.get(k) for k in _own_keys(METHODS, method, merge, MergeConfig.COMMON)})
    name = weighting.get("name")
    point["weighting"] = name
    point.update({k: weighting.get(k) for k in WeightingConfig.COMMON if k != "name"})
    point.update({k: weighting.get(k) for k in _own_keys(WEIGHTINGS, name, weighting, WeightingConfig.COMMON)})
    calibration = summary.get("calibration")
    if calibration:
        point.update(calibration=calibration.get("name"), calibration_seed=calibration.get("seed"))
    return point


def result_row(summary: dict, run: str = ".") -> dict:
    """One results row: ``point_columns()``, every numeric metric as ``task/metric``, task_score."""
    point = effective_point(summary)
    columns = point_columns()
    unlisted = [k for k in point if k not in columns]
    row = {c: _cell(point.get(c)) for c in columns + unlisted}  # unlisted: a user method's recorded keys
    family = summary.get("family") or {}
    if point.get("method") != UNMERGED:  # the experts merged and where (model.target), by role or path
        row["experts"] = "+".join(sorted(family.get("experts") or {})) or None
        row["target"] = _role_of(family.get("target"), family)
    row["run"] = run
    row["lams"] = ",".join(f"{k}={v:g}" for k, v in sorted(point.get("lams", {}).items())) or None
    row["evaluated"] = point.get("evaluated") or "merged"
    metrics = summary.get("metrics") or {}
    for task in sorted(metrics):
        for name in sorted(metrics[task]):
            value = metrics[task][name]
            if name != "samples" and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{task}/{name}"] = float(value)
    row["task_score"] = mean_task_score(metrics)
    return row


def point_name(row: dict) -> str:
    """A short human name of a row's point, e.g. ``ties+log_rank lam=0.5 drop=0.5 density=0.2``."""
    if row.get("evaluated", "merged") != "merged":
        return f"{row['evaluated']} (unmerged)"
    extra = " ".join(f"{k}={fmt(row[k])}" for k in ["lams", *parameter_columns()] if present(row.get(k)))
    return f"{row['method']}+{row['weighting']} lam={fmt(row['lam'])}" + (f" {extra}" if extra else "")


def _role_of(path: str | None, family: dict) -> str | None:
    """A target as the family's role name where it is one of the family's checkpoints (an
    expert's name first, where one checkpoint fills two roles)."""
    if not path:
        return None
    roles = role_map(family.get("base"), family.get("instruct"), family.get("experts") or {})
    return next((role for role in sorted(roles, key=lambda r: r in ROLES) if roles[role] == path), path)


def _cell(value):
    """A list parameter (explicit weights) as one table cell."""
    return ",".join(f"{x:g}" for x in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------- a directory -> table

def _summaries(root: Path) -> list[tuple[float, Path, dict]]:
    """(mtime, file, summary) of every readable summary.json under ``root`` outside hidden and
    wandb folders."""
    found = []
    for file in root.rglob("summary.json"):
        parts = file.relative_to(root).parts[:-1]
        if any(p.startswith(".") or p == "wandb" for p in parts):
            continue
        try:
            summary = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", file, exc)
            continue
        if not isinstance(summary, dict):
            log.warning("skipping %s: not a JSON object", file)
            continue
        found.append((file.stat().st_mtime, file, summary))
    return found


def collect(path: str | os.PathLike) -> pd.DataFrame:
    """One row per point under ``path``, references first, then by method, weighting, lambda."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: give a run or sweep directory")
    found = _summaries(root)
    if not found:
        raise FileNotFoundError(f"no summary.json under {root}: give a run or sweep directory")
    rows: dict[str, dict] = {}
    for _, file, summary in sorted(found, key=lambda item: (item[0], str(item[1]))):  # newest last: it wins
        # the runner's point key (checkpoint contents, merge, weighting, benchmark) when present
        key = summary.get("point") or json.dumps([summary.get("family"), effective_point(summary)],
                                                 sort_keys=True, default=str)
        rows[key] = result_row(summary, run=file.parent.relative_to(root).as_posix())
    if len(rows) < len(found):
        log.info("%d duplicate run(s) of the same point: kept the newest of each", len(found) - len(rows))
    table = pd.DataFrame(list(rows.values()))
    metric_columns = sorted(c for c in table.columns if "/" in c)
    columns = point_columns() + [c for c in table.columns if c not in point_columns() and "/" not in c
                                 and c != "task_score"]
    merged = table["evaluated"] == "merged"
    columns = [c for c in columns if (c not in parameter_columns() or table[c].notna().any())
               and (c not in CONTEXT_COLUMNS or table.loc[merged, c].nunique(dropna=False) > 1)]
    table = table.reindex(columns=columns + metric_columns + ["task_score"])
    order = table.assign(_ref=table["evaluated"] == "merged")
    order = order.sort_values(["_ref", "method", "weighting", "lam", "evaluated", "run"], na_position="first",
                              kind="stable")
    return table.loc[order.index].reset_index(drop=True)


# --------------------------------------------------------------------------- lines and best points

def series_labels(table: pd.DataFrame) -> pd.Series:
    """Line name of each merged row: method + weighting, plus any parameter the sweep varies."""
    merged = table["evaluated"] == "merged"
    varying = [c for c in _series_params(table) if table.loc[merged, c].dropna().nunique() > 1]

    def label(row: pd.Series) -> str | None:
        if row["evaluated"] != "merged":
            return None
        extra = " ".join(f"{c}={fmt(row[c])}" for c in varying if present(row[c]))
        return f"{row['method']} + {row['weighting']}" + (f" {extra}" if extra else "")

    return table.apply(label, axis=1)


def best_by_score(frame: pd.DataFrame, keys: list[str], score: str = "task_score") -> pd.DataFrame:
    """Per group of ``keys``, the row with the highest ``score``, the lower ``lam`` on a tie
    (a row without a score only where its group has none), ordered by ``keys``."""
    ordered = frame.sort_values([*keys, score, "lam"], ascending=[True] * len(keys) + [False, True], kind="stable")
    return ordered.groupby(keys, sort=True).head(1).reset_index(drop=True)


def best_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per line (``series_labels``, as the ``series`` column), the merged row with the highest
    task_score (lower lambda on a tie)."""
    rows = table.assign(series=series_labels(table))
    rows = rows[(rows["evaluated"] == "merged") & rows["task_score"].notna()]
    if rows.empty:
        return rows
    return best_by_score(rows, ["series"])


def point_part(table: pd.DataFrame) -> list[str]:
    """The table's columns that describe points (not metrics)."""
    return [c for c in table.columns if "/" not in c and c != "task_score"]


def _series_params(table: pd.DataFrame) -> list[str]:
    return [c for c in point_part(table) if c not in ("run", "method", "lam", "weighting", "evaluated")]


def primary_columns(table: pd.DataFrame) -> list[str]:
    """``task/<primary metric>`` of every task in the table that reports it."""
    tasks = sorted({c.split("/", 1)[0] for c in table.columns if "/" in c})
    return [f"{t}/{primary_metric(t)}" for t in tasks if f"{t}/{primary_metric(t)}" in table.columns]


def lower_is_better(column: str) -> bool:
    """Whether a ``task/metric`` column improves downwards (perplexities, NLL)."""
    return column.split("/", 1)[-1] in LOWER_IS_BETTER


# --------------------------------------------------------------------------- cells as text

def present(value) -> bool:
    """A value that is neither None nor NaN."""
    return value is not None and not (isinstance(value, float) and value != value)


def fmt(value) -> str:
    """A cell as text: empty where missing, floats to 4 significant digits."""
    if not present(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
