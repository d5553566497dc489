"""The lmms-eval plugin (vlmeff.eval.lmms) and POPE parity with lmms-eval's own aggregation.

Everything runs offline: the POPE-style task is a local parquet file of synthetic-world questions written
into tmp_path, loaded by lmms-eval's own task code (a YAML that includes lmms-eval's pope.yaml and points its
dataset at the file). Skipped, with the reason, when lmms-eval or the reference model is not available.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlmeff.eval.metrics import binary_metrics, pope_summary
from vlmeff.eval.parsers import metric_options, parse_lmms_eval
from vlmeff.reference.model import ASSET_NAME, asset_dir
from vlmeff.reference.weights import PART_DIRS, cache_dir

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(
    not HAS_LMMS,
    reason="lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3 (docs/lmms-eval.md)",
)
HAS_REFERENCE = (asset_dir() / ASSET_NAME).is_file() and all(
    (cache_dir() / d / "done.json").is_file() for d in PART_DIRS.values()
)
needs_reference = pytest.mark.skipif(
    not HAS_REFERENCE, reason="reference model not available: run `vlmeff reference fetch`"
)

SPEC = (
    "fastervlm:keep=64,scorer=cls"  # two parameters: the comma must survive lmms-eval's model_args splitter
)
SENTENCE = (
    "\nAnswer in a full sentence."  # a prompt under which the reference model also answers in sentences
)
LMMS_KEYS = {
    "accuracy": "pope_accuracy",
    "precision": "pope_precision",
    "recall": "pope_recall",
    "f1": "pope_f1_score",
    "yes_ratio": "pope_yes_ratio",
}

# answers that are and are not bare yes / no, with the label each is scored against
CANNED = [
    ("Yes", "yes"),
    ("no", "no"),
    ("  YES \n", "yes"),
    ("Yes.", "yes"),
    ("No, there is not.", "no"),
    ("", "yes"),
    ("I don't know", "no"),
    ("No", "yes"),
    ("yes", "no"),
    ("There is a dog.", "yes"),
    ("nO", "no"),
    ("Yes, there is.", "no"),
]


def lmms_pope_scores(answers: list[str], labels: list[str]) -> dict[str, float]:
    """lmms-eval's own POPE numbers: its process_results on each answer, then its aggregation functions."""
    from lmms_eval.tasks.pope import utils

    per_metric: dict[str, list] = {key: [] for key in LMMS_KEYS.values()}
    for i, (answer, label) in enumerate(zip(answers, labels)):
        for key, value in utils.pope_process_results(
            {"question_id": str(i), "answer": label}, [answer]
        ).items():
            per_metric[key].append(value)
    aggregate = {
        "pope_accuracy": utils.pope_aggregate_accuracy,
        "pope_precision": utils.pope_aggregate_precision,
        "pope_recall": utils.pope_aggregate_recall,
        "pope_f1_score": utils.pope_aggregate_f1_score,
        "pope_yes_ratio": utils.pope_aggregate_yes_ratio,
    }
    return {ours: aggregate[theirs](per_metric[theirs]) for ours, theirs in LMMS_KEYS.items()}


def vlmeff_lmms_block(answers: list[str], labels: list[str]) -> dict:
    return binary_metrics([parse_lmms_eval(a) for a in answers], labels, **metric_options("lmms-eval"))


# ----------------------------------------------------------------------------------- aggregation parity


@needs_lmms
def test_lmms_eval_block_reproduces_lmms_eval_pope_aggregation():
    answers, labels = [a for a, _ in CANNED], [lab for _, lab in CANNED]
    theirs = lmms_pope_scores(answers, labels)
    ours = vlmeff_lmms_block(answers, labels)
    assert {k: ours[k] for k in LMMS_KEYS} == theirs  # exactly, not approximately
    # by hand: tp = Yes, YES (2); fp = yes (1); tn = no, nO (2); fn = No (1); 6 answers are not bare
    assert (ours["tp"], ours["fp"], ours["tn"], ours["fn"], ours["other"]) == (2, 1, 2, 1, 6)
    assert theirs["recall"] == 2 / 3  # the 3 "other" answers on yes-questions are not counted as misses
    assert theirs["yes_ratio"] == 6 / 12  # lmms-eval's yes_ratio counts the LABELS that are yes
    # vlmeff's own numbers differ exactly there, and stay available under their own names
    own = binary_metrics([parse_lmms_eval(a) for a in answers], labels)
    assert own["recall"] == 2 / 6 and own["yes_ratio"] == own["pred_yes_ratio"] == 3 / 12
    assert ours["pred_yes_ratio"] == sum(a.lower().strip() == "yes" for a in answers) / 12
    assert ours["label_yes_ratio"] == theirs["yes_ratio"]
    assert {k: own[k] for k in ("accuracy", "precision")} == {k: theirs[k] for k in ("accuracy", "precision")}


