"""README, CI script and CLI help must agree (README.md is the contract CI runs)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1, "README.md must show exactly one test command"
    return commands[0].split("&&")[-1].strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_commands = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert ci_commands == [_readme_test_command()]


def test_ci_installs_cpu_torch_before_the_package():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.index("torch==2.13.0") < ci.index('-e ".[test]"')


def test_every_console_script_is_documented_in_cli_md():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    scripts = re.findall(r'"(nndiff_[a-z0-9_]+)=', setup)
    cli = (ROOT / "documentation" / "cli.md").read_text(encoding="utf-8")
    assert scripts, "no console scripts found in setup.py"
    for script in scripts:
        assert f"`{script}`" in cli, f"{script} missing from documentation/cli.md"


def _cli_md_status() -> dict[str, str]:
    """Command name → last column (status) of each documentation/cli.md table row."""
    cli = (ROOT / "documentation" / "cli.md").read_text(encoding="utf-8")
    rows = {}
    for line in cli.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in re.findall(r"`(nndiff_[a-z0-9_]+)`", cells[0]) if line.startswith("| `nndiff") else []:
            rows[name] = cells[-1]
    return rows


def test_cli_md_status_matches_setup_py():
    """A command is 'available' in cli.md exactly when setup.py installs it."""
    scripts = set(re.findall(r'"(nndiff_[a-z0-9_]+)=', (ROOT / "setup.py").read_text(encoding="utf-8")))
    status = _cli_md_status()
    available = {name for name, s in status.items() if s.startswith("available")}
    assert available == scripts, (f"cli.md says available but not installed: {sorted(available - scripts)}; "
                                  f"installed but not marked available: {sorted(scripts - available)}")


def test_every_documentation_page_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "documentation").glob("*.md"))
    missing = [p for p in pages if f"documentation/{p}" not in readme]
    assert not missing, f"README.md does not list: {missing}"
