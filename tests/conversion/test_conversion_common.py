"""The shared converter pieces: folder names, id clashes, atomic writing, dataset.json, CLI wrapper."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset import load_dataset
from nndiff.dataset.examples import properties_2d
from nndiff.dataset_conversion.common import (
    converter_parser,
    dataset_folder_name,
    dataset_json,
    dataset_writer,
    run_converter,
    write_case_image,
    write_dataset_files,
)
from nndiff.errors import NnDiffError


def _write_tiny(folder: Path) -> None:
    props = properties_2d(shape=(8, 8))
    for i in range(2):
        write_case_image(folder, "imagesTr", f"case_{i}", 0, np.full((1, 8, 8), 10.0 * i, np.float32), props, ".nii.gz")
    write_dataset_files(folder, dataset_json(task="generation", channel_names={0: "T1"}, num_training=2,
                                             file_ending=".nii.gz", name="Tiny"),
                        {"case_0": "s0", "case_1": "s0"}, {"case_1": {"age": 3}})


def test_folder_name_and_bad_ids():
    assert dataset_folder_name(7, "Tiny") == "Dataset007_Tiny"
    with pytest.raises(NnDiffError, match="outside 0..999"):
        dataset_folder_name(1000, "Tiny")
    with pytest.raises(NnDiffError, match="--name"):
        dataset_folder_name(7, "a b")


def test_writer_makes_a_loadable_dataset_and_refuses_a_used_id(tmp_path):
    with dataset_writer(tmp_path, 7, "Tiny") as folder:
        _write_tiny(folder)
    dataset = load_dataset(tmp_path / "Dataset007_Tiny")
    assert len(dataset.cases) == 2
    with pytest.raises(NnDiffError, match="already holds dataset id 7.*Dataset007_Tiny"):
        with dataset_writer(tmp_path, 7, "Other"):
            pass
    assert not (tmp_path / "Dataset007_Other").exists()


def test_failed_conversion_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with dataset_writer(tmp_path, 8, "Broken") as folder:
            _write_tiny(folder)
            raise RuntimeError("source file unreadable")
    assert list(tmp_path.iterdir()) == []


def test_run_converter_prints_folder_and_turns_user_errors_into_exit_code_2(tmp_path, capsys):
    def convert(args: argparse.Namespace, raw: Path) -> Path:
        if not args.input.exists():
            raise NnDiffError(f"{args.input} does not exist")
        with dataset_writer(raw, args.dataset_id, args.name or "Tiny") as folder:
            _write_tiny(folder)
        return raw / dataset_folder_name(args.dataset_id, args.name or "Tiny")

    parser = converter_parser("nndiff_convert_tiny", "test", tasks=("generation",))
    assert run_converter(parser, convert, ["-i", str(tmp_path), "-o", str(tmp_path / "raw"), "-d", "9"]) == 0
    assert capsys.readouterr().out.strip().endswith("Dataset009_Tiny")
    assert run_converter(parser, convert, ["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "raw"),
                                           "-d", "10"]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_every_converter_has_a_checkout_script_and_an_installed_command():
    import importlib
    import re

    root = Path(__file__).resolve().parents[2]
    setup = (root / "setup.py").read_text(encoding="utf-8")
    modules = sorted(p.stem for p in (root / "nndiff" / "dataset_conversion").glob("*.py")
                     if p.stem not in ("__init__", "common", "slice_split", "lesions"))  # helpers, not converters
    assert len(modules) >= 10
    for name in modules:
        checkout = importlib.import_module(f"dataset_conversion.{name}")
        package = importlib.import_module(f"nndiff.dataset_conversion.{name}")
        assert checkout.main is package.main
        assert re.search(rf'"nndiff_convert_{name}=nndiff\.dataset_conversion\.{name}:main"', setup), name
        with pytest.raises(SystemExit) as info:
            package.main(["--help"])
        assert info.value.code == 0
