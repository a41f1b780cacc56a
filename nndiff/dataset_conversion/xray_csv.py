"""Convert a 2D X-ray folder with a label CSV (CheXpert style) into a class-conditioned nnDiff
generation dataset.

Source layout (CheXpert v1.0; other CSV-described X-ray sets with a ``Path`` column work the same)::

    SRC/train.csv                       Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,...
    SRC/train/patient00001/study1/view1_frontal.jpg
    CSV Path: CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg

``Path`` is resolved against ``SRC``, then against ``SRC``'s parent (CheXpert's paths start with
the release folder's name), then with its first component dropped. A row whose image exists
nowhere is an error naming the row and the path.

One case per CSV row: ``imagesTr/{case}_0000.png`` (grey, the source's 8/16-bit values, lossless
PNG even for JPEG input so no second compression), case id from the path below the patient folder
(``patient00001_study1_view1_frontal``), subject = the ``patientNNNNN`` path component (all studies
of a patient stay in one fold), else the image's folder.

Conditions (``--condition_column``, one or several): finding columns (values 1.0 / 0.0 / -1.0 /
blank) become categorical conditions with values ``positive`` / ``negative`` (and ``uncertain``
with ``--uncertain class``). Uncertain (-1): ``--uncertain`` ``zeros`` (default: negative, CheXpert's
U-Zeros), ``ones`` (positive, U-Ones), ``class`` (own category) or ``drop`` (row left out). Blank:
not mentioned in the report; ``--blank`` ``negative`` (default, CheXpert's own convention) or
``drop``. Other numeric columns (``Age``) are continuous, anything else categorical (``Sex``,
``Frontal/Lateral``, ``AP/PA``); a blank value there drops the row when that column is a condition.
Every CSV column is copied into ``metadata.json`` (under its CSV name), declared or not.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.dataset.io import ImageProperties, read_file
from nndiff.dataset_conversion.common import (
    converter_parser,
    dataset_folder_name,
    dataset_json,
    dataset_writer,
    require_input,
    run_converter,
    write_case_image,
    write_dataset_files,
)
from nndiff.errors import NnDiffError
from nndiff.utils.files import save_json

logger = logging.getLogger(__name__)

PATH_COLUMN = "Path"
FINDING_CODES = {"1.0": "positive", "1": "positive", "0.0": "negative", "0": "negative",
                 "-1.0": "uncertain", "-1": "uncertain"}
UNCERTAIN_POLICIES = ("zeros", "ones", "class", "drop")
BLANK_POLICIES = ("negative", "drop")
PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)
CONVERSION_RECORD = "xray_csv_conversion.json"
RESERVED = ("subject", "healthy")


@dataclass(frozen=True)
class ColumnKind:
    """How a CSV column becomes a condition: ``finding``, ``continuous`` or ``categorical``."""

    name: str
    kind: str


def column_kind(name: str, values: Sequence[str]) -> ColumnKind:
    """``finding`` if every non-blank value is 1/0/-1, ``continuous`` if every one is a number, else categorical."""
    present = [v for v in values if v != ""]
    if present and all(v in FINDING_CODES for v in present):
        return ColumnKind(name, "finding")
    if present and all(_is_number(v) for v in present):
        return ColumnKind(name, "continuous")
    return ColumnKind(name, "categorical")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def finding_value(raw: str, uncertain: str, blank: str) -> str | None:
    """The category of one finding cell under the uncertain/blank policies; ``None`` drops the row."""
    if raw == "":
        return None if blank == "drop" else "negative"
    value = FINDING_CODES[raw]
    if value != "uncertain" or uncertain == "class":
        return value
    return {"zeros": "negative", "ones": "positive", "drop": None}[uncertain]


def condition_value(column: ColumnKind, raw: str, uncertain: str, blank: str) -> Any:
    """The metadata value of a condition cell (``None``: the row cannot be used)."""
    if column.kind == "finding":
        return finding_value(raw, uncertain, blank)
    if raw == "":
        return None
    return float(raw) if column.kind == "continuous" else raw


def condition_spec(column: ColumnKind, values: Sequence[Any], uncertain: str) -> dict[str, Any]:
    """dataset.json ``conditions`` entry of one column."""
    if column.kind == "continuous":
        return {"type": "continuous"}
    if column.kind == "finding":
        categories = ["negative", "positive"] + (["uncertain"] if uncertain == "class" else [])
        return {"type": "categorical", "values": categories}
    categories = sorted(set(values))
    return {"type": "categorical", "values": categories} if len(categories) >= 2 else {"type": "categorical"}


def resolve_image(root: Path, relative: str) -> Path | None:
    """The image a CSV ``Path`` names: under ``root``, under its parent, or with the first part dropped."""
    rel = Path(relative)
    candidates = [root / rel, root.parent / rel]
    if len(rel.parts) > 1:
        candidates.append(root / Path(*rel.parts[1:]))
    return next((c for c in candidates if c.is_file()), None)


def case_and_subject(relative: str) -> tuple[str, str]:
    """Case id (path below the patient folder, joined by ``_``) and subject (the patient folder)."""
    parts = Path(relative).with_suffix("").parts
    patient = next((i for i, p in enumerate(parts) if PATIENT.match(p)), None)
    if patient is None:
        subject = parts[-2] if len(parts) > 1 else parts[-1]
        case_parts = parts[-2:]
    else:
        subject, case_parts = parts[patient], parts[patient:]
    case = re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(case_parts))
    return case, subject


def read_grey(path: Path) -> tuple[np.ndarray, ImageProperties]:
    """A grey 2D image ``(1, Y, X)``; RGB files with three equal channels are accepted as grey."""
    array, props = read_file(path)
    if array.shape[0] == 3:
        if not (np.array_equal(array[0], array[1]) and np.array_equal(array[0], array[2])):
            raise NnDiffError(f"{path} is a colour image; an X-ray must be grey. Fix: convert it to greyscale")
        props = ImageProperties(props.spacing, props.origin, props.direction, props.spatial_dims, props.shape,
                                dtype=props.dtype)
    if props.spatial_dims != 2:
        raise NnDiffError(f"{path} is not a 2D image. Fix: keep only 2D radiographs in the CSV")
    return array[0], props


def load_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (stripped strings) of the label CSV; it must have a ``Path`` column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if PATH_COLUMN not in header:
        raise NnDiffError(f"{path} has no '{PATH_COLUMN}' column (found {header}). Fix: use CheXpert's train.csv "
                          "or add a Path column with each image's relative path")
    if not rows:
        raise NnDiffError(f"{path} has no rows. Fix: pass the label CSV that lists the images")
    return header, rows


def convert_xray_csv(source: str | Path, raw_root: str | Path, dataset_id: int, condition_columns: Sequence[str],
                     csv_file: str | Path | None = None, uncertain: str = "zeros", blank: str = "negative",
                     name: str | None = None) -> Path:
    """Write the class-conditioned generation dataset; returns its folder."""
    source = require_input(Path(source), "an X-ray folder with a label CSV", "pass -i with the image folder")
    csv_path = require_input(Path(csv_file) if csv_file else source / "train.csv", "the label CSV (Path, findings)",
                             "pass --csv with the label file")
    header, rows = load_csv(csv_path)
    columns = _condition_columns(header, rows, condition_columns, csv_path)
    cases, metadata, subjects, dropped = _collect(rows, columns, uncertain, blank, source, csv_path)
    if not cases:
        raise NnDiffError(f"{csv_path}: every row was dropped by the uncertain/blank rules ({len(dropped)} rows). "
                          "Fix: use --uncertain zeros/ones/class and --blank negative")
    name = name or "XrayCSV"
    conditions = {c.name: condition_spec(c, [m[c.name] for m in metadata.values()], uncertain) for c in columns}
    with dataset_writer(raw_root, dataset_id, name) as folder:
        for case_id, image_path in cases.items():
            array, props = read_grey(image_path)
            write_case_image(folder, "imagesTr", case_id, 0, array, props, ".png")
        dataset = dataset_json(task="generation", channel_names={0: "xray"}, num_training=len(cases),
                               file_ending=".png", name=name, conditions=conditions,
                               description=f"X-rays from {csv_path.name}, conditioned on {[c.name for c in columns]}")
        write_dataset_files(folder, dataset, subjects, metadata)
        save_json({"csv": str(csv_path), "uncertain": uncertain, "blank": blank, "conditions": conditions,
                   "dropped_rows": dropped}, folder / CONVERSION_RECORD)
    logger.info("X-ray CSV: %d case(s), %d row(s) dropped", len(cases), len(dropped))
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def _condition_columns(header: list[str], rows: list[dict[str, str]], names: Sequence[str],
                       csv_path: Path) -> list[ColumnKind]:
    if not names:
        raise NnDiffError("no --condition_column given. Fix: name one or more CSV columns, e.g. Cardiomegaly")
    unknown = [n for n in names if n not in header or n == PATH_COLUMN]
    if unknown:
        raise NnDiffError(f"{csv_path}: condition column(s) {unknown} are not columns of the CSV (found {header}). "
                          "Fix: pass column names exactly as in the header")
    reserved = [n for n in names if n.lower() in RESERVED]
    if reserved:
        raise NnDiffError(f"condition column(s) {reserved} use a reserved metadata name. Fix: rename the column")
    return [column_kind(n, [r.get(n, "") for r in rows]) for n in names]


def _collect(rows: list[dict[str, str]], columns: list[ColumnKind], uncertain: str, blank: str, root: Path,
             csv_path: Path) -> tuple[dict[str, Path], dict[str, dict[str, Any]], dict[str, str], list[dict[str, Any]]]:
    """Images, metadata and subjects of the usable rows; rows dropped by the policies are listed."""
    cases: dict[str, Path] = {}
    metadata: dict[str, dict[str, Any]] = {}
    subjects: dict[str, str] = {}
    dropped: list[dict[str, Any]] = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        image = resolve_image(root, row[PATH_COLUMN])
        if image is None:
            raise NnDiffError(f"{csv_path} row {number}: the image {row[PATH_COLUMN]!r} exists neither under {root} "
                              f"nor under {root.parent}. Fix: pass -i with the folder the CSV paths are relative to, "
                              "or remove the row")
        values = {c.name: condition_value(c, row.get(c.name, ""), uncertain, blank) for c in columns}
        empty = [k for k, v in values.items() if v is None]
        if empty:
            dropped.append({"row": number, "path": row[PATH_COLUMN], "columns": empty})
            continue
        case_id, subject = case_and_subject(row[PATH_COLUMN])
        if case_id in cases:
            raise NnDiffError(f"{csv_path} row {number}: {row[PATH_COLUMN]!r} gives case id {case_id}, already used "
                              "by another row. Fix: remove the duplicate row")
        extra = {k: v for k, v in row.items() if k != PATH_COLUMN and k.lower() not in RESERVED}
        cases[case_id], subjects[case_id] = image, subject
        metadata[case_id] = {**extra, **values, "source_path": row[PATH_COLUMN]}
    return cases, metadata, subjects, dropped


def convert_parser() -> argparse.ArgumentParser:
    """Arguments of ``nndiff_convert_xray_csv``."""
    p = converter_parser("nndiff_convert_xray_csv", "Convert 2D X-rays listed in a label CSV (CheXpert style) "
                         "into a class-conditioned nnDiff generation dataset.")
    p.add_argument("--csv", default=None, help="label CSV (default SRC/train.csv)")
    p.add_argument("--condition_column", nargs="+", required=True, help="CSV column(s) used as conditions")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="zeros",
                   help="uncertain (-1) findings: zeros = negative (default), ones = positive, class, drop")
    p.add_argument("--blank", choices=BLANK_POLICIES, default="negative",
                   help="blank findings (not mentioned): negative (default) or drop the row")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_xray_csv(args.input, raw_root, args.dataset_id, args.condition_column, args.csv,
                            args.uncertain, args.blank, args.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nndiff_convert_xray_csv``; returns the exit code."""
    return run_converter(convert_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
