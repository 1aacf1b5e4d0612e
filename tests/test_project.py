"""The set-up the README promises is the one CI and the Procfile use."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    run, test = readme_commands()[:2]
    assert run == "pip install '.[speed]' && tornado-ollama-proxy"
    assert "--cov-fail-under=100" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"readme_test_command() {{\n{test}\n}}" in ci
    assert ci.count("readme_test_command") == 2  # defined, and run for each Python


def test_procfile_starts_the_console_script_with_no_other_input():
    assert (ROOT / "Procfile").read_text() == "web: tornado-ollama-proxy\n"