@needs_lmms
def test_lmms_eval_block_matches_on_random_answer_sets():
    rng = random.Random(0)
    pool = [a for a, _ in CANNED] + ["Yes", "No", "yes", "no"]
    for _ in range(300):
        n = rng.randint(1, 14)
        answers = [rng.choice(pool) for _ in range(n)]
        labels = [rng.choice(("yes", "no", " Yes")) for _ in range(n)]
        ours = vlmeff_lmms_block(answers, labels)
        assert {k: ours[k] for k in LMMS_KEYS} == lmms_pope_scores(answers, labels), (answers, labels)
        split = pope_summary(
            {"random": ([parse_lmms_eval(a) for a in answers], labels)}, **metric_options("lmms-eval")
        )
        assert split["random"] == ours and all(split["mean"][k] == ours[k] for k in LMMS_KEYS)


# ------------------------------------------------------------------------------------- model_args / settings


@needs_lmms
def test_quoted_spec_survives_lmms_eval_model_args_splitter():
    from lmms_eval.utils import simple_parse_args_string

    from vlmeff.eval.lmms import unquote

    args = simple_parse_args_string(f"pretrained=reference,strategy='{SPEC}+pai',batch_size=2")
    assert args == {"pretrained": "reference", "strategy": f"'{SPEC}+pai'", "batch_size": 2}
    assert unquote(args["strategy"]) == f"{SPEC}+pai"
    assert unquote('"fastervlm-64"') == "fastervlm-64" and unquote("vanilla") == "vanilla"
    assert unquote("'a\"") == "'a\""  # unmatched quotes stay


@needs_lmms
def test_bad_model_args_are_refused_before_loading():
    from vlmeff.eval.lmms import VlmeffLMM

    with pytest.raises(TypeError, match=r"scorer='cls'.*quote the spec"):
        VlmeffLMM.create_from_arg_string("pretrained=reference,strategy=fastervlm:keep=64,scorer=cls")
    with pytest.raises(ValueError, match=r"batch_size='auto'.*not supported"):
        VlmeffLMM.create_from_arg_string("pretrained=reference", {"batch_size": "auto"})
    with pytest.raises(ValueError, match="batch_size=0"):
        VlmeffLMM(batch_size=0)
    with pytest.raises(NotImplementedError, match="generate_until only"):
        VlmeffLMM.loglikelihood(None, [])


