"""nndiff_benchmark end to end on two tiny synthetic datasets (generation 2D PNG, translation 3D NIfTI):
results table, resumption after a partial run (ledger + file mtimes), interrupted stages redone,
and user errors."""
import json
import shutil

import pytest

from nndiff.dataset.examples import make_example_dataset
from nndiff.run.benchmark import LEDGER_FILE, RESULTS_JSON, RESULTS_MD, main

#: Tiny 2D configuration for both datasets (the translation example is planned with a 2d configuration too).
TINY = {"tiny": {
    "inherits_from": "2d",
    "network": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                "num_head_channels": 8, "norm_groups": 4, "strides": [[2, 2]]},
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 1, "num_val_cases": 1, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 100},
    "diffusion": {"num_sampling_steps": 2},
}}


def _add_test_set(raw, dataset_folder, kind, with_targets):
    """imagesTs (and targetsTs) from the same generator with another seed: held-out cases."""
    heldout = make_example_dataset(kind, raw.parent / "heldout", 900 + len(list(raw.iterdir())), num_cases=2,
                                   seed=7)
    for source, target in (("imagesTr", "imagesTs"), ("targetsTr", "targetsTs")):
        if source == "targetsTr" and not with_targets:
            continue
        (dataset_folder / target).mkdir()
        for path in (heldout / source).iterdir():
            shutil.copy(path, dataset_folder / target / path.name.replace("case", "test"))


@pytest.fixture
def setup(tmp_path):
    raw = tmp_path / "raw"
    gen = make_example_dataset("2d_grey_png", raw, 861)
    _add_test_set(raw, gen, "2d_grey_png", with_targets=False)
    trans = make_example_dataset("translation", raw, 862, num_cases=4)
    _add_test_set(raw, trans, "translation", with_targets=True)
    overrides = tmp_path / "tiny.json"
    overrides.write_text(json.dumps(TINY))
    roots = ["--raw", raw, "--preprocessed", tmp_path / "pre", "--results", tmp_path / "results"]
    base = ["-d", "861", "862", "-c", "tiny", "--iterations", "2", "--num_samples", "3", "-device", "cpu",
            "--configuration_overrides", overrides, "-o", tmp_path / "bench", *roots]
    return {"tmp": tmp_path, "argv": [str(a) for a in base], "out": tmp_path / "bench"}


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _ledger(out):
    return json.loads((out / LEDGER_FILE).read_text(encoding="utf-8"))["stages"]


def _checkpoints(tmp):
    return {str(p): p.stat().st_mtime_ns for p in (tmp / "results").rglob("checkpoint_final.pth")}


def test_partial_run_then_resume_skips_finished_stages(setup, capsys):
    s = setup
    _run(s["argv"] + ["--stop_after", "train"], capsys)
    stages = _ledger(s["out"])
    assert set(stages) == {"Dataset861_Grey2D/plan", "Dataset861_Grey2D/tiny/train/fold_0",
                           "Dataset862_MRtoCT3D/plan", "Dataset862_MRtoCT3D/tiny/train/fold_0"}
    assert not (s["out"] / RESULTS_JSON).exists()
    checkpoints = _checkpoints(s["tmp"])
    assert len(checkpoints) == 2
    plans = {p: p.stat().st_mtime_ns for p in (s["tmp"] / "pre").glob("*/nnDiffPlans.json")}
    # An interrupted prediction left a stray file: the rerun redoes the stage from a clean folder.
    stray = s["out"] / "predictions" / "Dataset861_Grey2D" / "tiny" / "sample_0099.png"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half written")

    out = _run(s["argv"], capsys)
    after = _ledger(s["out"])
    for key, entry in stages.items():  # finished stages untouched
        assert after[key] == entry
    assert _checkpoints(s["tmp"]) == checkpoints
    assert {p: p.stat().st_mtime_ns for p in plans} == plans
    assert not stray.exists()
    assert sorted(p.name for p in stray.parent.glob("sample_*.png")) == [f"sample_{i:04d}.png" for i in range(3)]

    results = json.loads((s["out"] / RESULTS_JSON).read_text(encoding="utf-8"))
    rows = {r["dataset"]: r for r in results["rows"]}
    gen, trans = rows["Dataset861_Grey2D"], rows["Dataset862_MRtoCT3D"]
    assert (gen["family"], trans["family"]) == ("generation", "translation")
    assert gen["metrics"]["intensity_w1"] > 0 and gen["num_cases"] == 3 and gen["baseline"] is None
    assert trans["metrics"]["mae"] > 0 and trans["num_cases"] == 2 and trans["baseline_name"] is None
    for row in rows.values():
        assert row["train_device_hours"] > 0 and row["seconds_per_case"] > 0 and row["device"] == "cpu"
    table = (s["out"] / RESULTS_MD).read_text(encoding="utf-8")
    assert "Dataset861_Grey2D | generation | tiny" in table and "Dataset862_MRtoCT3D | translation" in table
    assert "device-hours" in out

    # A third run has nothing left to do: the ledger is unchanged and the results are rebuilt from it.
    before = _ledger(s["out"])
    _run(s["argv"], capsys)
    assert _ledger(s["out"]) == before
    assert json.loads((s["out"] / RESULTS_JSON).read_text(encoding="utf-8")) == results


