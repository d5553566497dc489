"""POPE (Polling-based Object Probing Evaluation) data loading.

Three on-disk forms are supported, each loaded into a list of :class:`PopeSample`:

* **official** (:func:`load_official`): the POPE repository's ``coco_pope_{random,popular,adversarial}
  .json`` files. Despite the ``.json`` name they are JSON Lines, one object per line::

      {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the
       image?", "label": "yes"}

  Images are COCO val2014 files found under ``image_dir``.
* **LLaVA-1.5 single file** (:func:`load_llava_single_file`): LLaVA's
  ``playground/data/eval/pope/llava_pope_test.jsonl``, the three splits in one file with a ``"category"``
  key holding the split, the prompt suffix already appended to ``"text"`` and *no* ``"label"``: LLaVA's
  ``eval_pope.py`` takes the labels from the annotation folder ``coco/coco_pope_<category>.json``, pairing
  the n-th question of a category with the n-th line of that file. LLaVA-1.5 used an older POPE release
  (random split 2910 questions, 8910 in all), so the current 3000-line official files do not pair with it.
* **lmms-eval** (:func:`load_lmms_eval`): the ``lmms-lab/POPE`` Hugging Face dataset stored locally,
  as parquet (``data/test-0000x-of-00003.parquet`` of the ``default`` config, ``Full/<split>/*.parquet``
  of the ``Full`` config) or as a ``datasets`` ``save_to_disk`` folder (Arrow IPC *stream* files plus
  ``state.json``/``dataset_info.json``, or a ``dataset_dict.json`` with one sub-folder per split). Its
  columns (dataset card of lmms-lab/POPE, and lmms-eval ``tasks/pope/utils.py``): ``id`` (string),
  ``question_id`` (string), ``question`` (string), ``answer`` (string, "yes"/"no"), ``image_source``
  (string, the COCO file stem such as ``COCO_val2014_000000310196``), ``image`` (HF ``Image`` feature:
  a struct ``{"bytes": binary, "path": string}``), ``category`` (string: ``adversarial``, ``popular``,
  ``random``; the ``default`` config holds all 9000 questions in one ``test`` split). Images stay bytes
  (``PopeSample.image_bytes``). Needs ``pyarrow`` (``pip install pyarrow -c constraints-cpu.txt``), not
  the ``datasets`` package.

:func:`load_pope` picks the loader from what the path looks like. Every loader raises
:class:`PopeFormatError` (a ``ValueError``) naming the file and the 1-based line (row, for parquet and
Arrow) of a malformed record.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LLAVA_PROMPT_SUFFIX",
    "POPE_SPLITS",
    "PopeFormatError",
    "PopeSample",
    "detect_format",
    "load_llava_single_file",
    "load_lmms_eval",
    "load_official",
    "load_pope",
]

POPE_SPLITS = ("random", "popular", "adversarial")
#: Appended to every question by LLaVA-1.5's POPE file and lmms-eval's default prompt.
LLAVA_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."

_IMAGE_EXT = re.compile(r"\.(jpe?g|png|bmp|gif|webp|tiff?)$", re.IGNORECASE)
_SPLIT_IN_NAME = re.compile(r"(random|popular|adversarial)")
_OFFICIAL_NAME = re.compile(r".*pope_(random|popular|adversarial)\.jsonl?")


class PopeFormatError(ValueError):
    """A malformed POPE record: the message starts with ``"<file>, line <n>: "`` (``row`` for tables)."""

    def __init__(self, path: str | Path, line: int | None, reason: str, unit: str = "line"):
        self.path = str(path)
        self.line = line
        self.reason = reason
        self.unit = unit
        where = self.path if line is None else f"{self.path}, {unit} {line}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.reason, self.unit))


@dataclass
class PopeSample:
    """One POPE question.

    ``image`` is a file path (or the bare file name when no image folder was given) and ``image_bytes``
    the encoded image for sources that embed images (lmms-eval); one of the two is set. ``image_id`` is
    the image file's stem (``COCO_val2014_000000310196``), shared by the 6 questions about one image.
    ``label`` is ``"yes"`` or ``"no"``; ``split`` is ``random``/``popular``/``adversarial`` for COCO POPE;
    ``category`` is the source's own ``category`` field when it has one. ``text`` is the bare question
    (LLaVA's prompt suffix removed).
    """

    question_id: str
    image: str | None
    image_id: str
    text: str
    label: str
    split: str
    category: str | None = None
    image_bytes: bytes | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------- helpers


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; errors name the file and the line (bytes that are
    not UTF-8 included); an unreadable file is a PopeFormatError naming it."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PopeFormatError(path, None, f"cannot be read ({e.strerror})") from None
    with f:
        for lineno, data in enumerate(f, 1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PopeFormatError(path, lineno, f"not UTF-8 text (byte 0x{data[e.start]:02x} at column "
                                                    f"{e.start + 1}); is this a JSON Lines file?") from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PopeFormatError(path, lineno, f"invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise PopeFormatError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _check_not_empty(path: Path, count: int, what: str = "POPE questions") -> None:
    if count == 0:
        raise PopeFormatError(path, None, f"no {what}: the file is empty" if path.stat().st_size == 0
                              else f"no {what}: the file holds only blank lines")


def _image_path(path: Path, lineno: int, image_dir: str | Path, name: str, unit: str = "line") -> str:
    """`image_dir / name`, refusing a name that leaves the folder (absolute, or '..' above it): a data file may
    only name images inside the folder it was given with (checked on the text: symlinks inside it are fine)."""
    folder = os.path.normpath(image_dir)
    full = os.path.normpath(os.path.join(folder, name))
    if os.path.isabs(name) or not full.startswith(folder.rstrip(os.sep) + os.sep):
        raise PopeFormatError(path, lineno, f"image {name!r} is outside the image folder {image_dir} (a data file "
                                            "may only name files inside it)", unit)
    return str(Path(image_dir) / name)


def _get(path: Path, lineno: int, obj: Mapping, key: str, unit: str = "line") -> Any:
    if key not in obj or obj[key] is None:
        raise PopeFormatError(path, lineno, f"missing key {key!r}", unit)
    return obj[key]


def _as_qid(path: Path, lineno: int, value: Any, unit: str = "line") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
        raise PopeFormatError(
            path, lineno, f"question_id must be an int or a non-empty string, got {value!r}", unit
        )
    return str(value)


def _as_str(path: Path, lineno: int, key: str, value: Any, unit: str = "line") -> str:
    if not isinstance(value, str) or not value.strip():
        raise PopeFormatError(path, lineno, f"{key!r} must be a non-empty string, got {value!r}", unit)
    return value


def _as_label(path: Path, lineno: int, value: Any, unit: str = "line") -> str:
    lab = value.lower().strip() if isinstance(value, str) else None
    if lab not in ("yes", "no"):
        raise PopeFormatError(path, lineno, f"label must be 'yes' or 'no', got {value!r}", unit)
    return lab


def _image_id(name: str) -> str:
    """``.../COCO_val2014_000000310196.jpg`` -> ``COCO_val2014_000000310196``."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _IMAGE_EXT.sub("", base)


def _infer_split(path: Path) -> str | None:
    m = _SPLIT_IN_NAME.search(path.name.lower())
    return m.group(1) if m else None


def _strip_suffix(text: str) -> str:
    return text[: -len(LLAVA_PROMPT_SUFFIX)] if text.endswith(LLAVA_PROMPT_SUFFIX) else text


def _check_unique(path: Path, lineno: int, seen: dict, split: str, qid: str, unit: str = "line") -> None:
    key = (split, qid)
    if key in seen:
        raise PopeFormatError(
            path,
            lineno,
            f"duplicate question_id {qid!r} in split {split!r} (first at {unit} {seen[key]})",
            unit,
        )
    seen[key] = lineno


def _check_images(path: Path, samples: list[PopeSample], lines: list[int], image_dir: str | Path) -> None:
    """Raise FileNotFoundError naming the first missing image file (in file order)."""
    exists: dict[str, bool] = {}
    first: tuple[PopeSample, int] | None = None
    for s, lineno in zip(samples, lines):
        if s.image is None:
            continue
        if s.image not in exists:
            exists[s.image] = Path(s.image).is_file()
        if not exists[s.image] and first is None:
            first = (s, lineno)
    if first is not None:
        n_missing = sum(not ok for ok in exists.values())
        s, lineno = first
        raise FileNotFoundError(
            f"{path}, line {lineno}: image file not found: {s.image} ({n_missing} of {len(exists)} distinct "
            f"image files missing under {image_dir}; pass check_images=False to skip this check)"
        )


# ------------------------------------------------------------------------------------------ official


def load_official(
    jsonl_path: str | Path,
    image_dir: str | Path | None = None,
    split: str | None = None,
    *,
    check_images: bool = True,
) -> list[PopeSample]:
    """Load one official POPE file (JSON Lines with ``question_id, image, text, label``).

    ``image`` becomes ``image_dir / image`` (the bare name when ``image_dir`` is None, and then no image
    check). ``split`` defaults to the split named in the file name (``coco_pope_random.json`` ->
    ``random``). With ``check_images`` a FileNotFoundError names the first missing image file.
    """
    path = Path(jsonl_path)
    if split is None:
        split = _infer_split(path)
        if split is None:
            raise ValueError(f"cannot tell the POPE split from the file name {path.name!r}: pass split= "
                             "(vlmeff eval: --split <name>)")
    samples: list[PopeSample] = []
    lines: list[int] = []
    seen: dict = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _as_qid(path, lineno, _get(path, lineno, obj, "question_id"))
        image_name = _as_str(path, lineno, "image", _get(path, lineno, obj, "image"))
        text = _as_str(path, lineno, "text", _get(path, lineno, obj, "text"))
        label = _as_label(path, lineno, _get(path, lineno, obj, "label"))
        _check_unique(path, lineno, seen, split, qid)
        image = _image_path(path, lineno, image_dir, image_name) if image_dir is not None else image_name
        samples.append(PopeSample(qid, image, _image_id(image_name), _strip_suffix(text), label, split))
        lines.append(lineno)
    _check_not_empty(path, len(samples))
    if check_images and image_dir is not None:
        _check_images(path, samples, lines, image_dir)
    return samples


def _official_files(folder: Path) -> dict[str, Path]:
    """split -> ``*pope_<split>.json[l]`` file directly inside ``folder``."""
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _OFFICIAL_NAME.fullmatch(p.name)
        if m and p.is_file():
            found.setdefault(m.group(1), []).append(p)
    ambiguous = {s: [q.name for q in ps] for s, ps in found.items() if len(ps) > 1}
    if ambiguous:
        raise ValueError(f"{folder}: several POPE annotation files per split {ambiguous}; pass one file")
    return {s: ps[0] for s, ps in found.items()}


# ------------------------------------------------------------------------------------ LLaVA single file


def _labels_from_file(path: Path) -> dict[str, str]:
    """question_id -> label from a JSON Lines file with ``question_id`` and ``label`` (or ``answer``)."""
    out: dict[str, str] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _as_qid(path, lineno, _get(path, lineno, obj, "question_id"))
        key = "label" if "label" in obj else "answer"
        label = _as_label(path, lineno, _get(path, lineno, obj, key))
        if qid in out:
            raise PopeFormatError(path, lineno, f"duplicate question_id {qid!r}")
        out[qid] = label
    _check_not_empty(path, len(out), "labels")
    return out


def _labels_by_order(qpath: Path, rows: list[dict], ann_dir: Path) -> list[str]:
    """LLaVA's pairing: the n-th question of a category gets the n-th label of ``*pope_<category>.json``."""
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_cat.setdefault(r["category"], []).append(i)
    files = _official_files(ann_dir)
    labels: list[str] = [""] * len(rows)
    for cat, idxs in by_cat.items():
        if cat not in files:
            raise FileNotFoundError(
                f"{ann_dir}: no *pope_{cat}.json annotation file for category {cat!r} of {qpath}"
            )
        ann = files[cat]
        ann_rows = list(_iter_jsonl(ann))
        if len(ann_rows) != len(idxs):
            raise PopeFormatError(
                ann,
                None,
                f"{len(ann_rows)} annotations but {len(idxs)} questions of category {cat!r} in {qpath}; labels "
                "are paired by position, so the counts must match (LLaVA-1.5's llava_pope_test.jsonl pairs "
                "with the older POPE release, random split 2910 lines)",
            )
        for i, (ann_line, obj) in zip(idxs, ann_rows):
            row = rows[i]
            label = _as_label(ann, ann_line, _get(ann, ann_line, obj, "label"))
            ann_image = obj.get("image")
            if ann_image is not None and ann_image != row["image_name"]:
                raise PopeFormatError(
                    ann,
                    ann_line,
                    f"image {ann_image!r} does not match {row['image_name']!r} of the question at "
                    f"{qpath}, line {row['lineno']} (files not paired)",
                )
            if row["label"] is not None and row["label"] != label:
                raise PopeFormatError(
                    qpath,
                    row["lineno"],
                    f"label {row['label']!r} disagrees with {label!r} in {ann}, line {ann_line}",
                )
            labels[i] = label
    return labels


def load_llava_single_file(
    path: str | Path,
    image_dir: str | Path | None = None,
    answers_path: str | Path | Mapping[Any, str] | None = None,
    *,
    check_images: bool = True,
    strip_prompt_suffix: bool = True,
) -> list[PopeSample]:
    """Load a LLaVA-1.5 style single POPE file (``question_id, image, text, category`` [+ ``label``]).

    The split is the line's ``category``. A line without ``label`` takes it from ``answers_path``:

    * a folder (LLaVA's ``playground/data/eval/pope/coco``) holding ``*pope_<category>.json``: the n-th
      question of a category gets the n-th label of that file, as LLaVA's ``eval_pope.py`` pairs them
      (counts and image names must agree);
    * a JSON Lines file with ``question_id`` and ``label`` (or ``answer``) per line;
    * a mapping ``question_id -> label`` (keys compared as strings).

    A line without label and nowhere to find one is a :class:`PopeFormatError`. With
    ``strip_prompt_suffix`` the trailing :data:`LLAVA_PROMPT_SUFFIX` is removed from ``text``.
    """
    qpath = Path(path)
    rows: list[dict] = []
    seen: dict = {}
    for lineno, obj in _iter_jsonl(qpath):
        qid = _as_qid(qpath, lineno, _get(qpath, lineno, obj, "question_id"))
        image_name = _as_str(qpath, lineno, "image", _get(qpath, lineno, obj, "image"))
        text = _as_str(qpath, lineno, "text", _get(qpath, lineno, obj, "text"))
        category = _as_str(qpath, lineno, "category", _get(qpath, lineno, obj, "category")).strip()
        label = _as_label(qpath, lineno, obj["label"]) if obj.get("label") is not None else None
        _check_unique(qpath, lineno, seen, category, qid)
        if strip_prompt_suffix:
            text = _strip_suffix(text)
        rows.append(
            {
                "lineno": lineno,
                "qid": qid,
                "image_name": image_name,
                "text": text,
                "category": category,
                "label": label,
            }
        )
    _check_not_empty(qpath, len(rows))

    unlabeled = [r for r in rows if r["label"] is None]
    if unlabeled:
        if answers_path is None:
            raise PopeFormatError(
                qpath,
                unlabeled[0]["lineno"],
                "no 'label' and no answers_path given (LLaVA keeps POPE labels in coco/coco_pope_<category>"
                ".json: pass that folder as answers_path)",
            )
        if isinstance(answers_path, Mapping):
            mapping = {str(k): _as_label(qpath, None, v) for k, v in answers_path.items()}
            labels = [r["label"] or mapping.get(r["qid"]) for r in rows]
            source: Any = "answers mapping"
        elif Path(answers_path).is_dir():
            labels = _labels_by_order(qpath, rows, Path(answers_path))
            source = answers_path
        else:
            mapping = _labels_from_file(Path(answers_path))
            labels = [r["label"] or mapping.get(r["qid"]) for r in rows]
            source = answers_path
        for r, lab in zip(rows, labels):
            if lab is None:
                raise PopeFormatError(
                    qpath, r["lineno"], f"question_id {r['qid']!r} has no label in {source}"
                )
    else:
        labels = [r["label"] for r in rows]

    samples: list[PopeSample] = []
    for r, lab in zip(rows, labels):
        image = (_image_path(qpath, r["lineno"], image_dir, r["image_name"]) if image_dir is not None
                 else r["image_name"])
        samples.append(
            PopeSample(
                r["qid"], image, _image_id(r["image_name"]), r["text"], lab, r["category"], r["category"]
            )
        )
    if check_images and image_dir is not None:
        _check_images(qpath, samples, [r["lineno"] for r in rows], image_dir)
    return samples


# ------------------------------------------------------------------------------------------ lmms-eval


def _import_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading lmms-eval POPE (parquet / Arrow) needs pyarrow: pip install pyarrow -c constraints-cpu.txt"
        ) from e
    return pyarrow


