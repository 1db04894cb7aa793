"""Model sources (lata.sources): one registry of ``model.embedded`` names, no branches elsewhere."""

import pytest
from omegaconf import OmegaConf

from lata import sources
from lata.config import ConfigError
from lata.sources import FamilyPaths, family_paths, source


def model(**values):
    return OmegaConf.create({"embedded": None, "base": None, "instruct": None, "experts": {}, "target": None,
                             **values})


def test_every_embedded_name_is_a_registered_source():
    assert list(sources.SOURCES) == [None, "zoo", "smollm2"]
    import lata.run.runner

    assert lata.run.runner.family_paths is family_paths and lata.run.runner.FamilyPaths is FamilyPaths


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
