"""POPE: answer parsers, binary metrics and the data loaders (offline; data written into tmp_path)."""

from __future__ import annotations

import io
import json
import pickle

import pytest

from vlmeff.eval.metrics import MEAN_KEYS, RATE_KEYS, binary_metrics, pope_summary
from vlmeff.eval.parsers import (
    METRIC_OPTIONS,
    PARSERS,
    get_parser,
    metric_options,
    parse_substring,
    substring_vcd,
)
from vlmeff.eval.pope import (
    LLAVA_PROMPT_SUFFIX,
    PopeFormatError,
    PopeSample,
    detect_format,
    load_llava_single_file,
    load_lmms_eval,
    load_official,
    load_pope,
)

# ------------------------------------------------------------------------------------------ metrics


def _confusion(tp=0, fp=0, tn=0, fn=0, other_pos=0, other_neg=0):
    preds = ["yes"] * tp + ["yes"] * fp + ["no"] * tn + ["no"] * fn + ["other"] * (other_pos + other_neg)
    labels = (
        ["yes"] * tp + ["no"] * fp + ["no"] * tn + ["yes"] * fn + ["yes"] * other_pos + ["no"] * other_neg
    )
    return preds, labels


def test_binary_metrics_hand_built_confusion():
    m = binary_metrics(*_confusion(tp=3, fp=1, tn=2, fn=4))
    p, r = 0.75, 3 / 7
    assert m["precision"] == p
    assert m["recall"] == pytest.approx(r, abs=1e-15)
    assert m["accuracy"] == 0.5
    assert m["f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-15)
    assert m["yes_ratio"] == 0.4
    assert (m["n"], m["tp"], m["fp"], m["tn"], m["fn"], m["other"], m["n_other"]) == (10, 3, 1, 2, 4, 0, 0)


def test_binary_metrics_order_does_not_matter_and_labels_are_normalised():
    preds, labels = _confusion(tp=2, fp=1, tn=3, fn=1)
    ref = binary_metrics(preds, labels)
    pairs = list(zip(preds, labels))[::-1]
    assert binary_metrics([p for p, _ in pairs], [f" {lab.upper()} " for _, lab in pairs]) == ref


def test_other_predictions_are_wrong_and_misses_by_default():
    # tp=3 fp=1 tn=2 fn=4 plus 2 "other" on yes-questions and 1 on a no-question
    preds, labels = _confusion(tp=3, fp=1, tn=2, fn=4, other_pos=2, other_neg=1)
    m = binary_metrics(preds, labels)
    assert m["n"] == 13 and m["other"] == m["n_other"] == 3
    assert (m["other_pos"], m["other_neg"]) == (2, 1)
    assert m["accuracy"] == 5 / 13  # "other" never counts as correct
    assert m["precision"] == 0.75  # an "other" is never a false positive
    assert m["recall"] == 3 / 9  # miss: tp / #(label == "yes") = 3 / (3 + 4 + 2)
    assert m["yes_ratio"] == 4 / 13  # share of predictions that are "yes"
    # "miss" treats "other" exactly like a "no" prediction for precision / recall / f1
    as_no = binary_metrics(["no" if x == "other" else x for x in preds], labels)
    assert all(m[k] == as_no[k] for k in ("precision", "recall", "f1", "yes_ratio"))
    # lmms-eval's aggregation leaves "other" out of the recall denominator
    ex = binary_metrics(preds, labels, other_policy="exclude")
    assert ex["recall"] == 3 / 7 and ex["precision"] == 0.75 and ex["accuracy"] == 5 / 13
    # both yes-ratios always, under their own names; yes_ratio is the one the options ask for
    assert (m["pred_yes_ratio"], m["label_yes_ratio"]) == (4 / 13, 9 / 13)  # 3+1 yes answers, 3+4+2 labels
    by_labels = binary_metrics(preds, labels, yes_ratio="labels")
    assert by_labels["yes_ratio"] == 9 / 13 and by_labels["pred_yes_ratio"] == 4 / 13
    same = [k for k in m if k != "yes_ratio"]
    assert {k: by_labels[k] for k in same} == {k: m[k] for k in same}


def test_lmms_eval_parser_names_lmms_eval_aggregation():
    """lmms-eval's pope_aggregate_recall counts only "no" answers as misses and pope_aggregate_yes_ratio
    counts the labels; the "lmms-eval" parser's metric options say so, the other parsers keep vlmeff's
    conventions (the numbers against lmms-eval's own code: tests/test_lmms_eval.py)."""
    assert metric_options("lmms-eval") == {"other_policy": "exclude", "yes_ratio": "labels"}
    assert metric_options("official") == {} and metric_options("substring") == {}
    assert sorted(METRIC_OPTIONS) == sorted(PARSERS)
    metric_options("lmms-eval")["yes_ratio"] = "predictions"  # a copy: the table itself is not changed
    assert METRIC_OPTIONS["lmms-eval"]["yes_ratio"] == "labels"
    with pytest.raises(KeyError, match="known"):
        metric_options("gpt")
    texts = ["Yes", "Yes.", "no", "No, there is not.", "yes", "I don't know"]
    labels = ["yes", "yes", "yes", "no", "no", "yes"]
    parse = PARSERS["lmms-eval"]
    m = binary_metrics([parse(t) for t in texts], labels, **metric_options("lmms-eval"))
    assert (m["tp"], m["fn"], m["fp"], m["other_pos"], m["other_neg"]) == (1, 1, 1, 2, 1)
    assert m["recall"] == 1 / 2 and m["precision"] == 1 / 2 and m["accuracy"] == 1 / 6
    assert m["yes_ratio"] == 4 / 6 and m["pred_yes_ratio"] == 2 / 6
    out = pope_summary({"random": ([parse(t) for t in texts], labels), "popular": (["yes"], ["no"])},
                       **metric_options("lmms-eval"))
    assert out["random"] == m
    assert out["popular"]["yes_ratio"] == 0.0 and out["popular"]["pred_yes_ratio"] == 1.0
    assert out["mean"]["yes_ratio"] == 2 / 6 and out["mean"]["pred_yes_ratio"] == (2 / 6 + 1) / 2


def test_binary_metrics_zero_division_is_zero():
    m = binary_metrics(["no", "no"], ["no", "yes"])  # no positive predictions
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    empty = binary_metrics([], [])
    assert empty["n"] == 0 and all(empty[k] == 0.0 for k in RATE_KEYS)
    only_other = binary_metrics(["other"], ["yes"])
    assert all(only_other[k] == 0.0 for k in RATE_KEYS)


def test_binary_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        binary_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="parse the raw text"):
        binary_metrics(["Yes."], ["yes"])
    with pytest.raises(ValueError, match="label 0"):
        binary_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="other_policy"):
        binary_metrics(["yes"], ["yes"], other_policy="drop")
    with pytest.raises(ValueError, match=r"yes_ratio must be one of .*'answers'"):
        binary_metrics(["yes"], ["yes"], yes_ratio="answers")