def _container_split(path: Path) -> str | None:
    """Split implied by the location of a parquet file (``Full/random/0000.parquet``, ``random-0000.parquet``)."""
    if path.parent.name in POPE_SPLITS:
        return path.parent.name
    head = path.name.split("-", 1)[0].split(".", 1)[0]
    return head if head in POPE_SPLITS else None


def _arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        try:
            files = json.loads(state.read_text(encoding="utf-8")).get("_data_files")
        except (json.JSONDecodeError, AttributeError) as e:
            raise PopeFormatError(state, None, f"unreadable state.json ({e})") from None
        if files:
            return [folder / f["filename"] for f in files]
    return sorted(p for p in folder.glob("*.arrow") if not p.name.startswith("cache-"))


def _lmms_sources(path: Path) -> list[tuple[Path, str, str | None]]:
    """(file, "parquet" | "arrow", split implied by the container) for every table file of the dataset."""
    if path.is_file():
        kind = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"{path}: expected a .parquet or .arrow file or a dataset folder")
        return [(path, kind, _container_split(path))]
    dd = path / "dataset_dict.json"
    if dd.is_file():
        try:
            splits = json.loads(dd.read_text(encoding="utf-8"))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PopeFormatError(dd, None, f"unreadable dataset_dict.json ({e})") from None
        out = []
        for s in splits:
            out += [(f, "arrow", s if s in POPE_SPLITS else None) for f in _arrow_files(path / s)]
        return out
    arrows = _arrow_files(path)
    if arrows:
        split = path.name if path.name in POPE_SPLITS else None
        return [(f, "arrow", split) for f in arrows]
    parquets = sorted(path.rglob("*.parquet"))
    if parquets:
        return [(f, "parquet", _container_split(f)) for f in parquets]
    raise FileNotFoundError(f"{path}: no .parquet or .arrow files (nor dataset_dict.json / state.json) found")


