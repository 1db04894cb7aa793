"""Model sources (lata.sources): one registry of ``model.embedded`` names, no branches elsewhere."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lata import sources
from lata.config import ConfigError
from lata.sources import FamilyPaths, family_paths, source


def model(**values):
    return OmegaConf.create({"embedded": None, "base": None, "instruct": None, "experts": {}, "target": None,
                             **values})


def test_every_model_config_names_a_registered_source_and_every_source_has_one():
    import yaml

    from lata.config import config_dir

    docs = [yaml.safe_load(f.read_text()) for f in (Path(config_dir()) / "model").glob("*.yaml")]
    named = {doc.get("model", doc).get("embedded") for doc in docs}  # a global-package file nests it under model
    assert named <= set(sources.SOURCES), named - set(sources.SOURCES)
    assert set(sources.SOURCES) <= named, set(sources.SOURCES) - named  # a source no config can reach


def test_an_evaluation_only_source_is_refused_for_a_merge_before_it_is_asked_for_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    monkeypatch.setattr(sources, "EVALUATION_ONLY", set(sources.EVALUATION_ONLY))
    calls = []

    @source("lone", merges=False)
    def lone(model, zoo, cache_dir, progress, device):
        calls.append(1)
        return FamilyPaths(None, "instruct", {})

    lone_model = model(embedded="lone", name="lone")
    sources.check_merge(lone_model, "none")  # evaluating it is fine
    with pytest.raises(ConfigError, match=r"model=lone is a single instruct model .* evaluated \(merge=none\), not "
                                          r"merged with merge=ties"):
        sources.check_merge(lone_model, "ties")
    assert calls == []
    assert "smollm2" in sources.EVALUATION_ONLY and None not in sources.EVALUATION_ONLY


def test_an_unknown_source_is_refused_naming_the_known_ones(tmp_path):
    message = r"model.embedded='nope' is not allowed; choose one of: zoo, smollm2 \(or null\)"
    with pytest.raises(ConfigError, match=message):
        family_paths(model(embedded="nope"), None, str(tmp_path))


def test_given_paths_resolve_a_target_role(tmp_path):
    got = family_paths(model(base="b", instruct="i", experts={"math": "m"}, target="math"), None, str(tmp_path))
    assert got == FamilyPaths("b", "i", {"math": "m"}, target="m")
    assert got.role("math") == "m" and family_paths(model(base="b", instruct="i", experts={"math": "m"},
                                                          target="elsewhere"), None, tmp_path).target == "elsewhere"
    with pytest.raises(ConfigError, match="model.which='code' is not allowed; choose one of: base, instruct, math"):
        got.role("code")


def test_a_new_source_is_one_registered_function(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    calls = []

    @source("mine")
    def mine(model, zoo, cache_dir, progress, device):
        calls.append((zoo, cache_dir, progress, device))
        return FamilyPaths(None, str(cache_dir / "instruct"), {})

    assert family_paths(model(embedded="mine"), "zoo-cfg", str(tmp_path), progress=False, device="cuda") \
        == FamilyPaths(None, str(tmp_path / "instruct"), {})
    assert calls == [("zoo-cfg", tmp_path, False, "cuda")]
    with pytest.raises(ValueError, match="registered twice"):
        source("mine")(mine)
    with pytest.raises(ConfigError, match="choose one of: zoo, smollm2, mine"):
        family_paths(model(embedded="other"), None, str(tmp_path))


def test_merging_smollm2_is_refused_before_its_checkpoint_is_converted(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from lata.config import config_dir, register_configs
    from lata.run.runner import run

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=smollm2", "merge=ties", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path}", "progress=false"])
    monkeypatch.setattr(sources, "SOURCES", {**sources.SOURCES, "smollm2": lambda *a: pytest.fail("converted")})
    with pytest.raises(ConfigError, match=r"model=smollm2 is a single instruct model .*not merged with merge=ties"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()
