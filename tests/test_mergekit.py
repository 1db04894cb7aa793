"""mergekit recipes: the per-tensor weights a mergekit reader finds in LATA's recipe are LATA's
scales lambda_k * w_(l,k); settings mergekit cannot express are refused; a recipe's per-layer
weights read back give the same layer weights."""

import pytest
import yaml

from conftest import family_args, recipe_weights, run_lata, write_family
from lata import ConfigError, Family, MergeConfig, WeightingConfig, plan_merge
from lata.results.mergekit import mergekit_recipe, recipe_yaml


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("mergekit"), experts=("math", "code", "chem"), num_hidden_layers=6)


def mergekit_weight(setting, tensor, layer, num_layers):
    """A reader written from mergekit 0.1.5's ``evaluate_setting`` and ``plan_slice``: filters
    match by substring in order; a list of numbers is a gradient over t = layer / (L - 1); the
    tensors outside the blocks have no layer (t = 0 in mergekit: only a filter gives their value)."""
    t = 0.0 if layer is None else layer / (num_layers - 1)
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor:
                return mergekit_weight(cond["value"], tensor, layer, num_layers)
        return None
    if isinstance(setting, list):
        x = t * (len(setting) - 1)
        i = int(x)
        j = min(len(setting) - 1, i + 1)
        return (1 - (x - i)) * setting[i] + (x - i) * setting[j]
    return setting


CASES = [
    (MergeConfig(method="ta", lam=0.7), WeightingConfig(name="linear_rank")),
    (MergeConfig(method="ties", density=0.3, lams={"math": 1.2, "code": -0.5}), WeightingConfig(name="threshold",
                                                                                              threshold=0.9)),
    (MergeConfig(method="dare_ties", p=0.7), WeightingConfig(name="log_rank", rest_weight=0.25)),
    (MergeConfig(method="della", density=0.4, epsilon=0.1), WeightingConfig(name="lines", normalize="mean")),
]


@pytest.mark.parametrize("merge,weighting", CASES, ids=lambda c: getattr(c, "method", None) or c.name)
def test_the_recipes_weights_are_latas_scales_tensor_by_tensor(dirs, merge, weighting):
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    plan = plan_merge(family, merge, weighting, progress=False)
    recipe = yaml.safe_load(recipe_yaml(plan))
    assert recipe["base_model"] == str(dirs["instruct"])
    assert recipe["merge_method"] == plan.method.mergekit and recipe["dtype"] == "float32"
    by_model = {m["model"]: m["parameters"] for m in recipe["models"]}
    assert list(by_model) == [str(dirs["experts"][k]) for k in family.expert_names]
    for k in family.expert_names:
        setting = by_model[str(dirs["experts"][k])]["weight"]
        for name in family.tensor_names:
            expected = plan.lams[k] * plan.weight(k, name)
            got = mergekit_weight(setting, name, family.layer_of(name), family.num_layers)
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), (k, name)
    assert any(len(set(p["weight"][-1]["value"])) > 1 for p in by_model.values())  # per-layer, not one value


def test_the_methods_own_parameters_and_normalize(dirs):
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    expect = {"ta": ({}, False), "ties": ({"density": 0.3}, True), "dare": ({"density": 0.6}, False),
              "dare_ties": ({"density": 0.6}, True), "breadcrumbs": ({"density": 0.9, "gamma": 0.01}, False),
              "breadcrumbs_ties": ({"density": 0.9, "gamma": 0.01}, True),
              "della": ({"density": 0.5, "epsilon": 0.15}, True),
              "della_linear": ({"density": 0.5, "epsilon": 0.15}, False)}
    options = {"ties": {"density": 0.3}, "dare": {"p": 0.4}, "dare_ties": {"p": 0.4}}
    for method, (params, normalize) in expect.items():
        plan = plan_merge(family, MergeConfig(method=method, **options.get(method, {})), WeightingConfig(),
                          progress=False)
        recipe = mergekit_recipe(plan)
        own = {k: v for k, v in recipe["models"][0]["parameters"].items() if k != "weight"}
        assert own == params and recipe["parameters"] == {"normalize": normalize}, method


def test_what_mergekit_cannot_express_is_refused(dirs):
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    plan = plan_merge(family, MergeConfig(method="ties", topk_scope="global"), WeightingConfig(), progress=False)
    with pytest.raises(ConfigError, match="merge.topk_scope=global has no mergekit counterpart"):
        mergekit_recipe(plan)
    target = Family.open(dirs["base"], dirs["instruct"], dirs["experts"], target=dirs["experts"]["math"])
    plan = plan_merge(target, MergeConfig(method="ta", lam=-1), WeightingConfig(), progress=False)
    with pytest.raises(ConfigError, match="a merge onto model.target has no mergekit recipe"):
        mergekit_recipe(plan)


