import pytest

from nndiff.utils.files import atomic_directory, atomic_path, load_json, save_json


def test_save_json_is_atomic_on_failure(tmp_path):
    target = tmp_path / "plans.json"
    save_json({"a": 1}, target)
    with pytest.raises(TypeError):
        save_json({"a": object()}, target)  # not serialisable: the old file must survive
    assert load_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"]


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "nnDiffPlans_2d"
    with atomic_directory(target) as tmp:
        (tmp / "a.npz").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "b.npz").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.npz"]
    assert [p.name for p in tmp_path.iterdir()] == ["nnDiffPlans_2d"]