def test_pope_summary_unweighted_mean_over_splits():
    per_split = {
        "random": _confusion(tp=3, fp=1, tn=2, fn=4),  # 10 questions
        "popular": _confusion(tp=5, fp=0, tn=5, fn=0),  # 10 questions, perfect
        "adversarial": _confusion(tp=1, fp=1, tn=0, fn=0),  # 2 questions: same weight as the others
    }
    out = pope_summary(per_split)
    assert list(out) == ["random", "popular", "adversarial", "mean"]
    assert out["random"] == binary_metrics(*per_split["random"])
    assert out["popular"]["f1"] == 1.0
    assert out["adversarial"]["precision"] == 0.5 and out["adversarial"]["recall"] == 1.0
    for k in MEAN_KEYS:
        assert out["mean"][k] == pytest.approx(sum(out[s][k] for s in per_split) / 3, abs=1e-15)
    assert out["mean"]["accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert out["mean"]["n"] == 22 and out["mean"]["n_splits"] == 3
    with pytest.raises(ValueError):
        pope_summary({})
    with pytest.raises(ValueError, match="reserved"):
        pope_summary({"mean": _confusion(tp=1)})


# ------------------------------------------------------------------------------------------ parsers

TEXTS = ["Yes.", "No, there is not.", "There is no dog.", "", "I don't know", "yes", "Yes, there is a dog."]
EXPECTED = {
    # LLaVA eval_pope.py: first sentence, commas removed, words split on " "; "No"/"not"/"no" -> no, else yes
    "official": ["yes", "no", "no", "yes", "yes", "yes", "yes"],
    # lmms-eval: lower().strip() must equal "yes" / "no" exactly (no punctuation stripping)
    "lmms-eval": ["other", "other", "other", "other", "other", "yes", "other"],
    # substring: "yes" in text first, then "no" in text ("know" contains "no"), else other
    "substring": ["yes", "no", "no", "other", "no", "yes", "yes"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parsers_on_reference_answers(name):
    assert sorted(PARSERS) == sorted(EXPECTED)
    fn = get_parser(name)
    assert [fn(t) for t in TEXTS] == EXPECTED[name]
    assert fn.__doc__ and len(fn.__doc__) > 80  # each documents its source rule


def test_parser_details():
    official, lmms = PARSERS["official"], PARSERS["lmms-eval"]
    assert official("No") == "no" and official("  No\n") == "no"  # LLaVA strips the decoded answer
    assert official("NO") == "yes" and official("No!") == "yes"  # exact, case-sensitive words only
    assert official("There is a dog. It is not a cat.") == "yes"  # only the first sentence counts
    assert official("Not sure") == "yes" and official("It is not") == "no"
    assert lmms("  YES \n") == "yes" and lmms("No") == "no" and lmms("No.") == "other"
    assert parse_substring("A snowboard, yes.") == "yes"  # both substrings: "yes" wins
    assert parse_substring("Nope") == "no" and parse_substring("Maybe") == "other"
    with pytest.raises(KeyError, match="known"):
        get_parser("gpt")


def test_substring_vcd_is_label_conditioned():
    assert [substring_vcd(t, "yes") for t in TEXTS] == ["yes", "no", "no", "no", "no", "yes", "yes"]
    assert [substring_vcd(t, "no") for t in TEXTS] == ["yes", "no", "no", "yes", "no", "yes", "yes"]
    assert substring_vcd("Yes, a snowboard.", "no") == "no"  # both substrings: always correct in VCD
    with pytest.raises(ValueError):
        substring_vcd("yes", "maybe")


# -------------------------------------------------------------------------------------- official files

OFFICIAL_ROWS = [
    {
        "question_id": 1,
        "image": "COCO_val2014_000000310196.jpg",
        "text": "Is there a snowboard in the image?",
        "label": "yes",
    },
    {
        "question_id": 2,
        "image": "COCO_val2014_000000310196.jpg",
        "text": "Is there a dog in the image?",
        "label": "no",
    },
    {
        "question_id": 3,
        "image": "COCO_val2014_000000210789.jpg",
        "text": "Is there a car in the image?",
        "label": "yes",
    },
]


def _write_jsonl(path, rows, blank_line_after=None):
    lines = []
    for i, r in enumerate(rows):
        lines.append(r if isinstance(r, str) else json.dumps(r))
        if blank_line_after == i:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"jpeg")
    return folder


def test_load_official(tmp_path):
    f = _write_jsonl(tmp_path / "coco_pope_popular.json", OFFICIAL_ROWS, blank_line_after=0)
    img = _images(tmp_path / "val2014", {r["image"] for r in OFFICIAL_ROWS})
    samples = load_official(f, img)
    assert [s.question_id for s in samples] == ["1", "2", "3"]
    s = samples[0]
    assert isinstance(s, PopeSample)
    assert s.image == str(img / "COCO_val2014_000000310196.jpg")
    assert s.image_id == "COCO_val2014_000000310196"
    assert (s.text, s.label, s.split, s.category, s.image_bytes) == (
        "Is there a snowboard in the image?",
        "yes",
        "popular",
        None,
        None,
    )
    assert [x.label for x in samples] == ["yes", "no", "yes"]
    assert {x.split for x in load_official(f, img, "custom")} == {"custom"}
    bare = load_official(f, None)  # no image folder: the file name as written, no check
    assert bare[0].image == "COCO_val2014_000000310196.jpg"


def test_load_official_missing_image(tmp_path):
    f = _write_jsonl(tmp_path / "coco_pope_random.json", OFFICIAL_ROWS)
    img = _images(tmp_path / "val2014", ["COCO_val2014_000000310196.jpg"])
    with pytest.raises(FileNotFoundError) as ei:
        load_official(f, img)
    msg = str(ei.value)
    assert "COCO_val2014_000000210789.jpg" in msg and "line 3" in msg and "coco_pope_random.json" in msg
    assert len(load_official(f, img, check_images=False)) == 3


def test_load_official_needs_a_split_name(tmp_path):
    f = _write_jsonl(tmp_path / "questions.jsonl", OFFICIAL_ROWS)
    with pytest.raises(ValueError, match="split"):
        load_official(f, None)
    assert load_official(f, None, "random")[0].split == "random"


BAD_SECOND_LINES = {
    "bad json": ('{"question_id": 2, "image": "x.jpg", "text": "q", "label": "no"', "invalid JSON"),
    "not an object": ('["question_id", 2]', "JSON object"),
    "missing key": ('{"question_id": 2, "image": "x.jpg", "label": "no"}', "'text'"),
    "bad label": ('{"question_id": 2, "image": "x.jpg", "text": "q", "label": "maybe"}', "label"),
    "bad id": ('{"question_id": [2], "image": "x.jpg", "text": "q", "label": "no"}', "question_id"),
    "duplicate id": ('{"question_id": 1, "image": "x.jpg", "text": "q", "label": "no"}', "duplicate"),
}


@pytest.mark.parametrize("case", sorted(BAD_SECOND_LINES))
def test_malformed_official_line_names_file_and_line(tmp_path, case):
    bad, fragment = BAD_SECOND_LINES[case]
    f = _write_jsonl(tmp_path / "coco_pope_adversarial.json", [OFFICIAL_ROWS[0], bad, OFFICIAL_ROWS[2]])
    with pytest.raises(PopeFormatError) as ei:
        load_official(f, None)
    err = ei.value
    assert isinstance(err, ValueError)
    assert "coco_pope_adversarial.json" in str(err) and "line 2" in str(err) and fragment in str(err)
    assert err.line == 2 and err.path == str(f)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


# ---------------------------------------------------------------------------------- LLaVA single file


def _llava_setup(tmp_path, n_random_ann=2):
    questions = [
        {
            "question_id": 1,
            "image": "COCO_val2014_000000000001.jpg",
            "category": "adversarial",
            "text": "Is there a snowboard in the image?" + LLAVA_PROMPT_SUFFIX,
        },
        {
            "question_id": 2,
            "image": "COCO_val2014_000000000002.jpg",
            "category": "random",
            "text": "Is there a dog in the image?" + LLAVA_PROMPT_SUFFIX,
        },
        {
            "question_id": 3,
            "image": "COCO_val2014_000000000001.jpg",
            "category": "adversarial",
            "text": "Is there a person in the image?" + LLAVA_PROMPT_SUFFIX,
        },
        {
            "question_id": 4,
            "image": "COCO_val2014_000000000003.jpg",
            "category": "random",
            "text": "Is there a car in the image?" + LLAVA_PROMPT_SUFFIX,
        },
    ]
    qfile = _write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    ann = tmp_path / "coco"
    ann.mkdir()
    # annotation files have their own question ids; LLaVA pairs them by position within the category
    _write_jsonl(
        ann / "coco_pope_adversarial.json",
        [
            {
                "question_id": 1,
                "image": "COCO_val2014_000000000001.jpg",
                "text": "Is there a snowboard in the image?",
                "label": "no",
            },
            {
                "question_id": 2,
                "image": "COCO_val2014_000000000001.jpg",
                "text": "Is there a person in the image?",
                "label": "yes",
            },
        ],
    )
    random_ann = [
        {
            "question_id": 1,
            "image": "COCO_val2014_000000000002.jpg",
            "text": "Is there a dog in the image?",
            "label": "yes",
        },
        {
            "question_id": 2,
            "image": "COCO_val2014_000000000003.jpg",
            "text": "Is there a car in the image?",
            "label": "no",
        },
        {
            "question_id": 3,
            "image": "COCO_val2014_000000000003.jpg",
            "text": "Is there a cat in the image?",
            "label": "no",
        },
    ][:n_random_ann]
    _write_jsonl(ann / "coco_pope_random.json", random_ann)
    img = _images(tmp_path / "val2014", {q["image"] for q in questions})
    return qfile, ann, img


def test_load_llava_single_file_with_annotation_folder(tmp_path):
    qfile, ann, img = _llava_setup(tmp_path)
    samples = load_llava_single_file(qfile, img, ann)
    assert [(s.question_id, s.split, s.label) for s in samples] == [
        ("1", "adversarial", "no"),
        ("2", "random", "yes"),
        ("3", "adversarial", "yes"),
        ("4", "random", "no"),
    ]
    assert samples[0].text == "Is there a snowboard in the image?"  # prompt suffix removed
    assert samples[0].category == "adversarial" and samples[0].image == str(
        img / "COCO_val2014_000000000001.jpg"
    )
    kept = load_llava_single_file(qfile, img, ann, strip_prompt_suffix=False)
    assert kept[0].text.endswith(LLAVA_PROMPT_SUFFIX)


def test_load_llava_single_file_with_answers_file_or_mapping(tmp_path):
    qfile, _, img = _llava_setup(tmp_path)
    answers = _write_jsonl(
        tmp_path / "answers.jsonl",
        [
            {"question_id": 1, "label": "no"},
            {"question_id": 2, "label": "yes"},
            {"question_id": 3, "answer": "Yes"},
            {"question_id": 4, "label": "no"},
        ],
    )
    by_file = load_llava_single_file(qfile, img, answers)
    assert [s.label for s in by_file] == ["no", "yes", "yes", "no"]
    by_map = load_llava_single_file(qfile, img, {1: "no", "2": "yes", 3: "yes", 4: "no"})
    assert [s.label for s in by_map] == ["no", "yes", "yes", "no"]
    with pytest.raises(
        PopeFormatError, match=r"llava_pope_test\.jsonl, line 4: question_id '4' has no label"
    ):
        load_llava_single_file(qfile, img, {1: "no", 2: "yes", 3: "yes"})


def test_load_llava_single_file_errors(tmp_path):
    qfile, ann, img = _llava_setup(tmp_path, n_random_ann=3)
    with pytest.raises(PopeFormatError, match=r"llava_pope_test\.jsonl, line 1: no 'label'"):
        load_llava_single_file(qfile, img)
    with pytest.raises(PopeFormatError, match="coco_pope_random.json: 3 annotations but 2 questions"):
        load_llava_single_file(qfile, img, ann)
    (img / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000003.jpg"):
        load_llava_single_file(qfile, img, {1: "no", 2: "yes", 3: "yes", 4: "no"})
    bad = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"question_id": 1, "image": "a.jpg", "text": "q", "category": "random", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "q", "label": "yes"},
        ],
    )
    with pytest.raises(PopeFormatError, match=r"bad\.jsonl, line 2: missing key 'category'"):
        load_llava_single_file(bad, None)