def test_generation_settings_follow_lmms_eval_conventions():
    from vlmeff.eval.lmms import generation_settings

    pope = {
        "max_new_tokens": 128,
        "temperature": 0.0,
        "top_p": 0,
        "num_beams": 1,
        "do_sample": False,
        "until": ["\n\n"],
    }
    assert generation_settings(pope, 1024) == (
        {"max_new_tokens": 128, "do_sample": False, "num_beams": 1},
        ["\n\n"],
        [],
    )
    kwargs, until, ignored = generation_settings(
        {"temperature": 0.7, "top_p": 0.9, "until": "###", "image_aspect_ratio": "pad"}, 64
    )
    assert kwargs == {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert until == ["###"] and ignored == ["image_aspect_ratio"]
    assert generation_settings({"temperature": 0.7, "do_sample": False}, 8)[0]["do_sample"] is False
    assert generation_settings({"do_sample": True, "temperature": 0}, 8)[0]["do_sample"] is False
    assert generation_settings({"do_sample": True}, 8)[0] == {
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": 1.0,
    }
    assert generation_settings({"until": ["", "\n"]}, 8)[1] == ["\n"]
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generation_settings({"max_new_tokens": 0}, 8)
    with pytest.raises(ValueError, match="until=3"):
        generation_settings({"until": 3}, 8)


def test_plugin_module_imports_without_lmms_eval():
    code = (
        "import sys; sys.modules['lmms_eval'] = None\n"
        "import vlmeff, vlmeff.eval.lmms as m\n"
        "try:\n    m.VlmeffLMM()\nexcept ImportError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (
        "refused: the vlmeff lmms-eval model needs lmms-eval: pip install --no-deps lmms-eval" in out.stdout
    )


@needs_lmms
def test_entry_point_registers_the_model():
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vlmeff"]
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = pyproject.is_file() and '"vlmeff.eval.lmms:manifest"' in pyproject.read_text()
    if declared and not found:
        pytest.skip(
            "pyproject.toml declares the lmms_eval.models entry point but the installed metadata predates "
            "it: reinstall vlmeff (pip install -e .)"
        )
    assert found, 'the lmms_eval.models entry point is missing: vlmeff = "vlmeff.eval.lmms:manifest"'
    assert {ep.value for ep in found} == {"vlmeff.eval.lmms:manifest"}
    import lmms_eval.models

    from vlmeff.eval.lmms import VlmeffLMM

    assert lmms_eval.models.get_model("vlmeff") is VlmeffLMM
    assert "vlmeff" in lmms_eval.models.list_available_models()


# ------------------------------------------------------------------------------------ the offline POPE task


def write_pope_task(root: Path) -> tuple[Path, Path]:
    """A 12-question POPE-style dataset (synthetic world, adversarial split: 2 images x 6 questions) as a
    parquet file in lmms-eval's POPE columns (image as PNG bytes), and a task folder with two tasks that
    include lmms-eval's own pope.yaml (its prompts, generation settings, process_results and aggregation):
    the standard one, and one asking for a full sentence so that real answers are not bare yes / no either."""
    import datasets
    import lmms_eval

    from vlmeff.eval.pope import load_synthetic, synthetic_image

    samples = [s for s in load_synthetic(num_images=2) if s.split == "adversarial"]
    images: dict[str, bytes] = {}
    rows = []
    for i, s in enumerate(samples):
        if s.image not in images:
            buffer = io.BytesIO()
            synthetic_image(s).save(buffer, format="PNG")
            images[s.image] = buffer.getvalue()
        rows.append(
            {
                "id": str(i),
                "question_id": s.question_id,
                "question": s.text,
                "answer": s.label,
                "image_source": s.image_id,
                "category": s.split,
                "image": {"bytes": images[s.image], "path": None},
            }
        )
    columns = ("id", "question_id", "question", "answer", "image_source", "category")
    features = datasets.Features(
        {**{c: datasets.Value("string") for c in columns}, "image": datasets.Image()}
    )
    parquet = root / "pope" / "test-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(parquet))
    pope_yaml = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    tasks = root / "tasks"
    tasks.mkdir()
    base = {
        "include": str(pope_yaml),
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str(parquet)}, "cache_dir": str(root / "hf-cache")},
    }
    (tasks / "vlmeff_pope_local.yaml").write_text(yaml.safe_dump({**base, "task": "vlmeff_pope_local"}))
    sentence = {"default": {"pre_prompt": "", "post_prompt": SENTENCE}}
    (tasks / "vlmeff_pope_sentence.yaml").write_text(
        yaml.safe_dump({**base, "task": "vlmeff_pope_sentence", "lmms_eval_specific_kwargs": sentence})
    )
    return parquet, tasks


@pytest.fixture(scope="module")
def pope_task(tmp_path_factory):
    if not HAS_LMMS:
        pytest.skip("lmms-eval is not installed")
    return write_pope_task(tmp_path_factory.mktemp("lmms-pope"))


@pytest.fixture(scope="module")
def task_manager(pope_task):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(pope_task[1]))


@pytest.fixture(scope="module")
def registry():
    """lmms-eval's model registry with vlmeff in it: from the installed entry point when present, otherwise
    a copy with the manifest added (for an install that predates the entry point); restored afterwards."""
    import lmms_eval.models

    from vlmeff.eval.lmms import manifest

    patch = pytest.MonkeyPatch()
    if "vlmeff" not in lmms_eval.models.list_available_models():
        patched = copy.deepcopy(lmms_eval.models.MODEL_REGISTRY_V2)
        patched.register_manifest(manifest())
        patch.setattr(lmms_eval.models, "MODEL_REGISTRY_V2", patched)
    yield lmms_eval.models
    patch.undo()