def test_interrupted_training_is_continued(setup, capsys):
    from nndiff.paths import Paths
    from nndiff.training import checkpoint as ckpt
    from nndiff.training.api import train_fold

    s = setup
    argv = [a if a != "862" else "861" for a in s["argv"]][:]
    argv.remove("861")  # only the generation dataset
    _run(argv + ["--stop_after", "train"], capsys)
    fold = next((s["tmp"] / "results").rglob("fold_0"))
    # Simulate a kill after iteration 1 of 2: the ledger lacks the stage, only checkpoint_latest exists.
    ledger_file = s["out"] / LEDGER_FILE
    data = json.loads(ledger_file.read_text(encoding="utf-8"))
    del data["stages"]["Dataset861_Grey2D/tiny/train/fold_0"]
    ledger_file.write_text(json.dumps(data))
    shutil.rmtree(fold)
    paths = Paths(raw=s["tmp"] / "raw", preprocessed=s["tmp"] / "pre", results=s["tmp"] / "results")
    train_fold(861, "tiny", 0, paths, trainer="GenerationTrainer", iterations=2, device="cpu",
               stop_after_iterations=1)
    assert (fold / ckpt.LATEST).is_file() and not (fold / ckpt.FINAL).is_file()
    _run(argv + ["--stop_after", "train"], capsys)
    entry = json.loads(ledger_file.read_text(encoding="utf-8"))["stages"]["Dataset861_Grey2D/tiny/train/fold_0"]
    assert entry["resumed"] is True and entry["iterations"] == 2
    assert (fold / ckpt.FINAL).is_file()


@pytest.mark.parametrize("change, expected", [
    (lambda a: a + ["-c", "nope"], ["configuration(s) nope not in", "--configuration_overrides"]),
    (lambda a: [x if x != "862" else "999" for x in a], ["999"]),
    (lambda a: a + ["-f", "0", "all"], ["-f takes fold numbers or 'all' alone"]),
])
def test_user_errors(setup, capsys, change, expected):
    argv = change(list(setup["argv"]))
    if "nope" in argv:  # -c given twice: keep the last
        i = argv.index("-c")
        del argv[i:i + 2]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for text in expected:
        assert text in err, err


def test_bad_overrides_file(setup, capsys):
    bad = setup["tmp"] / "bad.json"
    bad.write_text(json.dumps({"tiny": {"network": {}}}))
    argv = list(setup["argv"])
    argv[argv.index("--configuration_overrides") + 1] = str(bad)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "'tiny' needs an 'inherits_from'" in err


def test_finished_fold_missing_from_ledger_is_not_retrained(setup, capsys):
    from nndiff.training import checkpoint as ckpt

    s = setup
    argv = [a for a in s["argv"] if a != "862"]
    _run(argv + ["--stop_after", "train"], capsys)
    final = next((s["tmp"] / "results").rglob(ckpt.FINAL))
    mtime = final.stat().st_mtime_ns
    (s["out"] / LEDGER_FILE).unlink()  # e.g. killed between the end of training and the ledger write
    _run(argv + ["--stop_after", "train"], capsys)
    entry = _ledger(s["out"])["Dataset861_Grey2D/tiny/train/fold_0"]
    assert entry["resumed"] is True and entry["iterations"] == 2
    assert final.stat().st_mtime_ns == mtime