# ------------------------------------------------------------------------------------------ lmms-eval


def _png(color):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


LMMS_ROWS = [
    {
        "id": "0",
        "question_id": "1",
        "question": "Is there a snowboard in the image?",
        "answer": "yes",
        "image_source": "COCO_val2014_000000310196",
        "category": "adversarial",
    },
    {
        "id": "1",
        "question_id": "2",
        "question": "Is there a dog in the image?",
        "answer": "no",
        "image_source": "COCO_val2014_000000310196",
        "category": "adversarial",
    },
    {
        "id": "2",
        "question_id": "1",
        "question": " Is there a car in the image? ",
        "answer": "no",
        "image_source": "COCO_val2014_000000210789",
        "category": "random",
    },
]


def _lmms_table(pa, rows, with_category=True):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {k: [r[k] for r in rows] for k in ("id", "question_id", "question", "answer", "image_source")}
    arrays = {k: pa.array(v, pa.string()) for k, v in cols.items()}
    colors = ["red", "green", "blue", "white"]
    arrays["image"] = pa.array(
        [{"bytes": _png(colors[i % 4]), "path": None} for i in range(len(rows))], image_type
    )
    if with_category:
        arrays["category"] = pa.array([r["category"] for r in rows], pa.string())
    return pa.table(arrays)


