"""What a hyper-parameter search (``hparams_search=optuna``) maximises, from a job's metrics."""

from __future__ import annotations

from typing import Any

from lata.evaluation.tasks import mean_task_score, primary_metric


def objective(metrics: dict[str, dict[str, float]] | None, spec: Any) -> float | None:
    """The value a hyper-parameter search maximises: the mean task score (``objective.tasks``, or
    every scored task), subject to ``objective.ppl_ceiling`` on ``objective.ppl_task``.

    Decision: a point above the ceiling scores ``-1 - (ppl / ceiling - 1)``, below every feasible
    point (task scores lie in [0, 1]) yet still ordered, so the search is pulled back towards it.
    """
    if not metrics:
        return None
    score = mean_task_score(metrics, list(spec.tasks) if spec.tasks else None)
    if score is None:
        return None
    if spec.ppl_ceiling is not None:
        ppl_task = spec.ppl_task or next((t for t in metrics if primary_metric(t) == "token_perplexity"), None)
        if ppl_task is None or ppl_task not in metrics:
            raise ValueError(f"objective.ppl_ceiling is set but the suite has no perplexity task "
                             f"(objective.ppl_task={spec.ppl_task!r})")
        ppl = metrics[ppl_task][primary_metric(ppl_task)]
        if ppl > spec.ppl_ceiling:
            return -1.0 - (ppl / spec.ppl_ceiling - 1.0)
    return float(score)
