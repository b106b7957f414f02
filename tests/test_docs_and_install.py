"""The README matches the code (every flag, every module), --help is complete, and `pip install .`
gives a package and commands that work from outside the checkout (issue 18)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

from ft_runner.client import build_parser as client_parser
from ft_runner.serving.server import build_parser as server_parser

README = (ROOT / "README.md").read_text()


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and "--help" not in a.option_strings]


@pytest.mark.parametrize("parser", [server_parser, client_parser], ids=["server", "client"])
def test_every_flag_is_in_the_readme_and_has_help_with_its_default(parser):
    p = parser()
    missing = [o for a in _flags(p) for o in a.option_strings if o.startswith("--") and f"`{o}`" not in README]
    assert not missing, f"flags missing from README.md: {missing}"
    assert not [a.dest for a in _flags(p) if not a.help], "flags without help"
    text = " ".join(p.format_help().split())  # argparse wraps lines
    assert "(default: 8000)" in text or "(default: localhost)" in text


def test_the_readme_tree_lists_every_module():
    tree = README[README.index("## How it is built"):]
    modules = [p.relative_to(ROOT / "ft_runner") for p in (ROOT / "ft_runner").rglob("*.py") if p.name != "__init__.py"]
    missing = [str(m) for m in modules if str(m) not in tree and f"{m.parent}/" not in tree]
    assert not missing, f"modules missing from README.md's tree: {missing}"


@pytest.mark.slow
def test_pip_install_gives_the_package_and_its_commands_outside_the_checkout(tmp_path):
    source = tmp_path / "src"  # a copy: the build writes nothing into the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "ft_models", "__pycache__",
                                                                "benchmarks", "*.egg-info", "build"))
    prefix = tmp_path / "prefix"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--prefix", str(prefix), str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    site = next(prefix.glob("lib/python*/site-packages"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import ft_runner; print(ft_runner.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    for command in ("ft-runner-server", "ft-runner-client"):
        assert subprocess.run([str(prefix / "bin" / command), "--help"], cwd=tmp_path, env=env,
                              capture_output=True).returncode == 0
    embedded = site / "ft_runner" / "assets" / "tiny-gpt2"
    out = subprocess.run([str(prefix / "bin" / "ft-runner-convert"), "-i", str(embedded), "-o", str(tmp_path / "ft"),
                          "--tp", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ft" / "2-gpu" / "config.ini").is_file()


def test_the_readme_headline_figures_are_the_committed_records():
    """Each headline row names its record (commit, time) in benchmarks/results and quotes it exactly."""
    import json
    import re

    rows = [json.loads(line) for line in (ROOT / "benchmarks/results/2026-11-22_NVIDIA-H200.jsonl").open()]
    quoted = re.findall(r"^\| (\S+) \| (\d) \| (\d+) \| ([\d.]+) \| (\d+) \| ([^|]*) \| (\w+) (\S+) \|$", README, re.M)
    assert len(quoted) == 5
    for model, tp, batch, ms, tok_s, against, commit, time in quoted:
        match = [r for r in rows if r["engine"] == "ft_runner" and r["model"] == model and r["tp"] == int(tp)
                 and r["batch"] == int(batch) and r["commit"] == commit and r["time"].startswith(time)]
        assert len(match) == 1, (model, tp, batch, commit, time)
        assert f"{match[0]['ms_per_step']:.3f}" == ms and str(round(match[0]["tok_s"])) == tok_s
        for ratio, engine in re.findall(r"([\d.]+)× HF (eager|compiled)", against):
            assert f"{match[0]['speedup'][f'hf-{engine}']:.2f}" == ratio, (model, batch, engine)
