"""Packaging: the console commands, the configs shipped in the package, the tools kept out of the
core library (an ``ast`` walk), the old module paths failing with their new spelling, and (slow)
a built wheel installed elsewhere training and evaluating from another folder."""

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from helpers import ROOT, SMALL_TRAINING, write_benchmark

from spar.timing import time_call

PACKAGE = ROOT / "spar"
COMMANDS = {
    "spar-train": "spar.train:main",
    "spar-eval": "spar.eval:main",
    "spar-segment": "spar.segment:main",
    "spar-extract": "spar.extract:main",
    "spar-cache": "spar.cache:main",
    "spar-speed": "spar.speed:main",
    "spar-app": "spar.app:main",
    "spar-collect": "spar.collect:main",
    "spar-export": "spar.export_onnx:main",
}
COMMAND_MODULES = {target.split(":")[0] for target in COMMANDS.values()}
MOVED = {"spar.speed", "spar.app", "spar.demo", "spar.fault_trials"}  # now spar.tools.*


def pyproject() -> dict:
    """``pyproject.toml`` (``tomllib``: Python 3.11 and later)."""
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def module_name(path: Path) -> str:
    """``spar/tools/app.py`` -> ``spar.tools.app``; ``spar/data/__init__.py`` -> ``spar.data``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved; ``from a import b`` counts as
    ``a`` and ``a.b``), at any depth of the file (imports inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_tool_or_command(module: str) -> bool:
    return module == "spar.tools" or module.startswith("spar.tools.") or module in COMMAND_MODULES


def test_the_import_walk_resolves_relative_and_absolute_imports():
    # Known imports of files that stay as they are: the walk must see them (or the test below
    # could pass by seeing nothing).
    assert {"spar.tools.speed", "spar.tools"} <= imported_modules(PACKAGE / "speed.py")
    assert "spar.timing.timed_call" in imported_modules(PACKAGE / "tools" / "app.py")
    assert "spar.distill.cache" in imported_modules(PACKAGE / "tools" / "fault_trials.py")


def test_the_core_library_never_imports_the_tools_or_the_commands():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if is_tool_or_command(name):
            continue
        bad = {m for m in imported_modules(path) if is_tool_or_command(m) or m in MOVED}
        offenders += [f"{name} imports {m}" for m in sorted(bad)]
    assert not offenders, offenders


def test_console_commands_are_declared_and_each_runs_as_python_m():
    assert pyproject()["project"]["scripts"] == COMMANDS
    for target in COMMANDS.values():
        module, function = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert callable(getattr(importlib.import_module(module), function)), target
        assert 'if __name__ == "__main__":' in path.read_text(), f"python -m {module}"


def test_every_config_is_package_data():
    patterns = pyproject()["tool"]["setuptools"]["package-data"]["spar.configs"]
    shipped = {p for pattern in patterns for p in (PACKAGE / "configs").glob(pattern)}
    assert PACKAGE / "configs" / "hydra" / "help" / "spar.yaml" in shipped  # the deepest
    assert set((PACKAGE / "configs").rglob("*.yaml")) == shipped
    assert not (ROOT / "configs").exists()


@pytest.mark.parametrize(
    ("statement", "new_path"),
    [
        ("import spar.demo", "spar.tools.demo"),
        ("from spar.demo import SAMPLE_IMAGES", "spar.data.SAMPLE_IMAGES"),
        ("import spar.fault_trials", "spar.tools.fault_trials"),
        ("from spar.speed import measure_speed", "spar.tools.speed.measure_speed"),
        ("from spar.speed import time_call", "spar.timing.time_call"),
        ("from spar.app import build_page", "spar.tools.app.build_page"),
    ],
)
def test_old_module_paths_fail_naming_the_new_one(statement, new_path):
    with pytest.raises(ImportError, match=new_path.replace(".", r"\.")):
        exec(statement, {})


def test_time_call_warms_up_then_times_each_repeat():
    calls = []
    timing = time_call(lambda: calls.append(1), __import__("torch").device("cpu"), 2, 3)
    assert len(calls) == 5
    assert 0 <= timing["min_s"] <= timing["median_s"] <= timing["max_s"]


def test_python_m_finds_the_packaged_configs_from_another_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "spar.train", "--help"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    backbones = "clip, clip-tiny, clip-tiny-p14, dinov3txt, maskclip, siglip2, siglip2-l16, "
    assert f"backbone: {backbones}siglip2-so400m, tiny" in result.stdout
    assert "train_images: demo, sa1b, sa1b_extended" in result.stdout


# ---- the wheel, installed outside the checkout ----------------------------------------------


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the project (the checkout stays untouched), built offline with the
    setuptools already installed."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "spar", ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", str(source), "-w", str(tmp_path / "dist")]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("spar-*.whl")
    return wheel


def run_installed(site: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    """``command`` with the installed wheel (``site``) first on the path, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_the_installed_wheel_trains_and_evaluates_from_another_folder(tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index"]
    subprocess.run(
        [*install, "--target", str(site), str(build_wheel(tmp_path))],
        check=True,
        capture_output=True,
        timeout=300,
    )
    where = "import spar; print(spar.__file__)"
    found = run_installed(site, elsewhere, sys.executable, "-c", where)
    assert found.stdout.strip() == str(site / "spar" / "__init__.py")
    (spar,) = [d for d in metadata.distributions(path=[str(site)]) if d.name == "spar"]
    scripts = {e.name: e.value for e in spar.entry_points if e.group == "console_scripts"}
    assert scripts == COMMANDS

    # The quick start: the default config (tiny backbone, bundled samples), small views.
    trained = run_installed(
        site,
        elsewhere,
        str(site / "bin" / "spar-train"),
        *SMALL_TRAINING,
        "trainer.epochs=1",
        "trainer.show_progress=false",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'train'}",
    )
    assert "checkpoint" in trained.stdout and "held-out 160x128" in trained.stdout
    checkpoint = tmp_path / "train" / "checkpoints" / "best.safetensors"
    assert checkpoint.is_file()
    assert (elsewhere / "outputs" / "teacher_cache" / "tiny").is_dir()  # relative to the launch

    write_benchmark("ade20k", tmp_path / "ade20k")
    evaluated = run_installed(
        site,
        elsewhere,
        str(site / "bin" / "spar-eval"),
        "dataset=ade20k",
        f"dataset.root={tmp_path / 'ade20k'}",
        "dataset.bounds=[128,96]",
        "templates=single",
        f"checkpoint={checkpoint}",
        "device=cpu",
        "num_workers=0",
        "show_progress=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert "ade20k (student, weights " in evaluated.stdout
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["num_images"] == 3
