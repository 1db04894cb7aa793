"""The package as a user installs it: a wheel, used outside the checkout (configs inside it)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

import lata
import reference
from conftest import family_args, write_family

ROOT = Path(lata.__file__).resolve().parents[1]


def test_wheel_holds_the_configs_and_merges_from_another_directory(tmp_path):
    # build from a copy of the sources, so that the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    for name in ("lata", "conf"):
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("lata-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped and {f"lata/{p}" for p in shipped} <= names  # every config group and preset
    tasks = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lata" / "evaluation" / "task_yamls").glob("*.yaml")}
    assert tasks and tasks <= names  # LATA's lm-eval task YAMLs
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LATA_CONFIG_DIR"}
    env.update(PYTHONPATH=str(site), LATA_CACHE=str(tmp_path / "cache"), LATA_RESULTS=str(tmp_path / "results"))

    def run(*args):
        result = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    where = run("-c", "import lata, lata.config; print(lata.__file__); print(lata.config.config_dir())")
    module, conf = where.stdout.split()
    assert module.startswith(str(site)) and conf.startswith(str(site)) and Path(conf, "config.yaml").is_file()

    # the registries find their modules in the installed package
    found = run("-c", "from lata.methods import METHODS; from lata.weightings import WEIGHTINGS; "
                      "print(' '.join(METHODS.names() + WEIGHTINGS.names()))").stdout.split()
    assert {"della", "breadcrumbs_ties", "ties", "lines", "linear_rank"} <= set(found)
    dirs = write_family(tmp_path / "family")
    run("-m", "lata", *family_args(dirs), "dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}", "progress=false")
    assert (tmp_path / "dry" / "summary.json").is_file()
    out = tmp_path / "merged"
    run("-m", "lata", *family_args(dirs), "merge=ties", "weighting=log_rank", f"save_model={out}",
        f"hydra.run.dir={tmp_path / 'run'}", "progress=false")
    expected = reference.merge(dirs, method="ties", weighting="log_rank")
    got = reference.load(out)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=1e-5, atol=1e-7), name