def _iter_batches(pa, path: Path, kind: str) -> Iterator:
    try:
        if kind == "parquet":
            yield from pa.parquet.ParquetFile(str(path)).iter_batches(batch_size=256)
            return
        with pa.memory_map(str(path)) as src:
            try:  # datasets writes Arrow IPC *streams*; accept the random-access file format too
                stream = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                stream = None
                src.seek(0)
            if stream is not None:
                yield from stream
            else:
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
    except (pa.ArrowInvalid, OSError) as e:
        raise PopeFormatError(path, None, f"cannot read {kind} data: {e}") from None


def _pick(names: Iterable[str], *candidates: str) -> str | None:
    names = set(names)
    return next((c for c in candidates if c in names), None)


def load_lmms_eval(path: str | Path) -> list[PopeSample]:
    """Load lmms-eval's POPE (``lmms-lab/POPE``) from parquet or a ``save_to_disk`` folder.

    Columns used: ``question_id`` (else ``id``), ``question`` (else ``text``), ``answer`` (else ``label``),
    ``image`` (``{"bytes", "path"}`` struct or raw bytes), optional ``image_source`` (-> ``image_id``) and
    ``category`` (-> ``split``; without it the split comes from the folder / file name). Rows are
    numbered from 1 within each file in error messages.
    """
    pa = _import_pyarrow()
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"POPE data {root}: no such file or folder")
    samples: list[PopeSample] = []
    seen: dict = {}
    for f, kind, container_split in _lmms_sources(root):
        rowno = 0
        cols: tuple | None = None
        for batch in _iter_batches(pa, f, kind):
            if cols is None:
                names = batch.schema.names
                cols = (
                    _pick(names, "question_id", "id"),
                    _pick(names, "question", "text"),
                    _pick(names, "answer", "label"),
                    _pick(names, "image"),
                )
                wanted = ("question_id (or id)", "question (or text)", "answer (or label)", "image")
                missing = [w for w, c in zip(wanted, cols) if c is None]
                if missing:
                    raise PopeFormatError(f, None, f"missing column(s) {missing}; columns: {names}")
            qid_col, q_col, a_col, img_col = cols
            for row in batch.to_pylist():
                rowno += 1
                samples.append(
                    _lmms_sample(f, rowno, row, qid_col, q_col, a_col, img_col, container_split, seen)
                )
        if rowno == 0:
            raise PopeFormatError(f, None, "no rows (an empty table)")
    return samples


