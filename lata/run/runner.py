"""One job: family -> layer analysis -> weights -> merge -> evaluation -> the run directory.

Writes to ``run_dir``: ``config.yaml`` (resolved), ``layer_analysis.json``/``.csv`` (per expert
and layer: similarity, norms, weight), ``layer_analysis.png`` (heatmap), ``metrics.json``
(benchmark task -> metric -> value), ``summary.json`` and, with ``save_model``, the merged
checkpoint. The merged weights are evaluated in memory: copied into the loaded anchor model,
never saved and reloaded. ``merge=none`` evaluates ``model.which`` unmerged. Every file is
written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lata.run import caches, store

from lata.io import outputs
from lata.io.atomic import write_json_atomic, write_text_atomic
from lata.accel.compute import check_device
from lata.config import UNMERGED, WeightingConfig, to_plain, validate, validate_merge, validate_weighting
from lata.io.digests import DamagedFile, use_memo_dir
from lata.plan import MergePlan, output_bytes, plan_merge
from lata.sinks import merge_into_model, merge_to_dir
from lata.results.mergekit import RECIPE_FILE, recipe_yaml
from lata.results.plots import HeatmapProcess
from lata.sources import FamilyPaths, check_merge, family_paths, named_inputs

log = logging.getLogger("lata")


def format_layer_table(plan: MergePlan) -> str:
    """Similarity / weight per expert and layer, as aligned text."""
    sims = plan.analysis.similarities
    L = plan.family.num_layers
    lines = ["expert      " + " ".join(f"{f'L{l}':>6}" for l in range(L))]
    for k in plan.experts:
        lines.append(f"{k[:8]:<8} s  " + " ".join(f"{s:6.3f}" for s in sims[k]))
        lines.append(f"{'':<8} w  " + " ".join(f"{w:6.3f}" for w in plan.weights[k]))
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the main job for a composed config; return a summary dict (also written to disk).

    The family's checkpoints come from the source ``model.embedded`` names (lata.sources).
    Within one process (a multirun with the basic launcher) families, layer analyses and the
    evaluation model are reused between points (lata.run.caches); a point whose results are stored
    already (lata.run.store: keyed by the content of every input, checked against its digests) is
    restored instead of recomputed when ``resume`` is true, once the family has been opened and
    checked as a fresh run checks it. With ``save_model`` the run ends with that checkpoint
    whole (merged, copied from the stored point's own output, or already there: ``_resume``) or
    fails; the output path is checked before any tensor is read (``lata.io.outputs``) and locked
    for the rest of the job. No directory the run writes may lie inside an input.
    """
    validate(cfg)
    check_device(cfg.device)
    use_memo_dir(Path(cfg.paths.cache_dir) / "digests")  # file digests, remembered for every process
    run_dir = Path(run_dir)
    merging = cfg.merge.method != UNMERGED
    saving = bool(cfg.save_model) and merging
    protected = {"run directory": run_dir, "results directory": cfg.paths.results_dir,
                 "cache directory": cfg.paths.cache_dir}
    if saving:  # refuse before any work, on the inputs named in the config
        outputs.check_target(cfg.save_model, overwrite=cfg.overwrite, inputs=named_inputs(cfg.model),
                             protected=protected, defer_lata=True)
    check_merge(cfg.model, cfg.merge.method)
    paths = family_paths(cfg.model, cfg.zoo, cfg.paths.cache_dir, progress=cfg.progress, device=str(cfg.device))
    outputs.check_outside_inputs(protected, paths.roles())
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    with outputs.writer_lock(cfg.save_model) if saving and not cfg.dry_run else contextlib.nullcontext():
        return _run(cfg, run_dir, paths, merging, saving, protected)


#: the SLURM variables a job's summary records (as slurm.job_id, ...)
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
              "SLURM_JOB_PARTITION")