def test_a_recipes_layer_weights_read_back(dirs, tmp_path):
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    plan = plan_merge(family, MergeConfig(method="ta", lam=0.5), WeightingConfig(name="linear_rank"), progress=False)
    recipe = tmp_path / "mergekit.yaml"
    recipe.write_text(recipe_yaml(plan))
    for k in family.expert_names:
        got = recipe_weights(recipe, family.num_layers, str(dirs["experts"][k]))
        assert got == pytest.approx([0.5 * w for w in plan.weights[k]], rel=1e-12, abs=1e-15), k
    with pytest.raises(ConfigError, match="3 models have a weight .*weighting.mergekit_model"):
        recipe_weights(recipe, family.num_layers)
    # as a weighting: the per-layer list of one model, with lambda 1 the same scales
    read = plan_merge(family, MergeConfig(method="ta"), WeightingConfig(name="explicit", from_mergekit=str(recipe),
                                                                        mergekit_model="chem"), progress=False)
    assert read.weights["math"] == pytest.approx([0.5 * w for w in plan.weights["chem"]], rel=1e-12, abs=1e-15)


def test_a_hand_written_gradient_and_a_filter(tmp_path, caplog):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "x/y", "parameters": {"weight": [{"filter": "mlp", "value": 0.1}, {"value": [0.0, 1.0]}]}}]}))
    assert recipe_weights(recipe, 5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert "filtered by 'mlp'" in caplog.text
    recipe.write_text("slices:\n  - sources: []\n")
    with pytest.raises(ConfigError, match="the recipe uses slices"):
        recipe_weights(recipe, 5)


def test_the_cli_writes_the_recipe_beside_the_layer_analysis(dirs, tmp_path):
    args = family_args(dirs) + ["merge=ties", "weighting=linear_rank", "export=mergekit"]
    run_lata(args, tmp_path)
    recipe = yaml.safe_load((tmp_path / "run" / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "ties" and (tmp_path / "run" / "layer_analysis.json").is_file()
    bad = run_lata(family_args(dirs) + ["merge=ties", "merge.topk_scope=global", "export=mergekit"], tmp_path,
                   check=False, run_dir=tmp_path / "bad")
    assert bad.returncode != 0 and "merge.topk_scope=global has no mergekit counterpart" in bad.stderr
    assert not (tmp_path / "bad" / "layer_analysis.json").exists()  # refused before pass 1
    odd = run_lata(family_args(dirs) + ["export=safetensors"], tmp_path, check=False, run_dir=tmp_path / "odd")
    assert odd.returncode != 0 and "export='safetensors' is not allowed" in odd.stderr.replace('"', "'")


def test_soup_and_model_stock_are_exported_where_mergekit_merges_the_same(dirs):
    """Soup: mergekit's normalized linear, each weight lambda_k, no base model, only with every
    layer weight 1; Model Stock: no per-model weight at all, only with every lambda_k w_(l,k) 1."""
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    uniform = WeightingConfig(name="uniform")
    recipe = mergekit_recipe(plan_merge(family, MergeConfig(method="soup", lams={"math": 2.0}), uniform, progress=False))
    assert recipe["merge_method"] == "linear" and "base_model" not in recipe
    assert recipe["parameters"] == {"normalize": True}
    assert [m["parameters"] for m in recipe["models"]] == [{"weight": 2.0}, {"weight": 1.0}, {"weight": 1.0}]
    with pytest.raises(ConfigError, match="mergekit's linear divides by the per-block weights' sum"):
        mergekit_recipe(plan_merge(family, MergeConfig(method="soup"), WeightingConfig(name="linear_rank"),
                                   progress=False))
    recipe = mergekit_recipe(plan_merge(family, MergeConfig(method="model_stock", filter_wise=True), uniform,
                                        progress=False))
    assert recipe["merge_method"] == "model_stock" and recipe["base_model"] == str(dirs["instruct"])
    assert recipe["parameters"] == {"filter_wise": True} and all("parameters" not in m for m in recipe["models"])
    with pytest.raises(ConfigError, match="mergekit's model_stock takes no per-model weights"):
        mergekit_recipe(plan_merge(family, MergeConfig(method="model_stock", lam=0.5), uniform, progress=False))
