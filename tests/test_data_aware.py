"""The data-aware merges (Fisher, RegMean) and the calibration pass: closed forms checked by hand,
the statistics against a direct computation, the pass cached, bad calibration data refused, and
the CLI end to end."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_every_path_gives_the_same_bits, family_args, run_lata, write_family_with_tokenizer
from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, plan_merge
from lata.calibration import CalibrationExample, calibration_sets, read_jsonl
from lata.calibration.statistics import FILE, Statistics, block_bytes, compute, tokenized, weight_bytes
from lata.methods import METHODS
from lata.methods.regmean import reduced
from lata.registry import ConfigError
from lata.results.tables import result_row


def delta(method, vectors, lams, statistics, **params):
    return METHODS.build(method, params).delta(vectors, lams, [f"e{i}" for i in range(len(vectors))], "t",
                                               statistics=statistics)


# -- closed forms -------------------------------------------------------------------------------------

def test_regmean_on_one_linear_layer_is_the_least_squares_solution_of_the_stacked_inputs():
    torch.manual_seed(0)
    w0 = torch.randn(3, 4)
    ws = [w0 + 0.1 * torch.randn(3, 4) for _ in range(3)]
    xs = [torch.randn(n, 4) for n in (9, 6, 12)]
    got = w0 + delta("regmean", [w - w0 for w in ws], [1.0] * 3, [x.T @ x for x in xs], alpha=1.0)
    x = torch.cat(xs).double()
    y = torch.cat([xk.double() @ w.double().T for xk, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(x, y).solution.T
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # lambdas weigh each expert's rows of the stacked problem by sqrt(lambda)
    lams = [0.5, 2.0, 1.0]
    got = w0 + delta("regmean", [w - w0 for w in ws], lams, [x.T @ x for x in xs], alpha=1.0)
    s = [l ** 0.5 for l in lams]
    expected = torch.linalg.lstsq(torch.cat([r * xk.double() for r, xk in zip(s, xs)]),
                                  torch.cat([r * xk.double() @ w.double().T for r, xk, w in zip(s, xs, ws)])).solution.T
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_regmean_alpha_scales_the_off_diagonals_and_alpha_zero_is_a_diagonal_weighted_mean():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert reduced(g, 0.5).tolist() == [[4.0, 1.0], [1.0, 9.0]]
    assert reduced(g, 0.0).tolist() == [[4.0, 0.0], [0.0, 9.0]]
    # alpha 0: each input column j averaged with weights G_k[j, j]
    v1, v2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]])
    g1, g2 = torch.diag(torch.tensor([1.0, 3.0])), torch.diag(torch.tensor([3.0, 1.0]))
    got = delta("regmean", [v1, v2], [1.0, 1.0], [g1, g2], alpha=0.0)
    assert got[0].tolist() == pytest.approx([(1 * 1 + 3 * 3) / 4, (3 * 2 + 1 * -2) / 4])
    # a tensor without Gram matrices (a norm, an embedding) is the lambda-weighted average
    assert delta("regmean", [v1, v2], [1.0, 3.0], [None, None]).tolist() == [[2.5, -1.0]]
    # a singular sum (an input feature never seen) gives the minimum-norm solution: 0 there
    zero = torch.diag(torch.tensor([2.0, 0.0]))
    assert delta("regmean", [v1, v2], [1.0, 1.0], [zero, zero], alpha=1.0)[0].tolist() == pytest.approx([2.0, 0.0])


def test_fisher_with_equal_fishers_is_the_average_and_uncovered_parameters_keep_the_anchor():
    v1, v2 = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, -2.0, 0.0])
    ones = torch.ones(3)
    assert delta("fisher", [v1, v2], [1.0, 1.0], [ones, ones]).tolist() == pytest.approx([2.0, 0.0, 2.0], rel=1e-5)
    f1, f2 = torch.tensor([1.0, 3.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])
    got = delta("fisher", [v1, v2], [1.0, 1.0], [f1, f2], epsilon=0.0)
    assert got.tolist() == pytest.approx([(1 + 9) / 4, (6 - 2) / 4, 0.0])  # F = 0 everywhere: the anchor
    # epsilon is the anchor's Fisher relative to the tensor's mean: mean(F1 + F2) = 8/3
    got = delta("fisher", [v1, v2], [1.0, 1.0], [f1, f2], epsilon=0.75)
    assert got.tolist() == pytest.approx([10 / 6, 4 / 6, 0.0])
    # lambdas weigh the Fishers; a common lambda cancels
    assert delta("fisher", [v1, v2], [2.0, 2.0], [f1, f2], epsilon=0.0).tolist() == pytest.approx(
        delta("fisher", [v1, v2], [1.0, 1.0], [f1, f2], epsilon=0.0).tolist())
    with pytest.raises(ConfigError, match="merge=fisher weighs the experts by their lambdas, which must be >= 0"):
        delta("fisher", [v1, v2], [1.0, -1.0], [f1, f2])
    with pytest.raises(ConfigError, match="expert 'e1' has no Fisher for tensor 't'"):
        delta("fisher", [v1, v2], [1.0, 1.0], [f1, None])


# -- the statistics against a direct computation ------------------------------------------------------

EXAMPLES = [CalibrationExample("what is ab? ", "ba."), CalibrationExample("", "cab cab."),
            CalibrationExample("rev dog: ", "god.")]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family_with_tokenizer(tmp_path_factory.mktemp("calibrated"))


def test_the_fisher_and_the_grams_are_the_direct_computation(family, tmp_path):
    folder = family["experts"]["math"]
    compute("fisher", folder, EXAMPLES, 64, tmp_path, progress=False)
    (tmp_path / "g").mkdir()
    compute("gram", folder, EXAMPLES, 64, tmp_path / "g", progress=False)
    fisher, grams = Statistics(tmp_path / FILE, "fisher"), Statistics(tmp_path / "g" / FILE, "gram")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    inputs = {}
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, i, o: inputs.setdefault("x", []).append(i[0][0].detach()))
    for example in EXAMPLES:
        ids, start = tokenized(tokenizer, example, 64)
        model.zero_grad()
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        first = max(start, 1)  # the first answer token predicted from the token before it
        total = sum(logp[t - 1, ids[0, t]] for t in range(first, ids.shape[1]))
        total.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2 / len(EXAMPLES)
    hook.remove()
    assert fisher.names == set(expected)
    for n, e in expected.items():
        assert torch.allclose(fisher.get(n), e, rtol=1e-4, atol=1e-12), n
    x = torch.cat(inputs["x"])
    assert torch.allclose(grams.get("model.layers.1.mlp.down_proj.weight"), x.T @ x, rtol=1e-4, atol=1e-6)
    assert "lm_head.weight" not in grams.names and "model.layers.0.self_attn.q_proj.weight" in grams.names
    assert grams.get("model.norm.weight") is None


def test_a_model_over_its_memory_is_streamed_for_the_grams_and_computed_block_by_block_for_the_fisher(
        family, tmp_path, caplog):
    folder = family["experts"]["math"]
    for name in ("whole", "streamed", "fisher", "fisher-block", "refused"):
        (tmp_path / name).mkdir()
    compute("gram", folder, EXAMPLES, 64, tmp_path / "whole", progress=False)
    need = weight_bytes(folder)
    with caplog.at_level("INFO", logger="lata"):
        compute("gram", folder, EXAMPLES, 64, tmp_path / "streamed", progress=False, max_memory=need // 4)
    assert "does not fit the" in caplog.text and "streamed module by module" in caplog.text
    whole, streamed = load_file(str(tmp_path / "whole" / FILE)), load_file(str(tmp_path / "streamed" / FILE))
    assert set(whole) == set(streamed) and all(torch.equal(whole[n], streamed[n]) for n in whole)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == [FILE]  # the offload folder removed
    # the Fisher: the model and its gradients (2x) do not fit; the model and one layer's worth do
    compute("fisher", folder, EXAMPLES, 64, tmp_path / "fisher", progress=False)
    block = need + block_bytes(folder)
    assert block < 2 * need
    with caplog.at_level("INFO", logger="lata"):
        compute("fisher", folder, EXAMPLES, 64, tmp_path / "fisher-block", progress=False, max_memory=block)
    assert "computed block by block" in caplog.text
    whole, by_block = load_file(str(tmp_path / "fisher" / FILE)), load_file(str(tmp_path / "fisher-block" / FILE))
    assert set(whole) == set(by_block) and all(torch.allclose(whole[n], by_block[n], rtol=1e-5, atol=0) for n in whole)
    with pytest.raises(ConfigError, match=r"the Fisher pass of .* needs, block by block, .* GiB on cpu \(the parts "
                                          r"outside the decoder layers and the largest layer, with their gradients, "
                                          r"and the float32 model\), .* cpu may use .* GiB \(calibration.max_memory\)"):
        compute("fisher", folder, EXAMPLES, 64, tmp_path / "refused", progress=False, max_memory=block - 1)
    assert not any((tmp_path / "refused").iterdir())


class CharTokens:
    """A tokenizer's call: one id per character."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % self.vocab for c in text]}


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("gemma2", {"final_logit_softcapping": 5.0}), ("gpt2", {}),
                                        ("qwen3", {}), ("phi3", {}), ("olmo2", {})])