def _run(cfg: DictConfig, run_dir: Path, paths: FamilyPaths, merging: bool, saving: bool,
         protected: dict) -> dict:
    slurm = {k.removeprefix("SLURM_").lower(): os.environ[k] for k in SLURM_KEYS if k in os.environ}
    if slurm:  # a job of a SLURM cluster (hydra/launcher=submitit_slurm)
        log.info("running as SLURM job %s on %s", slurm.get("job_id"), slurm.get("job_nodelist", "?"))
    roles = paths.roles() if merging else {cfg.model.which: paths.role(cfg.model.which)}
    summary: dict = {"family": {"base": paths.base, "instruct": paths.instruct, "experts": paths.experts,
                                **({"target": paths.target} if paths.target else {})},
                     "merge": to_plain(cfg.merge), "weighting": to_plain(cfg.weighting), "run_dir": str(run_dir),
                     "point": None}
    if slurm:
        summary["slurm"] = slurm
    if merging and store.uses_calibration(cfg):
        summary["calibration"] = to_plain(cfg.calibration)
    family = _open_family(cfg, paths, summary, saving, protected) if merging else None
    if family is not None and cfg.dry_run:
        log.info("dry run: family of %s checked (%d layers, %d tensors); nothing merged",
                 family.architecture.model_type, family.num_layers, len(family.tensor_names))
        write_json_atomic(run_dir / "summary.json", summary)
        return summary
    key = model_key = None
    if not cfg.dry_run:  # the inputs were checked as a fresh run checks them: a stored point may be restored
        key = summary["point"] = store.point_key(cfg, roles, heldout=paths.heldout)
        model_key = store.model_key(cfg, roles) if saving else None
        stored = store.stored_result(cfg.paths.results_dir, key) if cfg.resume else None
        if stored is not None and cfg.export == "mergekit" and RECIPE_FILE not in stored.files:
            log.info("point %s: results exist in %s, but no mergekit recipe: computing the point again", key,
                     stored.folder)
            stored = None
        if stored is not None:
            resumed = _resume(cfg, stored, run_dir, key, model_key, roles, protected)
            if resumed is not None:
                return resumed
    drawing: HeatmapProcess | None = None
    if family is None:
        summary["evaluated"] = cfg.model.which
        model_dir = paths.role(cfg.model.which)
        model = (caches.evaluation_model(model_dir, cfg.model.dtype, cfg.device, reusable=False)
                 if cfg.benchmark.tasks else None)
    else:
        model_dir, model, drawing = _merge(cfg, family, run_dir, summary, saving, protected, key, model_key)
    if model is not None:
        _evaluate(cfg, model, model_dir, run_dir, paths, summary)
    elif not cfg.save_model:
        log.info("save_model is null and benchmark=none: only the layer analysis was written")
    if drawing is not None:
        drawing.wait()  # the PNG is part of the run directory
    write_json_atomic(run_dir / "summary.json", summary)
    if key is not None:
        store.store(cfg.paths.results_dir, key, run_dir)
    return summary


def _open_family(cfg: DictConfig, paths: FamilyPaths, summary: dict, saving: bool, protected: dict):
    """The family opened and checked (architecture, names, shapes, vocabulary, config) as every
    merge checks it, before any stored point is restored; the output place checked against the
    resolved inputs."""
    family = caches.open_family(paths.base, paths.instruct, paths.experts, paths.target, cfg.model.vocab)
    summary["family"].update(model_type=family.architecture.model_type, num_layers=family.num_layers,
                             tensors=len(family.tensor_names))
    inputs = {c.role: c.path for c in family.inputs}
    outputs.check_outside_inputs(protected, inputs)
    if saving:  # the family's resolved paths (hub ids), and room for the output, before any read
        outputs.check_target(cfg.save_model, overwrite=cfg.overwrite, protected=protected, inputs=inputs,
                             defer_lata=True)  # a stored point may find its model there already
        outputs.check_space(cfg.save_model, output_bytes(family, cfg.merge.anchor, cfg.out_dtype))
    return family


def _merge(cfg: DictConfig, family, run_dir: Path, summary: dict, saving: bool, protected: dict,
           key: str | None, model_key: str | None):
    """Pass 1 (or its cache), the plan, the layer analysis files, the saved model and the merged
    weights in the evaluation model: (the directory the model loads from, the model or None,
    the heatmap being drawn)."""
    analysis = caches.family_analysis(family, cfg.paths.cache_dir, device=cfg.device, progress=cfg.progress,
                                     threads=cfg.threads)
    caches.load_selections(family, cfg.paths.cache_dir)  # earlier processes' magnitude selections
    kind = validate_merge(cfg.merge).statistic
    statistics = caches.calibration_statistics(cfg, family, kind) if kind is not None else None
    learned = caches.learned_weights(cfg, family) if validate_weighting(cfg.weighting).needs_learning else None
    plan = plan_merge(family, cfg.merge, cfg.weighting, device=cfg.device, analysis=analysis,
                      progress=cfg.progress, threads=cfg.threads, statistics=statistics, learned_weights=learned)
    drawing = write_layer_analysis(plan, run_dir, f"{cfg.merge.method} + {cfg.weighting.name}",
                                   learned=learned is not None)
    if cfg.export == "mergekit":
        recipe = write_text_atomic(run_dir / RECIPE_FILE, recipe_yaml(plan))
        summary["mergekit_recipe"] = str(recipe)
        log.info("mergekit recipe written to %s", recipe)
    if saving and outputs.holds_model(cfg.save_model, model_key):
        # an earlier run of this point saved its model, then failed before its results were stored
        summary["saved_model"] = str(outputs.absolute(cfg.save_model))
        log.info("%s already holds this point's merged model (every file matches its digest): not written again",
                 summary["saved_model"])
    elif saving:
        summary["saved_model"] = str(merge_to_dir(plan, cfg.save_model, out_dtype=cfg.out_dtype,
                                                  overwrite=cfg.overwrite, shard_size=cfg.shard_size,
                                                  progress=cfg.progress, protected=protected,
                                                  record={"model_key": model_key, "point": key}))
        log.info("merged model written to %s", summary["saved_model"])
    model_dir = str(plan.vocab_source.path)  # the output's vocabulary, tokenizer and config
    model = None
    if cfg.benchmark.tasks:
        model = caches.evaluation_model(model_dir, cfg.model.dtype, cfg.device, reusable=True)
        try:
            merge_into_model(plan, model, progress=cfg.progress)
        except BaseException:
            caches.forget_model()  # possibly half-written
            raise
    caches.save_selections(family, cfg.paths.cache_dir)
    return model_dir, model, drawing


