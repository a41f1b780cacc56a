"""Share trained models: ``nndiff_export_model_to_zip`` and ``nndiff_install_pretrained_model_from_zip``.

A zip holds, per exported model folder ``DatasetXXX_Name/<Trainer>__<Plans>__<config>/``: a copy of
the plans (``<Plans>.json``), ``dataset.json`` and ``dataset_fingerprint.json`` (so the installed
folder is self-contained: :mod:`nndiff.inference.model_folder` finds copies inside the model
folder), the chosen checkpoints of each ``fold_N`` and, unless ``--no_logs``, ``debug.json``,
``training_log_*.txt`` and ``progress.png``. ``manifest.json`` at the top lists every file with its
size and sha256, the nnDiff version, and per model the plans hash, folds, checkpoints, seeds and the
training command (when ``debug.json`` recorded one).

Installing checks everything before anything lands in the results folder: member names (no
absolute paths, ``..`` or links), the file list and hashes against the manifest, the plans hash of
the shipped plans against the manifest and against every checkpoint, and that every checkpoint
loads with ``torch.load(weights_only=True)``. Console scripts:
``nndiff_export_model_to_zip=nndiff.run.model_sharing:export_entry`` and
``nndiff_install_pretrained_model_from_zip=nndiff.run.model_sharing:install_entry``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import nndiff
from nndiff.errors import NnDiffError
from nndiff.inference.model_folder import (
    FOLD_PREFIX,
    locate_plans_and_dataset_json,
    parse_model_folder_name,
)
from nndiff.paths import resolve_paths
from nndiff.planning import resolve_configuration
from nndiff.training.checkpoint import FINAL, load_checkpoint, plans_hash
from nndiff.utils.files import atomic_path, load_json
from nndiff.run.common import add_verbosity_flags, configure_logging, run_cli

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
FINGERPRINT_FILE = "dataset_fingerprint.json"
DATASET_JSON = "dataset.json"
#: Files of a fold folder besides checkpoints that document the run (left out with --no_logs).
LOG_PATTERNS = ("debug.json", "training_log_*.txt", "progress.png")
#: Keys of debug.json that may hold the command line the run was started with.
COMMAND_KEYS = ("command", "argv", "command_line")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportFile:
    """One file to pack: where it is now and its name inside the zip (POSIX, relative)."""

    source: Path
    arcname: str


def find_model_dirs(dataset_dir: Path, configurations: Sequence[str] | None = None,
                    trainers: Sequence[str] | None = None, plans_name: str = "nnDiffPlans") -> list[Path]:
    """Model folders ``<Trainer>__<plans_name>__<config>`` of a results dataset folder, filtered by
    configuration and trainer; a requested configuration or trainer without a model is an error."""
    found = []
    for path in sorted(p for p in dataset_dir.iterdir() if p.is_dir() and p.name.count("__") == 2):
        name = parse_model_folder_name(path)
        if name.plans_name != plans_name:
            continue
        if configurations and name.configuration not in configurations:
            continue
        if trainers and name.trainer not in trainers:
            continue
        found.append(path)
    present = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir() and "__" in p.name)
    for wanted, index, flag in ((configurations, 2, "-c"), (trainers, 0, "-tr")):
        for item in wanted or ():
            if not any(p.name.split("__")[index] == item for p in found):
                raise NnDiffError(f"no trained model with {flag} {item} (plans {plans_name}) in {dataset_dir} "
                                  f"(present: {', '.join(present) or 'none'}). Fix: train it or drop {flag} {item}")
    if not found:
        raise NnDiffError(f"no trained model with plans {plans_name} in {dataset_dir} (present: "
                          f"{', '.join(present) or 'none'}). Fix: train a model first, or pass -p PLANS")
    return found


#: Trainer of the autoencoder stage of latent models (nndiff.tasks.autoencoder); its fold folders
#: hold ``autoencoder.json`` (weights hash and latent scale factor) next to the checkpoints.
AUTOENCODER_TRAINER = "AutoencoderTrainer"
AUTOENCODER_INFO = "autoencoder.json"


def with_autoencoder_stages(model_dirs: Sequence[Path]) -> list[Path]:
    """``model_dirs`` plus the autoencoder-stage folder of every latent model among them: a latent
    diffusion model cannot decode without the autoencoder it was trained on."""
    out = list(model_dirs)
    for model_dir in model_dirs:
        name = parse_model_folder_name(model_dir)
        stage = model_dir.parent / f"{AUTOENCODER_TRAINER}__{name.plans_name}__{name.configuration}"
        if name.trainer != AUTOENCODER_TRAINER and stage.is_dir() and stage not in out:
            out.append(stage)
    return out


def _fold_names(model_dir: Path, folds: Sequence[str] | None) -> list[str]:
    present = sorted(p.name[len(FOLD_PREFIX):] for p in model_dir.glob(f"{FOLD_PREFIX}*") if p.is_dir())
    chosen = list(folds) if folds else present
    missing = [f for f in chosen if f not in present]
    if missing or not chosen:
        raise NnDiffError(f"{model_dir} has no fold(s) {', '.join(missing) or '(none trained)'} (present: "
                          f"{', '.join(present) or 'none'}). Fix: pass -f with present folds, or train them")
    return chosen


def _training_command(debug: dict[str, Any]) -> Any:
    return next((debug[key] for key in COMMAND_KEYS if debug.get(key)), None)


def model_files(model_dir: Path, folds: Sequence[str] | None, checkpoints: Sequence[str], include_logs: bool,
                preprocessed_dir: Path | None) -> tuple[list[ExportFile], dict[str, Any]]:
    """The files of one model folder to pack and its manifest entry."""
    name = parse_model_folder_name(model_dir)
    plans_file, dataset_json = locate_plans_and_dataset_json(model_dir, name.plans_name, preprocessed_dir)
    plans = load_json(plans_file)
    if name.configuration not in plans.get("configurations", {}):
        raise NnDiffError(f"{plans_file} has no configuration {name.configuration!r}. Fix: pass --preprocessed "
                          "with the preprocessed root the model was trained from")
    expected_hash = plans_hash(plans, resolve_configuration(plans, name.configuration))
    prefix = f"{model_dir.parent.name}/{model_dir.name}"
    files = [ExportFile(plans_file, f"{prefix}/{name.plans_name}.json"),
             ExportFile(dataset_json, f"{prefix}/{DATASET_JSON}")]
    fingerprint = plans_file.parent / FINGERPRINT_FILE
    if fingerprint.is_file():
        files.append(ExportFile(fingerprint, f"{prefix}/{FINGERPRINT_FILE}"))
    entry: dict[str, Any] = {"folder": prefix, "trainer": name.trainer, "plans_name": name.plans_name,
                             "configuration": name.configuration, "plans_hash": expected_hash,
                             "checkpoints": list(checkpoints), "folds": {}}
    for fold in _fold_names(model_dir, folds):
        fold_dir = model_dir / f"{FOLD_PREFIX}{fold}"
        fold_entry = _fold_entry(fold_dir, checkpoints, expected_hash)
        for checkpoint in checkpoints:
            files.append(ExportFile(fold_dir / checkpoint, f"{prefix}/{fold_dir.name}/{checkpoint}"))
        if (fold_dir / AUTOENCODER_INFO).is_file():  # needed to predict, not a log
            files.append(ExportFile(fold_dir / AUTOENCODER_INFO, f"{prefix}/{fold_dir.name}/{AUTOENCODER_INFO}"))
        if include_logs:
            logs = sorted({p for pattern in LOG_PATTERNS for p in fold_dir.glob(pattern) if p.is_file()})
            files += [ExportFile(p, f"{prefix}/{fold_dir.name}/{p.name}") for p in logs]
        entry["folds"][fold] = fold_entry
    return files, entry


def _fold_entry(fold_dir: Path, checkpoints: Sequence[str], expected_hash: str) -> dict[str, Any]:
    """Seed, trainer class, iteration and training command of one fold; checks its checkpoints'
    plans hash now so a stale checkpoint is not shipped."""
    entry: dict[str, Any] = {}
    for checkpoint in checkpoints:
        path = fold_dir / checkpoint
        if not path.is_file():
            present = sorted(p.name for p in fold_dir.glob("*.pth"))
            raise NnDiffError(f"{path} does not exist (present: {', '.join(present) or 'none'}). Fix: pass -chk "
                              "with present checkpoints, or finish training this fold")
        state = load_checkpoint(path)
        if state.get("plans_hash") != expected_hash:
            raise NnDiffError(f"{path} was trained with other plans than the ones found now (plans hash "
                              f"{str(state.get('plans_hash'))[:12]}... vs {expected_hash[:12]}...). Fix: pass "
                              "--preprocessed with the plans the model was trained with")
        entry.setdefault("seed", (state.get("loader_state") or {}).get("seed"))
        entry.setdefault("trainer_class", state.get("trainer_class"))
        entry.setdefault("iterations", {})[checkpoint] = state.get("iteration")
    debug = fold_dir / "debug.json"
    entry["training_command"] = _training_command(load_json(debug)) if debug.is_file() else None
    return entry


def build_manifest(files: Sequence[ExportFile], models: Sequence[dict[str, Any]], dataset: str) -> dict[str, Any]:
    """manifest.json content: versions, models and every packed file's size and sha256."""
    return {"format": MANIFEST_FORMAT, "nndiff_version": nndiff.__version__,
            "created": _dt.datetime.now().isoformat(timespec="seconds"), "dataset": dataset,
            "models": list(models),
            "files": {f.arcname: {"sha256": sha256_file(f.source), "size": f.source.stat().st_size} for f in files}}