def test_the_fisher_block_by_block_is_the_fisher_of_the_whole_model(kind, extra):
    """Per family: scaled and position embeddings (gemma2, gpt2), tied heads and a softcapped head
    (gemma2), per-layer masks (gemma2's sliding layers), layers called positionally (gpt2)."""
    from transformers import AutoConfig

    from lata.calibration.statistics import fisher, fisher_by_block

    torch.manual_seed(0)
    shape = (dict(n_embd=32, n_layer=3, n_head=4) if kind == "gpt2" else
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, pad_token_id=0, **extra))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=97, **shape)).float().eval()
    ids = torch.tensor([[1, 2, 3]])
    before = model(input_ids=ids).logits.detach()
    whole = fisher(model, CharTokens(97), EXAMPLES, 64)
    model.zero_grad(set_to_none=True)
    ticks = []
    by_block = fisher_by_block(model, CharTokens(97), EXAMPLES, 64, "cpu", progress=lambda: ticks.append(1))
    assert len(ticks) == len(EXAMPLES) + 2 * 3  # per example, and per layer twice
    assert set(by_block) == set(whole) == {n for n, _ in model.named_parameters()}
    for name, expected in whole.items():
        assert expected.abs().max() > 0, name
        assert torch.allclose(by_block[name], expected, rtol=1e-5, atol=0), name
    assert torch.equal(model(input_ids=ids).logits.detach(), before)  # the layers' own forward again


