"""A new merge method is one module (its sparsifier) and one YAML, its TIES variant one line and
one YAML: composed from the user's config directory, merged by dotted path on a test family and
checked against the formula worked out here in numpy."""

import math
import textwrap

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import reference
from conftest import write_family
from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, plan_merge
from lata.cli import config_dir
from lata.config import ConfigError, register_configs, validate_merge
from lata.methods import METHODS

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

from lata.methods import MergeMethod, ties_variant
from lata.registry import in_range
from lata.selection import keep_count


@dataclass(frozen=True)
class Clip(MergeMethod):
    """Clip each v_k to +-b_k, b_k its k-th largest magnitude in the tensor (k = ceil(fraction * n)); sum."""

    fraction: float = 0.5
    name: ClassVar[str] = "clip"

    def check(self):
        in_range("merge.fraction", self.fraction, 0.0, 1.0, low_open=True)

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        return vectors.kth_largest_magnitudes(keep_count(vectors.shape.numel(), self.fraction))

    def kept(self, v, bound, start, stop):
        return v.clamp_(-bound, bound)


ClipTies = ties_variant(Clip, "clip_ties", register=False)
'''

#: the user's conf/merge/<name>.yaml for each
YAMLS = {"clip": "method: clip_lab.Clip\nfraction: 0.5\n", "clip_ties": "method: clip_lab.ClipTies\nfraction: 0.5\n"}
LAMS = {"math": 0.7, "code": 1.0}


def expected_merge(dirs, fraction, elect):
    """theta_0 + the sum (or TIES election and mean) of lambda_k * clip(v_k, b_k), in float64."""
    instruct = reference.load(dirs["instruct"])
    experts = {k: reference.load(v) for k, v in dirs["experts"].items()}
    out = {}
    for name, t0 in instruct.items():
        theta0 = t0.double().numpy()
        us = []
        for k, state in experts.items():
            v = (state[name].float() - t0.float()).double().numpy()  # the float32 pure vector (uniform w)
            bound = np.sort(np.abs(v).ravel())[::-1][max(1, math.ceil(round(fraction * v.size, 9))) - 1]
            us.append(LAMS[k] * np.clip(v, -bound, bound))
        if elect:
            gamma = np.sign(sum(us))
            agree = [(np.sign(u) == gamma) & (u != 0) for u in us]
            count = sum(a.astype(float) for a in agree)
            delta = np.where(count > 0, sum(u * a for u, a in zip(us, agree)) / np.maximum(count, 1), 0.0)
        else:
            delta = sum(us)
        out[name] = theta0 + delta
    return out


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "clip_lab.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "conf" / "merge").mkdir(parents=True)
    for name, text in YAMLS.items():
        (tmp_path / "conf" / "merge" / f"{name}.yaml").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "clip_lab"


def composed_merge(conf: str, overrides: list[str]) -> MergeConfig:
    """The ``merge`` node of LATA's config with the user's config directory ``conf`` searched too."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"hydra.searchpath=[file://{conf}]"])
    return MergeConfig.of(cfg.merge)


@pytest.mark.parametrize("name, elect", [("clip", False), ("clip_ties", True)])
def test_a_plugin_sparsifier_and_its_one_line_ties_variant_merge_from_their_yaml(tmp_path, plugin, name, elect):
    merge = composed_merge(tmp_path / "conf", [f"merge={name}", "merge.fraction=0.3",
                                               "++merge.lams.math=0.7", "++merge.lams.code=1.0"])
    assert merge.method == f"{plugin}.{'ClipTies' if elect else 'Clip'}" and merge.lams == LAMS
    dirs = write_family(tmp_path / "family")
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    got = merge_state_dict(plan_merge(family, merge, WeightingConfig(name="uniform"), progress=False))
    expected = expected_merge(dirs, 0.3, elect)
    plain = expected_merge(dirs, 1.0, elect)  # fraction 1: nothing clipped
    assert set(got) == set(expected)
    clipped = 0
    for tensor, e in expected.items():
        g = got[tensor].double().numpy()
        assert np.allclose(g, e, rtol=0, atol=1e-6), tensor
        clipped += int((np.abs(e - plain[tensor]) > 1e-4).sum())
    assert clipped > 1000  # the clip changed the merge: the check above is not that of a plain sum


def test_the_plugin_variant_keeps_its_base_parameters_and_is_not_registered(plugin):
    ties = validate_merge(MergeConfig(method=f"{plugin}.ClipTies", fraction=0.25))
    assert type(ties).__name__ == "ClipTies" and ties.name == "clip_ties" and ties.fraction == 0.25
    assert (ties.mergekit, ties.mergekit_normalize) == (None, True)
    assert "clip_ties" not in METHODS.names() and "clip" not in METHODS.names()
    with pytest.raises(ConfigError, match=r"merge.fraction=0.0 is out of range"):
        validate_merge(MergeConfig(method=f"{plugin}.ClipTies", fraction=0.0))


def test_the_reference_refuses_a_method_it_has_no_formula_for(family_dirs):
    with pytest.raises(ValueError, match="no reference for merge method 'clip'"):
        reference.merge(family_dirs, method="clip")
    for method in ("dare", "dare_ties"):  # the last branch of the reference, named
        assert reference.merge(family_dirs, method=method, p=0.5)
