"""Summarise zoo reports (``python -m lata.zoo`` / benchmarks/zoo_seeds.sh) per configuration.

  python experiments/zoo_summary.py docs/zoo_reports

Files are named ``<configuration>-<device>-seed<N>.json``. For each configuration and device,
prints one Markdown row: mean and range over the seeds of instruct's scores, the experts' gains,
the best lambda of the TA math + code grid, the retention of each gain there, the perplexity
ratio, forgetting (ua compliance after subtracting the ua vector from the math + code + ua merge:
uniform weights, and LATA's threshold 0.95 from the ua expert), and on how many seeds every
point of the family's bar holds (``lata.zoo.report.check_bar``, recomputed from the numbers).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from lata.zoo.report import check_bar, retention


def stats(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} [{min(values):.3g}, {max(values):.3g}]"


def row(reports: list[dict]) -> dict[str, str]:
    cols: dict[str, list] = defaultdict(list)
    for r in reports:
        m, best = r["models"], r["best_lambda"]
        mc = r["ta_math_code"][str(best)]
        inst = m["instruct"]
        cols["instruct math / code"].append((inst["math"], inst["code"]))
        cols["gain math"].append(m["math"]["math"] - inst["math"])
        cols["gain code"].append(m["code"]["code"] - inst["code"])
        cols["best lambda"].append(best)
        cols["retention math"].append(retention(mc["math"], inst["math"], m["math"]["math"]))
        cols["retention code"].append(retention(mc["code"], inst["code"], m["code"]["code"]))
        cols["ppl ratio"].append(mc["ppl"] / inst["ppl"])
        forget = {f["from"] + "/" + f["weighting"]: f["scores"] for f in r["forgetting"].values()}
        cols["forget mcu uniform"].append(forget["math_code_ua/uniform"]["ua"])
        cols["forget ua threshold"].append(forget["ua/threshold"]["ua"])
        cols["bar"].append(all(p["ok"] for p in check_bar(r) if p["family"]))
    return {
        "instruct math / code": stats([a for a, _ in cols["instruct math / code"]]) + " / "
        + stats([b for _, b in cols["instruct math / code"]]),
        **{k: stats(v) for k, v in cols.items() if k not in ("instruct math / code", "bar")},
        "bar holds": f"{sum(cols['bar'])} of {len(cols['bar'])}",
    }


def main(folder: str) -> None:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted(Path(folder).glob("*.json")):
        match = re.fullmatch(r"(.+)-(cpu|cuda)-seed(\d+)", path.stem)
        if match:
            groups[match.group(1), match.group(2)].append(json.loads(path.read_text()))
    rows = {f"{name} ({device}, {len(rs)} seed{'s' if len(rs) > 1 else ''})": row(rs)
            for (name, device), rs in sorted(groups.items())}
    head = list(next(iter(rows.values())))
    print("| configuration | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells[h] for h in head) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/zoo_reports")