# -- calibration data ------------------------------------------------------------------------------------

def calibration(**node):
    return OmegaConf.create({"name": "jsonl", "examples": 32, "seed": 0, "max_length": 64, "files": {}, **node})


def test_calibration_sets_are_drawn_reproducibly_and_bad_data_is_refused(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"q{i} ", "answer": f"a{i}"}) for i in range(10))
                    + "\n" + json.dumps({"text": "plain"}) + "\n")
    sets = calibration_sets(calibration(examples=4, files={"math": str(good)}), ["math"])
    assert len(sets["math"]) == 4 and sets == calibration_sets(calibration(examples=4, files={"math": str(good)}),
                                                              ["math"])
    assert calibration_sets(calibration(examples=4, seed=1, files={"math": str(good)}), ["math"]) != sets
    assert read_jsonl(good, "math")[-1] == CalibrationExample("", "plain")
    assert calibration_sets(calibration(name="auto"), ["math"], embedded=None) is None
    assert calibration_sets(calibration(name="none"), ["math"]) is None
    bad = tmp_path / "bad.jsonl"
    for text, message in (('{"prompt": "q"}\n', 'line 1 needs "prompt" and "answer" strings'),
                          ('{"text": "x"}\nnot json\n', "line 2 is not JSON"), ("\n", "has no examples")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            calibration_sets(calibration(files={"math": str(bad)}), ["math"])
    with pytest.raises(ConfigError, match=r"calibration.files.code is not set"):
        calibration_sets(calibration(files={"math": str(good)}), ["math", "code"])
    with pytest.raises(ConfigError, match="calibration.files.math: .*missing.jsonl is not a file"):
        calibration_sets(calibration(files={"math": str(tmp_path / "missing.jsonl")}), ["math"])
    with pytest.raises(ConfigError, match="calibration='zoo2' is not allowed"):
        calibration_sets(calibration(name="zoo2"), ["math"])
    with pytest.raises(ConfigError, match="calibration.examples=0 must be a whole number"):
        calibration_sets(calibration(examples=0), ["math"])
    with pytest.raises(ConfigError, match="calibration=zoo draws the embedded zoo's task sets"):
        calibration_sets(calibration(name="zoo"), ["math"])


def test_a_data_aware_method_without_statistics_is_refused(family):
    fam = Family.open(family["base"], family["instruct"], family["experts"])
    for method, kind in (("fisher", "fisher"), ("regmean", "gram")):
        with pytest.raises(ConfigError, match=f"merge={method} needs each expert's {kind} statistics from calibration "
                                              "data, and expert 'math' has none"):
            plan_merge(fam, MergeConfig(method=method), progress=False)


# -- the CLI: computed once, cached, the same merge as the library's -----------------------------------

@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_the_cli_calibrates_once_and_merges_as_the_library(family, tmp_path, method):
    files = {}
    for expert in family["experts"]:
        files[expert] = tmp_path / f"{expert}.jsonl"
        files[expert].write_text("\n".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) for e in EXAMPLES))
    args = [*family_args(family), f"merge={method}",
            "weighting=uniform", "calibration=jsonl", "calibration.max_length=64",
            *(f"++calibration.files.{k}={v}" for k, v in files.items()), f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.results_dir={tmp_path / 'results'}"]
    run_lata([*args, f"save_model={tmp_path / 'out'}"], tmp_path, run_dir=tmp_path / "run1")
    built = sorted((tmp_path / "cache" / "calibration").glob(f"{'gram' if method == 'regmean' else method}-*"))
    assert len(built) == 2  # one per expert
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert summary["calibration"]["name"] == "jsonl" and summary["calibration"]["max_length"] == 64
    row = result_row(summary)  # the results table names the calibration source and seed of the point
    assert (row["calibration"], row["calibration_seed"]) == ("jsonl", 0)
    stamps = [(b / FILE).stat().st_mtime_ns for b in built]
    run_lata([*args, "resume=false", f"save_model={tmp_path / 'out2'}"], tmp_path, run_dir=tmp_path / "run2")
    assert [(b / FILE).stat().st_mtime_ns for b in built] == stamps  # read back, not computed again
    # the library, from statistics it computes itself on the same examples: the same bits
    kind = "gram" if method == "regmean" else method
    stats = {}
    for expert, folder in family["experts"].items():
        (tmp_path / "lib" / expert).mkdir(parents=True)
        compute(kind, folder, EXAMPLES, 64, tmp_path / "lib" / expert, progress=False)
        stats[expert] = Statistics(tmp_path / "lib" / expert / FILE, kind)
    fam = Family.open(family["base"], family["instruct"], family["experts"])
    merged = merge_state_dict(plan_merge(fam, MergeConfig(method=method), WeightingConfig(name="uniform"),
                                         statistics=stats, progress=False))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == set(merged) and all(torch.equal(merged[n], saved[n]) for n in saved)
    ta = merge_state_dict(plan_merge(fam, MergeConfig(method="soup"), WeightingConfig(name="uniform"), progress=False))
    assert not all(torch.equal(ta[n], saved[n]) for n in saved)  # the statistics changed the merge


def test_sliced_threaded_staged_and_whole_tensor_give_the_same_bits(family, tmp_path):
    fam = Family.open(family["base"], family["instruct"], family["experts"])
    for method, kind in (("fisher", "fisher"), ("regmean", "gram")):
        stats = {}
        for expert, folder in family["experts"].items():
            (tmp_path / kind / expert).mkdir(parents=True)
            compute(kind, folder, EXAMPLES, 64, tmp_path / kind / expert, progress=False)
            stats[expert] = Statistics(tmp_path / kind / expert / FILE, kind)
        plan = plan_merge(fam, MergeConfig(method=method, lams={"math": 0.5}), WeightingConfig(name="linear_rank"),
                          statistics=stats, progress=False)
        assert assert_every_path_gives_the_same_bits(plan) > 3


def test_the_zoo_gives_each_expert_its_own_tasks_training_examples():
    from lata.zoo.presets import load_preset
    from lata.zoo.tasks import ASSISTANT, EOS

    zoo = load_preset("micro")
    sets = calibration_sets(calibration(name="auto", examples=5), ["math", "ua"], zoo_cfg=zoo, embedded="zoo")
    assert [len(v) for v in sets.values()] == [5, 5]
    for e in sets["math"]:  # a chat prompt, then the worked answer ending "#### n"
        assert e.prompt.endswith(f"{ASSISTANT}\n") and "####" in e.answer and e.answer.endswith(f"{EOS}\n")
    assert all("####" not in e.answer for e in sets["ua"])  # ua's compliant answers, not math
    with pytest.raises(ConfigError, match="calibration=zoo has task sets for math, code, ua, not for expert 'chem'"):
        calibration_sets(calibration(name="zoo"), ["chem"], zoo_cfg=zoo)


def write_lm_eval_tasks(folder, splits=("train", "test")):
    """Two local lm-eval tasks: a generation task (question -> answer) and a multiple-choice one,
    their documents in JSON files of the given splits."""
    folder.mkdir()
    for split in splits:
        rows = [{"q": f"{split} {i} plus {i}", "a": f"{2 * i}", "choices": ["red", "green", "blue"], "gold": i % 3}
                for i in range(6)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = ", ".join(f"{s}: {json.dumps(str(folder / f'{s}.jsonl'))}" for s in splits)
    keys = "".join(f"{'training' if s == 'train' else s}_split: {s}\n" for s in splits)
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files: {{{files}}}\n{keys}metadata:\n  version: 1.0\n"
    (folder / "tiny_gen.yaml").write_text("task: tiny_gen\noutput_type: generate_until\n"
                                          "doc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_target: \"{{a}}\"\n" + common)
    (folder / "tiny_mc.yaml").write_text("task: tiny_mc\noutput_type: multiple_choice\ndoc_to_text: \"{{q}} is\"\n"
                                         "doc_to_choice: choices\ndoc_to_target: gold\n" + common)


def test_an_lm_eval_task_gives_its_training_documents_as_prompt_and_answer(tmp_path):
    write_lm_eval_tasks(tmp_path / "tasks")
    node = calibration(name="lm_eval", examples=6, tasks={"math": "tiny_gen", "code": "tiny_mc"},
                       include_path=str(tmp_path / "tasks"), split="auto")
    sets = calibration_sets(node, ["math", "code"])
    # training documents (not the test ones), in file order; the answer after lm-eval's target delimiter
    assert sets["math"] == [CalibrationExample(f"Q: train {i} plus {i}\nA:", f" {2 * i}") for i in range(6)]
    assert sets["code"] == [CalibrationExample(f"train {i} plus {i} is", " " + ["red", "green", "blue"][i % 3])
                            for i in range(6)]
    tests = calibration_sets(OmegaConf.merge(node, {"split": "test", "examples": 2}), ["math"])["math"]
    assert len(tests) == 2 and all(e.prompt.startswith("Q: test ") for e in tests)
    with pytest.raises(ConfigError, match="calibration.tasks.code is not set"):
        calibration_sets(calibration(name="lm_eval", tasks={"math": "tiny_gen"}, include_path=str(tmp_path / "tasks")),
                         ["math", "code"])
    with pytest.raises(ConfigError, match="calibration.tasks.math='no_such_task' is not an lm-eval task"):
        calibration_sets(calibration(name="lm_eval", tasks={"math": "no_such_task"},
                                     include_path=str(tmp_path / "tasks")), ["math"])
    with pytest.raises(ConfigError, match="calibration.split='dev' is not allowed"):
        calibration_sets(OmegaConf.merge(node, {"split": "dev"}), ["math"])


def test_an_lm_eval_task_with_only_test_documents_is_refused_unless_asked_for(tmp_path):
    write_lm_eval_tasks(tmp_path / "tasks", splits=("test",))
    node = calibration(name="lm_eval", examples=3, tasks={"math": "tiny_gen"}, include_path=str(tmp_path / "tasks"),
                       split="auto")
    with pytest.raises(ConfigError, match=r"'tiny_gen' has no train or validation documents \(only test documents: "
                                          r"set calibration.split=test"):
        calibration_sets(node, ["math"])
    assert len(calibration_sets(OmegaConf.merge(node, {"split": "test"}), ["math"])["math"]) == 3


def test_examples_without_an_answer_token_after_the_cut_are_left_out_and_none_is_refused():
    from transformers import AutoConfig

    from lata.calibration.statistics import fisher, fisher_by_block

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1)).float().eval()
    cut = CalibrationExample("a prompt longer than the cut: ", "x")
    for pass_, per_layer in ((fisher, 0), (lambda *a, **k: fisher_by_block(*a, "cpu", **k), 2)):
        ticks = []
        with_cut = pass_(model, CharTokens(97), [cut, *EXAMPLES], 8, progress=lambda: ticks.append(1))
        assert len(ticks) == 1 + len(EXAMPLES) + per_layer * 2  # the examples left out are counted too
        alone = pass_(model, CharTokens(97), EXAMPLES, 8)
        assert all(torch.equal(with_cut[n], alone[n]) for n in alone)
        with pytest.raises(ConfigError, match="no example has an answer token within calibration.max_length"):
            pass_(model, CharTokens(97), [cut], 8)