def _lmms_sample(f, rowno, row, qid_col, q_col, a_col, img_col, container_split, seen) -> PopeSample:
    qid = _as_qid(f, rowno, _get(f, rowno, row, qid_col, "row"), "row")
    text = _as_str(f, rowno, q_col, _get(f, rowno, row, q_col, "row"), "row").strip()
    label = _as_label(f, rowno, _get(f, rowno, row, a_col, "row"), "row")
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise PopeFormatError(f, rowno, f"'category' must be a string, got {category!r}", "row")
    category = category.strip() if category else None
    split = category or container_split
    if not split:
        raise PopeFormatError(f, rowno, "no 'category' and no split in the folder / file name", "row")
    image = row.get(img_col)
    if isinstance(image, dict):
        data, ipath = image.get("bytes"), image.get("path")
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data, ipath = image, None
    elif image is None:
        data, ipath = None, None
    else:
        raise PopeFormatError(
            f, rowno, f"'image' must be a {{bytes, path}} struct or bytes, got {type(image).__name__}", "row"
        )
    if not data and not ipath:
        raise PopeFormatError(f, rowno, "image has neither bytes nor path", "row")
    source = row.get("image_source")
    if isinstance(source, str) and source.strip():
        image_id = _image_id(source.strip())
    elif ipath:
        image_id = _image_id(ipath)
    else:
        image_id = qid
    _check_unique(f, rowno, seen, split, qid, "row")
    return PopeSample(
        question_id=qid,
        image=None if data else ipath,
        image_id=image_id,
        text=_strip_suffix(text),
        label=label,
        split=split,
        category=category,
        image_bytes=bytes(data) if data else None,
    )