def evaluate(task_manager, model, tasks, **kwargs) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(
        model=model, tasks=tasks, task_manager=task_manager, log_samples=True, bootstrap_iters=0, **kwargs
    )


def scores(results: dict, task: str) -> dict[str, float]:
    return {ours: results["results"][task][f"{theirs},none"] for ours, theirs in LMMS_KEYS.items()}


def answers_by_question(results: dict, task: str) -> dict[str, tuple[str, str]]:
    """question_id -> (answer as generated, label) from lmms-eval's logged samples."""
    return {s["doc"]["question_id"]: (s["resps"][0][0], s["target"]) for s in results["samples"][task]}


@needs_lmms
def test_canned_answers_through_simple_evaluate(task_manager):
    """lmms-eval's whole pipeline (requests, filters, process_results, aggregation) on answers that are mostly
    not bare yes / no gives exactly vlmeff's "lmms-eval" block on the same answers."""
    from lmms_eval.api.model import lmms

    class Canned(lmms):
        def generate_until(self, requests):
            return [CANNED[r.args[3] % len(CANNED)][0] for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    results = evaluate(task_manager, Canned(), ["vlmeff_pope_local"])
    got = answers_by_question(results, "vlmeff_pope_local")
    answers, labels = [a for a, _ in got.values()], [lab for _, lab in got.values()]
    assert sum(parse_lmms_eval(a) == "other" for a in answers) == 6
    summary = pope_summary(
        {"adversarial": ([parse_lmms_eval(a) for a in answers], labels)}, **metric_options("lmms-eval")
    )
    assert scores(results, "vlmeff_pope_local") == {k: summary["adversarial"][k] for k in LMMS_KEYS}
    assert scores(results, "vlmeff_pope_local") == lmms_pope_scores(answers, labels)


@pytest.fixture(scope="module")
def plugin_runs(registry, task_manager):
    """simple_evaluate with --model vlmeff on both local tasks, at batch size 4 and 1 (16 new tokens)."""
    runs = {}
    for batch_size in (4, 1):
        lm = registry.get_model("vlmeff").create_from_arg_string(
            f"pretrained=reference,strategy='{SPEC}',dtype=float32,device=cpu", {"batch_size": batch_size}
        )
        results = evaluate(
            task_manager, lm, ["vlmeff_pope_local", "vlmeff_pope_sentence"], gen_kwargs="max_new_tokens=16"
        )
        runs[batch_size] = (lm, results)
    return runs


@needs_lmms
@needs_reference
def test_simple_evaluate_offline_with_the_reference_model(plugin_runs):
    lm, results = plugin_runs[4]
    assert lm.batch_size == 4 and lm.spec == "fastervlm:keep=64,positions=auto,scorer=cls"
    for task in ("vlmeff_pope_local", "vlmeff_pope_sentence"):
        got = answers_by_question(results, task)
        assert len(got) == 12
        answers, labels = [a for a, _ in got.values()], [lab for _, lab in got.values()]
        assert scores(results, task) == {k: vlmeff_lmms_block(answers, labels)[k] for k in LMMS_KEYS}
        assert all(s["token_counts"][0]["output_tokens"] >= 1 for s in results["samples"][task])
    local = answers_by_question(results, "vlmeff_pope_local")
    assert all(parse_lmms_eval(a) != "other" for a, _ in local.values())  # "Answer ... single word" works
    assert scores(results, "vlmeff_pope_local")["accuracy"] >= 0.75  # the reference model is far above chance
    sentence = [a for a, _ in answers_by_question(results, "vlmeff_pope_sentence").values()]
    assert any(parse_lmms_eval(a) == "other" for a in sentence)  # real answers that are not bare yes / no
    # costs: every request kept 64 of 256 visual tokens; the LLM input is the prompt with 192 tokens fewer
    assert len(lm.sample_costs) == 24
    assert all(
        c["kept_tokens"] == 64 and c["visual_tokens"] == 256 and c["prefill_flops"] > 0
        for c in lm.sample_costs
    )
    samples = {(s["doc_id"], task): s for task in results["samples"] for s in results["samples"][task]}
    for cost in lm.sample_costs:
        assert (
            samples[(cost["doc_id"], cost["task"])]["token_counts"][0]["input_tokens"] == cost["input_tokens"]
        )
    throughput = results["throughput"]
    assert throughput["avg_vlmeff_kept_tokens"] == 64 and throughput["avg_vlmeff_visual_tokens"] == 256


@needs_lmms
@needs_reference
def test_batched_answers_equal_unbatched(plugin_runs):
    batched, single = plugin_runs[4][1], plugin_runs[1][1]
    for task in ("vlmeff_pope_local", "vlmeff_pope_sentence"):
        assert answers_by_question(batched, task) == answers_by_question(single, task)
        assert scores(batched, task) == scores(single, task)
    flops = {(c["task"], c["doc_id"]): c["prefill_flops"] for c in plugin_runs[1][0].sample_costs}
    assert {(c["task"], c["doc_id"]): c["prefill_flops"] for c in plugin_runs[4][0].sample_costs} == flops


@needs_lmms
@needs_reference
def test_parity_with_vlmeff_eval_runner(plugin_runs, pope_task, tmp_path):
    """The same questions through vlmeff's own runner (`vlmeff eval --data <parquet> --parser lmms-eval`),
    same prompt and generation settings: the same answers, and the "lmms-eval" block equals lmms-eval's
    scores."""
    import vlmeff
    from vlmeff.eval.pope import LLAVA_PROMPT_SUFFIX, load_pope
    from vlmeff.eval.runner import PopeRunner, default_image_loader

    lm, results = plugin_runs[4]
    model, processor = vlmeff.load("reference", dtype="float32")
    samples = load_pope(pope_task[0])
    assert len(samples) == 12 and {s.split for s in samples} == {"adversarial"}
    for task, suffix in (("vlmeff_pope_local", LLAVA_PROMPT_SUFFIX), ("vlmeff_pope_sentence", SENTENCE)):
        runner = PopeRunner(
            model,
            processor,
            samples,
            tmp_path / task,
            image_loader=default_image_loader,
            batch_size=3,
            max_new_tokens=16,
            prompt_suffix=suffix,
            progress=False,
        )
        records = runner.run(SPEC)
        theirs = answers_by_question(results, task)
        assert {r["question_id"]: (r["answer"], r["label"]) for r in records} == theirs
        summary = pope_summary(
            {"adversarial": ([parse_lmms_eval(r["answer"]) for r in records], [r["label"] for r in records])},
            **metric_options("lmms-eval"),
        )
        assert {k: summary["mean"][k] for k in LMMS_KEYS} == scores(results, task)
        from vlmeff.eval.runner import summarize  # `vlmeff eval --parser lmms-eval` aggregates the same way

        mean = summarize({SPEC: records}, "lmms-eval")[SPEC]["metrics"]["mean"]
        assert {k: mean[k] for k in LMMS_KEYS} == scores(results, task)
        flops = {c["doc_id"]: c["prefill_flops"] for c in lm.sample_costs if c["task"] == task}
        by_id = {s["doc"]["question_id"]: s["doc_id"] for s in results["samples"][task]}
        assert {by_id[r["question_id"]]: r["prefill_flops"] for r in records} == flops


@needs_lmms
def test_pretrained_folder_qwen2_vl(task_manager, tmp_path):
    """`pretrained=<folder>` with another connector (a tiny random Qwen2-VL saved to disk; its answers are
    noise, the pipeline is what is checked): batched requests, a ratio budget, per-request costs."""
    from vlmeff.eval.lmms import VlmeffLMM
    from vlmeff.testing import save_tiny_model

    folder = save_tiny_model("qwen2-vl", tmp_path / "qwen2-vl")
    lm = VlmeffLMM.create_from_arg_string(
        f"pretrained={folder},strategy='fastervlm:ratio=0.5,scorer=global_query',dtype=float32,device=cpu",
        {"batch_size": 3},
    )
    results = evaluate(task_manager, lm, ["vlmeff_pope_local"], gen_kwargs="max_new_tokens=3")
    assert len(answers_by_question(results, "vlmeff_pope_local")) == 12
    assert len(lm.sample_costs) == 12 and {c["batch_size"] for c in lm.sample_costs} == {3}
    visual = lm.sample_costs[0]["visual_tokens"]
    assert visual > 0 and all(
        c["kept_tokens"] == visual // 2 and c["visual_tokens"] == visual for c in lm.sample_costs
    )
    assert all(1 <= c["output_tokens"] <= 3 for c in lm.sample_costs)
