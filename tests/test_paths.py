import pytest

from nndiff.errors import PathsError
from nndiff.paths import resolve_paths


def test_flag_wins_over_environment(tmp_path):
    env = {"nnDiff_raw": "/from/env", "nnDiff_preprocessed": "/pre/env"}
    paths = resolve_paths(raw=tmp_path, environ=env)
    assert paths.raw == tmp_path
    assert str(paths.preprocessed) == "/pre/env"
    assert paths.results is None


def test_missing_root_names_flag_and_variable():
    paths = resolve_paths(environ={})
    with pytest.raises(PathsError) as err:
        paths.require("results")
    assert "--results" in str(err.value) and "nnDiff_results" in str(err.value)


def test_environment_not_read_at_import(monkeypatch, tmp_path):
    import importlib

    import nndiff.paths as mod

    monkeypatch.setenv("nnDiff_raw", str(tmp_path / "first"))
    importlib.reload(mod)
    monkeypatch.setenv("nnDiff_raw", str(tmp_path / "second"))
    assert mod.resolve_paths().raw == tmp_path / "second"