# ------------------------------------------------------------------------------------------ dispatcher


def detect_format(source: str | Path) -> str:
    """``"lmms-eval"``, ``"official-dir"``, ``"official"`` or ``"llava-single"`` for a POPE path.

    Files: ``.parquet``/``.arrow`` -> lmms-eval; JSON Lines whose first record has ``category`` ->
    llava-single, otherwise official. Folders: a ``datasets`` folder (``dataset_dict.json``,
    ``state.json`` or ``*.arrow``) -> lmms-eval; ``*pope_<split>.json`` files -> official-dir; parquet
    files anywhere below -> lmms-eval.
    """
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"POPE data {p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() in (".parquet", ".arrow"):
            return "lmms-eval"
        for _, first in _iter_jsonl(p):  # a bad first line is reported here, with the file and the line
            return "llava-single" if "category" in first else "official"
        return "official"  # empty: the loader says so
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file() or any(p.glob("*.arrow")):
        return "lmms-eval"
    if _official_files(p):
        return "official-dir"
    if any(p.rglob("*.parquet")):
        return "lmms-eval"
    raise ValueError(
        f"{p}: not a recognised POPE source (official files, LLaVA file, parquet or Arrow dataset)"
    )


def load_pope(
    source: str | Path,
    split: str | Iterable[str] | None = None,
    *,
    image_dir: str | Path | None = None,
    answers_path: str | Path | Mapping[Any, str] | None = None,
    check_images: bool = True,
) -> list[PopeSample]:
    """Load POPE from any supported source (see :func:`detect_format`), optionally keeping some splits.

    ``split`` (a name or several) filters the samples; for a single official file whose name does not
    say its split, a single ``split`` names it. ``image_dir`` is the COCO val2014 folder for the official
    and LLaVA forms; ``answers_path`` is passed to :func:`load_llava_single_file`. Selecting a split that
    the source does not contain is an error.
    """
    p = Path(source)
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    kind = detect_format(p)
    if kind == "lmms-eval":
        samples = load_lmms_eval(p)
    elif kind == "llava-single":
        samples = load_llava_single_file(p, image_dir, answers_path, check_images=check_images)
    elif kind == "official-dir":
        files = _official_files(p)
        if wanted is not None and not wanted & set(files):
            raise ValueError(f"{p}: no POPE file for split(s) {sorted(wanted)}; present: {sorted(files)}")
        samples = []
        for s, f in sorted(files.items(), key=lambda kv: POPE_SPLITS.index(kv[0])):
            if wanted is None or s in wanted:
                samples += load_official(f, image_dir, s, check_images=check_images)
    else:
        name = _infer_split(p)
        if name is None and isinstance(split, str):
            name = split
        if name is None:
            raise ValueError(f"cannot tell the POPE split from the file name {p.name!r}: pass split='<name>' "
                             "(vlmeff eval: --split <name>)")
        samples = load_official(p, image_dir, name, check_images=check_images)
    if wanted is not None:
        present = sorted({s.split for s in samples})
        samples = [s for s in samples if s.split in wanted]
        if not samples:
            raise ValueError(f"{p}: no samples of split(s) {sorted(wanted)}; present: {present}")
    return samples