def _write_stream(pa, path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)


def _check_lmms_samples(samples):
    from PIL import Image

    assert [(s.question_id, s.split, s.label) for s in samples] == [
        ("1", "adversarial", "yes"),
        ("2", "adversarial", "no"),
        ("1", "random", "no"),
    ]
    s = samples[0]
    assert s.image is None and s.image_id == "COCO_val2014_000000310196"
    assert s.category == "adversarial" and s.text == "Is there a snowboard in the image?"
    assert samples[2].text == "Is there a car in the image?"
    assert Image.open(io.BytesIO(s.image_bytes)).getpixel((0, 0)) == (255, 0, 0)
    assert "image_bytes" not in repr(s)


def test_load_lmms_eval_parquet_file_and_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    one = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(_lmms_table(pa, LMMS_ROWS), one)
    _check_lmms_samples(load_lmms_eval(one))
    folder = tmp_path / "POPE" / "data"
    folder.mkdir(parents=True)
    pq.write_table(_lmms_table(pa, LMMS_ROWS[:2]), folder / "test-00000-of-00002.parquet")
    pq.write_table(_lmms_table(pa, LMMS_ROWS[2:]), folder / "test-00001-of-00002.parquet")
    _check_lmms_samples(load_lmms_eval(tmp_path / "POPE"))
    assert detect_format(tmp_path / "POPE") == "lmms-eval"
    assert [s.question_id for s in load_pope(tmp_path / "POPE", split="random")] == ["1"]