def export_model_to_zip(results_root: str | Path, dataset: str | int, output: str | Path,
                        configurations: Sequence[str] | None = None, trainers: Sequence[str] | None = None,
                        plans_name: str = "nnDiffPlans", folds: Sequence[str] | None = None,
                        checkpoints: Sequence[str] = (FINAL,), include_logs: bool = True,
                        preprocessed_root: str | Path | None = None) -> dict[str, Any]:
    """Pack the model folders of ``dataset`` into ``output`` (written to a temporary file, then
    renamed); returns the manifest."""
    from nndiff.training.api import find_preprocessed_dataset

    output = Path(output)
    if output.suffix != ".zip":
        raise NnDiffError(f"output {output} must end in .zip. Fix: e.g. -o model.zip")
    dataset_dir = find_preprocessed_dataset(Path(results_root), dataset)  # same DatasetXXX_ lookup
    preprocessed_dir = Path(preprocessed_root) / dataset_dir.name if preprocessed_root is not None else None
    if preprocessed_dir is not None and not preprocessed_dir.is_dir():
        preprocessed_dir = None
    files: list[ExportFile] = []
    models = []
    for model_dir in with_autoencoder_stages(find_model_dirs(dataset_dir, configurations, trainers, plans_name)):
        # the latent models load the autoencoder's final checkpoint, whatever -chk exports of theirs
        stage = parse_model_folder_name(model_dir).trainer == AUTOENCODER_TRAINER
        model_list, entry = model_files(model_dir, folds, (FINAL,) if stage else checkpoints, include_logs,
                                        preprocessed_dir)
        files += model_list
        models.append(entry)
    manifest = build_manifest(files, models, dataset_dir.name)
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST, _json_text(manifest))
            for item in files:
                archive.write(item.source, item.arcname)
    logger.info("wrote %s: %d model(s), %d file(s)", output, len(models), len(files))
    return manifest


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


