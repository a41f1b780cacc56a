"""Shared pieces of the dataset converters (``nndiff_convert_<source>``).

Every converter writes one raw dataset (documentation/dataset_format.md) the same way:

- the target folder ``RAW/DatasetXXX_Name`` is built under a temporary name and moved into place
  only when complete (:func:`nndiff.utils.files.atomic_directory`), so a failed conversion leaves
  nothing half-written; a dataset id already used by another folder is refused first;
- ``dataset.json`` from :func:`dataset_json` (task, channel/target names, labels, counts, ending,
  the source's reference and licence);
- ``metadata.json`` with at least a ``subject`` per case, so cross-validation splits keep a
  subject's cases (slices, time points, contrasts) in one fold;
- the command line from :func:`converter_parser` (``-i SRC -o RAW -d ID [--name] [--task]``) and
  :func:`run_converter` (exit code 2 with the message for user errors, as every nnDiff command).
"""
from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from nndiff.dataset.raw_dataset import DATASET_FOLDER, parse_dataset_folder_name
from nndiff.dataset.io import ImageProperties, write_image
from nndiff.errors import NnDiffError
from nndiff.utils.files import atomic_directory, save_json

logger = logging.getLogger(__name__)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{id:03d}_{name}`` (nnU-Net's spelling); the name must be a plain identifier."""
    if not 0 <= int(dataset_id) <= 999:
        raise NnDiffError(f"dataset id {dataset_id} is outside 0..999. Fix: pass -d with a 3-digit id")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise NnDiffError(f"dataset name {name!r} must be letters, digits, '-' or '_'. Fix: pass --name")
    return f"Dataset{int(dataset_id):03d}_{name}"


def check_dataset_id_free(raw_root: Path, dataset_id: int, folder_name: str) -> None:
    """Refuse an id that another dataset folder of ``raw_root`` already uses (same name is replaced)."""
    if not raw_root.is_dir():
        return
    clashes = [p.name for p in raw_root.iterdir() if p.is_dir() and DATASET_FOLDER.match(p.name)
               and parse_dataset_folder_name(p.name)[0] == int(dataset_id) and p.name != folder_name]
    if clashes:
        raise NnDiffError(f"{raw_root} already holds dataset id {dataset_id} ({', '.join(clashes)}). "
                          "Fix: pick another -d ID or remove that folder")


@contextmanager
def dataset_writer(raw_root: str | Path, dataset_id: int, name: str) -> Iterator[Path]:
    """Yield a temporary folder to fill; it becomes ``raw_root/DatasetXXX_Name`` on success."""
    raw_root = Path(raw_root)
    folder_name = dataset_folder_name(dataset_id, name)
    check_dataset_id_free(raw_root, dataset_id, folder_name)
    with atomic_directory(raw_root / folder_name) as tmp:
        yield tmp


def dataset_json(*, task: str, channel_names: Mapping[int | str, str], num_training: int, file_ending: str,
                 name: str, description: str = "", reference: str = "", licence: str = "",
                 labels: Mapping[str, Any] | None = None, target_names: Mapping[int | str, str] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The dataset.json of a converted dataset (keys as documentation/dataset_format.md)."""
    data: dict[str, Any] = {
        "name": name, "description": description, "reference": reference, "licence": licence,
        "task": str(task), "channel_names": {str(k): v for k, v in channel_names.items()},
        "numTraining": int(num_training), "file_ending": file_ending,
    }
    if labels is not None:
        data["labels"] = dict(labels)
    if target_names is not None:
        data["target_names"] = {str(k): v for k, v in target_names.items()}
    data.update(extra)
    return data


def write_dataset_files(folder: Path, dataset: Mapping[str, Any], subjects: Mapping[str, str],
                        extra_metadata: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write ``dataset.json`` and ``metadata.json`` (``subject`` per case plus any extra fields)."""
    metadata = {case: {"subject": subject, **(extra_metadata or {}).get(case, {})}
                for case, subject in subjects.items()}
    save_json(dict(dataset), folder / "dataset.json")
    save_json(metadata, folder / "metadata.json")


def write_case_image(folder: Path, kind: str, case_id: str, channel: int | None, array: np.ndarray,
                     properties: ImageProperties, file_ending: str) -> Path:
    """Write ``{kind}/{case}_{channel:04d}{ending}`` (``channel=None``: ``{kind}/{case}{ending}``, labels).

    ``kind`` is a raw-layout folder (imagesTr, imagesTs, labelsTr, targetsTr, ...); ``array`` is
    one channel in nnDiff's (Z, Y, X) order (a 2D image as (1, Y, X)), matching ``properties``.
    """
    stem = case_id if channel is None else f"{case_id}_{channel:04d}"
    path = folder / kind / f"{stem}{file_ending}"
    write_image(np.asarray(array)[None], properties, path)
    return path


def converter_parser(prog: str, description: str, tasks: Sequence[str] | None = None,
                     default_task: str | None = None) -> argparse.ArgumentParser:
    """The common arguments of ``nndiff_convert_<source>``: -i SRC, -o RAW, -d ID, --name, --task."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("-i", "--input", type=Path, required=True, metavar="SRC", help="source folder or file")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="RAW",
                   help="raw data root (default: $nnDiff_raw)")
    p.add_argument("-d", "--dataset_id", type=int, required=True, help="dataset id (0..999)")
    p.add_argument("--name", default=None, help="dataset name (default: the source's)")
    if tasks:
        p.add_argument("--task", choices=list(tasks), default=default_task or tasks[0],
                       help=f"task family of the converted dataset (default {default_task or tasks[0]})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def raw_root_from(args: argparse.Namespace) -> Path:
    """``-o`` or ``$nnDiff_raw``; a clear error when neither is set."""
    from nndiff.paths import resolve_paths  # noqa: PLC0415

    raw_root = resolve_paths(raw=args.output).raw
    if raw_root is None:
        raise NnDiffError("no raw data root. Fix: pass -o RAW or set nnDiff_raw")
    return Path(raw_root)


def run_converter(parser: argparse.ArgumentParser, convert: Callable[[argparse.Namespace, Path], Path],
                  argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging, convert, print the dataset folder; exit code 0, or 2 with the message."""
    from nndiff.run.common import configure_logging, run_cli  # noqa: PLC0415

    def body(arguments: Sequence[str] | None) -> None:
        args = parser.parse_args(arguments)
        configure_logging(args)
        folder = convert(args, raw_root_from(args))
        print(folder)  # the CLI's result: the dataset folder, for scripts

    return run_cli(body, argv)


def require_input(path: Path, what: str, fix: str) -> Path:
    """``path`` must exist: else an error naming it, what was expected there, and the fix."""
    if not path.exists():
        raise NnDiffError(f"{path} does not exist: expected {what}. Fix: {fix}")
    return path