def test_load_lmms_eval_parquet_split_from_folder_without_category(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    full = tmp_path / "Full"
    (full / "random").mkdir(parents=True)
    pq.write_table(_lmms_table(pa, LMMS_ROWS[2:], with_category=False), full / "random" / "0000.parquet")
    (s,) = load_lmms_eval(full)
    assert (s.split, s.category) == ("random", None)


def test_load_lmms_eval_bad_rows_name_file_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [dict(r) for r in LMMS_ROWS]
    rows[1]["answer"] = "maybe"
    f = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(_lmms_table(pa, rows), f)
    with pytest.raises(PopeFormatError, match=r"test-00000-of-00001\.parquet, row 2: label"):
        load_lmms_eval(f)
    dup = [dict(r) for r in LMMS_ROWS]
    dup[2]["category"] = "adversarial"  # question_id "1" twice in one split
    pq.write_table(_lmms_table(pa, dup), f)
    with pytest.raises(PopeFormatError, match="row 3: duplicate question_id '1'"):
        load_lmms_eval(f)
    pq.write_table(_lmms_table(pa, LMMS_ROWS).drop_columns(["answer"]), f)
    with pytest.raises(PopeFormatError, match="missing column"):
        load_lmms_eval(f)


def test_load_lmms_eval_save_to_disk_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")

    ds = tmp_path / "pope_test"
    table = _lmms_table(pa, LMMS_ROWS)
    _write_stream(pa, ds / "data-00000-of-00002.arrow", table.slice(0, 2))
    _write_stream(pa, ds / "data-00001-of-00002.arrow", table.slice(2))
    (ds / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (ds / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [
                    {"filename": "data-00000-of-00002.arrow"},
                    {"filename": "data-00001-of-00002.arrow"},
                ],
                "_split": "test",
            }
        )
    )
    _check_lmms_samples(load_lmms_eval(ds))
    assert detect_format(ds) == "lmms-eval"

    # DatasetDict layout (the "Full" config): one folder per split, split from the folder name
    dd = tmp_path / "pope_full"
    (dd).mkdir()
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["adversarial", "random"]}))
    for split, part in (("adversarial", table.slice(0, 2)), ("random", table.slice(2))):
        _write_stream(pa, dd / split / "data-00000-of-00001.arrow", part.drop_columns(["category"]))
        (dd / split / "state.json").write_text(
            json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
        )
    samples = load_pope(dd)
    assert [(s.question_id, s.split, s.category) for s in samples] == [
        ("1", "adversarial", None),
        ("2", "adversarial", None),
        ("1", "random", None),
    ]