# ----------------------------------------------------------------------------------------------
# Install
# ----------------------------------------------------------------------------------------------
def safe_member_name(name: str) -> PurePosixPath:
    """A zip member name as a relative path that stays inside the target folder; absolute paths,
    drive letters, backslashes and ``..`` parts (zip-slip) are refused."""
    path = PurePosixPath(name)
    bad = (not name or name.startswith("/") or "\\" in name or ":" in name
           or any(part in ("..", "") for part in name.rstrip("/").split("/")))
    if bad or path.is_absolute():
        raise NnDiffError(f"zip member {name!r} would be written outside the results folder (absolute path or "
                          "'..'). Refused: the zip is not a valid nnDiff model export; get it from a trusted source")
    return path


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def read_manifest(archive: zipfile.ZipFile, zip_path: Path) -> dict[str, Any]:
    """The manifest of an opened zip (refused when missing, unreadable or of another format)."""
    try:
        manifest = json.loads(archive.read(MANIFEST).decode("utf-8"))
    except KeyError:
        raise NnDiffError(f"{zip_path} has no {MANIFEST}: it was not written by nndiff_export_model_to_zip. "
                          "Fix: export the model with nndiff_export_model_to_zip") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NnDiffError(f"{zip_path}: {MANIFEST} is not valid JSON ({err}). Fix: export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or \
            not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("models"), list):
        raise NnDiffError(f"{zip_path}: {MANIFEST} is not an nnDiff model manifest of format {MANIFEST_FORMAT}. "
                          "Fix: export the model again with this nnDiff version")
    return manifest


def check_members(archive: zipfile.ZipFile, manifest: dict[str, Any], zip_path: Path) -> list[zipfile.ZipInfo]:
    """The zip's file members, after checking names (no traversal, no links) and that they are
    exactly the manifest's files."""
    members = []
    for info in archive.infolist():
        safe_member_name(info.filename)
        if _is_link(info):
            raise NnDiffError(f"zip member {info.filename!r} of {zip_path} is a symbolic link. Refused: model "
                              "exports hold plain files only")
        if not info.is_dir() and info.filename != MANIFEST:
            members.append(info)
    names = {info.filename for info in members}
    listed = set(manifest["files"])
    if names - listed:
        raise NnDiffError(f"{zip_path} holds files its manifest does not list: {', '.join(sorted(names - listed))}. "
                          "Fix: the zip was modified after export; get the original")
    if listed - names:
        raise NnDiffError(f"{zip_path} lacks files its manifest lists: {', '.join(sorted(listed - names))}. "
                          "Fix: the zip is incomplete; download or export it again")
    for name in listed:
        safe_member_name(name)
    return members


def _extract_verified(archive: zipfile.ZipFile, info: zipfile.ZipInfo, expected: dict[str, Any], target: Path,
                      zip_path: Path) -> None:
    """Copy one member to ``target`` while hashing it; a hash or size mismatch names the file."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with archive.open(info) as src, open(target, "wb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, OSError) as err:  # CRC errors of a damaged archive
        raise NnDiffError(f"cannot read {info.filename} from {zip_path}: {err}. Fix: the zip is damaged; "
                          "download or export it again") from None
    if digest.hexdigest() != expected.get("sha256") or target.stat().st_size != expected.get("size"):
        raise NnDiffError(f"{info.filename} in {zip_path} does not match its manifest sha256 (file changed or "
                          "corrupted). Fix: download or export the model again")


def verify_model(model_dir: Path, entry: dict[str, Any]) -> None:
    """The shipped plans give the manifest's plans hash, and every checkpoint loads with
    ``weights_only=True`` and carries that hash."""
    plans = load_json(model_dir / f"{entry['plans_name']}.json")
    found = plans_hash(plans, resolve_configuration(plans, entry["configuration"]))
    if found != entry["plans_hash"]:
        raise NnDiffError(f"the plans of {entry['folder']} hash to {found[:12]}..., the manifest says "
                          f"{str(entry['plans_hash'])[:12]}.... Fix: the zip was modified; get the original")
    for fold in entry["folds"]:
        for checkpoint in entry["checkpoints"]:
            path = model_dir / f"{FOLD_PREFIX}{fold}" / checkpoint
            state = load_checkpoint(path)  # weights_only=True
            if state.get("plans_hash") != found:
                raise NnDiffError(f"{entry['folder']}/{FOLD_PREFIX}{fold}/{checkpoint} was trained with other plans "
                                  "than the ones shipped with it. Fix: export the model again")


def _same_content(left: Path, right: Path) -> bool:
    files = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    return all((right / rel).is_file() and sha256_file(right / rel) == sha256_file(left / rel) for rel in files)


def install_model_from_zip(zip_path: str | Path, results_root: str | Path, overwrite: bool = False) -> list[Path]:
    """Verify and unpack an export into ``results_root``; returns the installed model folders.

    Everything is unpacked into a temporary folder inside ``results_root`` and verified before it
    is moved into place. An existing model folder with other content is refused unless
    ``overwrite``; one with the same files is left as it is."""
    zip_path, results_root = Path(zip_path), Path(results_root)
    if not zip_path.is_file():
        raise NnDiffError(f"{zip_path} does not exist. Fix: pass the path of a zip written by "
                          "nndiff_export_model_to_zip")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as err:
        raise NnDiffError(f"{zip_path} is not a readable zip file ({err}). Fix: download or export it again") from None
    results_root.mkdir(parents=True, exist_ok=True)
    with archive, tempfile.TemporaryDirectory(prefix=".install_", dir=results_root) as tmp:
        manifest = read_manifest(archive, zip_path)
        if manifest.get("nndiff_version") != nndiff.__version__:
            logger.warning("%s was exported with nnDiff %s; this is %s", zip_path, manifest.get("nndiff_version"),
                           nndiff.__version__)
        staging = Path(tmp)
        for info in check_members(archive, manifest, zip_path):
            _extract_verified(archive, info, manifest["files"][info.filename], staging / info.filename, zip_path)
        installed = []
        for entry in manifest["models"]:
            folder = safe_member_name(str(entry.get("folder", "")))
            verify_model(staging / folder, entry)
            installed.append(_move_into_place(staging / folder, results_root / folder, overwrite))
    return installed


def _move_into_place(source: Path, target: Path, overwrite: bool) -> Path:
    if target.exists():
        if _same_content(source, target):
            logger.info("%s is already installed with the same files", target)
            return target
        if not overwrite:
            raise NnDiffError(f"{target} already exists with other files. Fix: pass --overwrite to replace it, "
                              "or move it away first")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    logger.info("installed %s", target)
    return target


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_export_model_to_zip",
        description="Pack trained model folders of a dataset (plans, dataset.json, fingerprint, checkpoints, logs) "
                    "with a manifest (nnDiff version, plans hash, seeds, training command, sha256 of every file) "
                    "into one zip for nndiff_install_pretrained_model_from_zip.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset id, DatasetXXX or DatasetXXX_Name")
    p.add_argument("-o", dest="output", required=True, help="zip file to write")
    p.add_argument("-c", dest="configurations", nargs="+", default=None, help="configurations (default: all trained)")
    p.add_argument("-tr", dest="trainers", nargs="+", default=None, help="trainers (default: all trained)")
    p.add_argument("-p", dest="plans", default="nnDiffPlans", help="plans name (default nnDiffPlans)")
    p.add_argument("-f", dest="folds", nargs="+", default=None, help="folds (default: every trained fold_N)")
    p.add_argument("-chk", dest="checkpoints", nargs="+", default=[FINAL], help=f"checkpoints (default {FINAL})")
    p.add_argument("--no_logs", action="store_true", help="leave out debug.json, training logs and progress.png")
    p.add_argument("--results", default=None, metavar="DIR", help="results root (default: $nnDiff_results)")
    p.add_argument("--preprocessed", default=None, metavar="DIR",
                   help="preprocessed root, for the plans (default: $nnDiff_preprocessed, else as nndiff_predict finds them)")
    add_verbosity_flags(p)
    return p


def install_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_install_pretrained_model_from_zip",
        description="Verify a zip written by nndiff_export_model_to_zip (file list, sha256, plans hash, checkpoints "
                    "loadable with weights_only=True) and unpack it into results/DatasetXXX_Name/.")
    p.add_argument("zip", help="the exported zip file")
    p.add_argument("--results", default=None, metavar="DIR", help="results root (default: $nnDiff_results)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder with other files")
    add_verbosity_flags(p)
    return p


def _export_main(argv: Sequence[str] | None) -> int:
    args = export_parser().parse_args(argv)
    configure_logging(args)
    paths = resolve_paths(results=args.results, preprocessed=args.preprocessed)
    manifest = export_model_to_zip(paths.require("results"), args.dataset, args.output, args.configurations,
                                   args.trainers, args.plans, args.folds, args.checkpoints, not args.no_logs,
                                   paths.preprocessed)
    print(f"wrote {args.output}: {len(manifest['models'])} model(s), {len(manifest['files'])} file(s)")
    return 0


def _install_main(argv: Sequence[str] | None) -> int:
    args = install_parser().parse_args(argv)
    configure_logging(args)
    installed = install_model_from_zip(args.zip, resolve_paths(results=args.results).require("results"),
                                       args.overwrite)
    for path in installed:
        print(f"installed {path}")
    return 0


def export_entry(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_export_model_to_zip``."""
    return run_cli(_export_main, argv)


def install_entry(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_install_pretrained_model_from_zip``."""
    return run_cli(_install_main, argv)