# ----------------------------------------------------------------------------------------------- synthetic world

SYNTHETIC_PREFIX = "synthetic:"


def load_synthetic(num_images: int = 500, seed_base: int | None = None) -> list[PopeSample]:
    """POPE of vlmeff's synthetic world (vlmeff.reference.world.make_pope): 3 splits x num_images x 6 questions.

    Images are not stored: ``image`` is ``"synthetic:<seed>"`` and `synthetic_image` renders it on demand.
    """
    from vlmeff.reference import world

    base = world.EVAL_SEED_BASE if seed_base is None else seed_base
    samples = []
    for split, questions in world.make_pope(num_images=num_images, seed_base=base).items():
        for q in questions:
            samples.append(PopeSample(question_id=q.question_id, image=f"{SYNTHETIC_PREFIX}{q.image_seed}",
                                      image_id=str(q.image_seed), text=q.text, label=q.label, split=split,
                                      category=q.category))
    return samples


def synthetic_image(sample: PopeSample):
    """The image of a synthetic POPE sample (rendered from its seed), or the sample's own image otherwise."""
    from vlmeff.reference import world

    if sample.image is not None and sample.image.startswith(SYNTHETIC_PREFIX):
        return world.render_scene(int(sample.image[len(SYNTHETIC_PREFIX):])).image
    from vlmeff.eval.runner import default_image_loader

    return default_image_loader(sample)