def test_load_lmms_eval_arrow_bad_row(tmp_path):
    pa = pytest.importorskip("pyarrow")

    rows = [dict(r) for r in LMMS_ROWS]
    rows[2]["question"] = ""
    f = tmp_path / "data-00000-of-00001.arrow"
    _write_stream(pa, f, _lmms_table(pa, rows))
    with pytest.raises(PopeFormatError, match=r"data-00000-of-00001\.arrow, row 3: 'question'"):
        load_lmms_eval(f)
    f.write_bytes(b"not arrow at all")
    with pytest.raises(PopeFormatError, match="cannot read arrow"):
        load_lmms_eval(f)


# ------------------------------------------------------------------------------------------ dispatcher


def test_load_pope_dispatch(tmp_path):
    ann = tmp_path / "coco"
    ann.mkdir()
    for split in ("random", "adversarial"):
        _write_jsonl(ann / f"coco_pope_{split}.json", OFFICIAL_ROWS)
    img = _images(tmp_path / "val2014", {r["image"] for r in OFFICIAL_ROWS})
    assert detect_format(ann) == "official-dir"
    assert detect_format(ann / "coco_pope_random.json") == "official"
    everything = load_pope(ann, image_dir=img)
    assert [s.split for s in everything] == ["random"] * 3 + ["adversarial"] * 3
    assert {s.split for s in load_pope(ann, ["adversarial"], image_dir=img)} == {"adversarial"}
    with pytest.raises(ValueError, match="present"):
        load_pope(ann, "popular", image_dir=img)
    one = load_pope(ann / "coco_pope_random.json", image_dir=img)
    assert len(one) == 3 and one[0].image == str(img / OFFICIAL_ROWS[0]["image"])
    with pytest.raises(ValueError, match="present"):
        load_pope(ann / "coco_pope_random.json", "popular", image_dir=img)
    unnamed = _write_jsonl(tmp_path / "questions.jsonl", OFFICIAL_ROWS)
    assert {s.split for s in load_pope(unnamed, "popular")} == {"popular"}
    with pytest.raises(ValueError, match="split"):
        load_pope(unnamed)

    (tmp_path / "llava").mkdir()
    qfile, llava_ann, llava_img = _llava_setup(tmp_path / "llava")
    assert detect_format(qfile) == "llava-single"
    got = load_pope(qfile, "random", image_dir=llava_img, answers_path=llava_ann)
    assert [(s.question_id, s.label) for s in got] == [("2", "yes"), ("4", "no")]
    with pytest.raises(FileNotFoundError):
        load_pope(tmp_path / "nope.jsonl")
