"""X-ray CSV (CheXpert style) converter: conditions, uncertain/blank policies, subjects, missing images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset import load_dataset, read_images, verify_integrity
from nndiff.dataset.io import read_file
from nndiff.dataset_conversion import xray_csv
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.utils.files import load_json

HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion"
ROWS = [  # CheXpert's train.csv: finding cells 1.0 / 0.0 / -1.0 / blank
    ("patient00001/study1/view1_frontal.jpg", "Female,68,Frontal,AP,1.0,,,0.0"),
    ("patient00002/study2/view1_frontal.jpg", "Female,87,Frontal,AP,,-1.0,-1.0,1.0"),
    ("patient00002/study1/view1_frontal.png", "Female,83,Frontal,AP,,1.0,,"),
    ("patient00002/study1/view2_lateral.png", "Female,83,Lateral,,,1.0,,"),
    ("patient00003/study1/view1_frontal.jpg", "Male,41,Frontal,PA,,0.0,1.0,"),
    ("patient00004/study1/view1_frontal.png", "Male,20,Frontal,PA,1.0,0.0,,0.0"),
    ("patient00005/study1/view1_frontal.png", "Male,33,Frontal,PA,,1.0,0.0,"),
]


def _source(tmp_path: Path, rows=ROWS) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    lines = [HEADER]
    for n, (rel, rest) in enumerate(rows):
        path = root / "train" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:24, 0:20]
        sitk.WriteImage(sitk.GetImageFromArray(((yy * 7 + xx * 3 + 20 * n) % 256).astype(np.uint8)), str(path))
        lines.append(f"CheXpert-v1.0-small/train/{rel},{rest}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_chexpert_replica_with_u_zeros(tmp_path):
    root = _source(tmp_path)
    folder = xray_csv.convert_xray_csv(root, tmp_path / "raw", 51, ["Cardiomegaly", "Sex", "Age"])
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.task == "generation" and dataset.json["file_ending"] == ".png"
    assert dataset.json["conditions"] == {
        "Cardiomegaly": {"type": "categorical", "values": ["negative", "positive"]},
        "Sex": {"type": "categorical", "values": ["Female", "Male"]},
        "Age": {"type": "continuous"}}
    metadata = load_json(folder / "metadata.json")
    assert len(dataset.cases) == 7
    first = metadata["patient00001_study1_view1_frontal"]
    assert first["Cardiomegaly"] == "negative"  # blank = not mentioned = negative
    assert first["Age"] == 68.0 and first["subject"] == "patient00001" and first["AP/PA"] == "AP"
    assert metadata["patient00002_study2_view1_frontal"]["Cardiomegaly"] == "negative"  # U-Zeros
    assert metadata["patient00002_study1_view2_lateral"]["Cardiomegaly"] == "positive"
    subjects = dataset.subjects()
    assert {c for c, s in subjects.items() if s == "patient00002"} == {
        "patient00002_study2_view1_frontal", "patient00002_study1_view1_frontal", "patient00002_study1_view2_lateral"}
    # Pixels identical to the decoded source (JPEG decoded once, stored lossless).
    source, _ = read_file(root / "train/patient00003/study1/view1_frontal.jpg")
    image, props = read_images(dataset.cases["patient00003_study1_view1_frontal"].images)
    np.testing.assert_array_equal(image[0, 0], source[0, 0])
    assert props.spatial_dims == 2 and image.shape == (1, 1, 24, 20)
    code = plan_and_preprocess_entry(["-d", "51", "--raw", str(tmp_path / "raw"),
                                      "--preprocessed", str(tmp_path / "pre"), "-np", "1"])
    assert code == 0


def test_uncertain_and_blank_policies(tmp_path, capsys):
    root = _source(tmp_path)
    assert xray_csv.main(["-i", str(root), "-o", str(tmp_path / "raw"), "-d", "52", "--condition_column",
                          "Edema", "--uncertain", "class", "-q"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert load_json(folder / "dataset.json")["conditions"]["Edema"]["values"] == ["negative", "positive", "uncertain"]
    assert load_json(folder / "metadata.json")["patient00002_study2_view1_frontal"]["Edema"] == "uncertain"
    ones = xray_csv.convert_xray_csv(root, tmp_path / "raw", 53, ["Edema"], uncertain="ones")
    assert load_json(ones / "metadata.json")["patient00002_study2_view1_frontal"]["Edema"] == "positive"
    # drop + blank drop: only rows with a definite Cardiomegaly value remain.
    dropped = xray_csv.convert_xray_csv(root, tmp_path / "raw", 54, ["Cardiomegaly"], uncertain="drop", blank="drop")
    assert len(load_dataset(dropped).cases) == 5
    record = load_json(dropped / xray_csv.CONVERSION_RECORD)
    assert [r["row"] for r in record["dropped_rows"]] == [2, 3]  # blank, uncertain
    # A blank in a categorical condition (AP/PA of the lateral view) drops that row.
    view = xray_csv.convert_xray_csv(root, tmp_path / "raw", 55, ["AP/PA"])
    assert len(load_dataset(view).cases) == 6


def test_bad_inputs(tmp_path):
    root = _source(tmp_path, ROWS[:2] + [("patient00009/study1/view1_frontal.jpg", "Male,50,Frontal,PA,,1.0,,")])
    (root / "train/patient00009/study1/view1_frontal.jpg").unlink()
    with pytest.raises(NnDiffError, match=r"train.csv row 4: the image 'CheXpert-v1.0-small/train/patient00009"):
        xray_csv.convert_xray_csv(root, tmp_path / "raw", 56, ["Cardiomegaly"])
    with pytest.raises(NnDiffError, match=r"\['Cardio'\] are not columns"):
        xray_csv.convert_xray_csv(root, tmp_path / "raw", 56, ["Cardio"])
    with pytest.raises(NnDiffError, match="label CSV"):
        xray_csv.convert_xray_csv(root, tmp_path / "raw", 56, ["Cardiomegaly"], csv_file=root / "valid.csv")
    (root / "bad.csv").write_text("Image,Sex\nx.png,F\n")
    with pytest.raises(NnDiffError, match="no 'Path' column"):
        xray_csv.convert_xray_csv(root, tmp_path / "raw", 56, ["Sex"], csv_file=root / "bad.csv")
    assert not list(tmp_path.glob("raw/Dataset056*"))
