"""Light modules stay light: worker processes and torch-free machines depend on it."""
import subprocess
import sys


def test_data_side_modules_do_not_import_torch():
    code = (
        "import sys; import nndiff.dataset, nndiff.fingerprint, nndiff.planning, nndiff.preprocessing, "
        "nndiff.diffusion.options, nndiff.pipeline; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