def _evaluate(cfg: DictConfig, model, model_dir: str, run_dir: Path, paths: FamilyPaths, summary: dict) -> None:
    from lata.evaluation.harness import evaluate, format_metrics

    tokenizer = caches.load_tokenizer(model_dir)
    metrics = evaluate(model, tokenizer, cfg.benchmark, run_dir, Path(cfg.paths.cache_dir) / "data",
                       zoo_heldout=Path(paths.heldout) if paths.heldout else None)
    write_json_atomic(run_dir / "metrics.json", metrics)
    summary["metrics"] = metrics
    log.info("%s on %s:\n%s", cfg.benchmark.name, summary.get("evaluated", "the merged model"),
             format_metrics(metrics))


def _resume(cfg: DictConfig, stored: store.StoredPoint, run_dir: Path, key: str, model_key: str | None,
            roles: dict, protected: dict) -> dict | None:
    """A point whose results are stored: restored into ``run_dir``, with ``save_model`` holding
    its merged model (already there and whole, or copied from the stored run's own output,
    checked against its digests as it is copied); None where the model must be merged again.

    Decision: the results key (``store.point_key``) leaves out what changes only the written
    bytes (out_dtype, shard_size); those are in ``model_key``, which the marker of every
    written checkpoint carries, so a directory counts as saved only when it holds that key and
    its files match their digests.
    """
    if model_key is None:
        log.info("point %s: results exist in %s; skipped (resume=false recomputes)", key, stored.folder)
        return store.restore(stored, run_dir)
    save = outputs.absolute(cfg.save_model)
    if outputs.holds_model(save, model_key):
        log.info("point %s: results exist in %s and %s holds its merged model; skipped (resume=false "
                 "recomputes)", key, stored.folder, save)
        return store.restore(stored, run_dir, saved_model=str(save))
    source = store.stored_model(stored, model_key)
    if source is None:
        log.info("point %s: results exist in %s, but no whole copy of its merged model does: merging again",
                 key, stored.folder)
        return None
    try:
        outputs.copy_checkpoint(source, save, check=lambda target: outputs.check_target(
            target, overwrite=cfg.overwrite, inputs=roles, protected=protected))
    except DamagedFile as exc:
        log.warning("point %s: the merged model stored in %s is damaged (%s): merging again", key, source, exc)
        return None
    log.info("point %s: results exist in %s; its merged model was copied from %s to %s", key, stored.folder,
             source, save)
    return store.restore(stored, run_dir, saved_model=str(save))


def write_layer_analysis(plan: MergePlan, run_dir: Path, title: str, learned: bool = False) -> HeatmapProcess:
    """layer_analysis.json / .csv and the printed table now; the .png by the drawing process
    (``HeatmapProcess.shared()``). ``learned``: the weights were learned (``weighting=learned``):
    LATA's linear_rank weights are written and drawn beside them.

    Decision: the heatmap (matplotlib's import, a second or so of CPU once per process, and
    its drawing) is drawn from layer_analysis.json by ``python -m lata.results.plots``
    while this process merges and evaluates (on a thread it shared the GIL with the merge and
    gained nothing); the job waits for it before it counts as done.
    """
    analysis = plan.analysis.to_dict(plan.weights)
    if learned:  # LATA's own weights beside the learned ones, to compare
        scheme = validate_weighting(WeightingConfig(name="linear_rank"))
        analysis["beside"] = {"linear_rank (LATA)": {k: scheme.weights_for(s) for k, s in
                                                     plan.analysis.similarities.items()}}
    write_json_atomic(run_dir / "layer_analysis.json", analysis)
    write_text_atomic(run_dir / "layer_analysis.csv", plan.analysis.to_csv(plan.weights))
    heatmap = HeatmapProcess.shared().draw(run_dir / "layer_analysis.json", run_dir / "layer_analysis.png",
                                           f"{title}: similarity to the instruction vector")
    log.info("layer analysis (s = similarity to the instruction vector, w = layer weight):\n%s",
             format_layer_table(plan))
    return heatmap
