"""Entry points and configs: the demo end to end, backbone configs valid."""

import json

import open_clip
import pytest
import yaml
from helpers import ROOT, run_script

from spar.data import SAMPLE_IMAGES, list_images
from spar.models import backbone_entry, build_teacher, create_backbone
from spar.tools.demo import compare_teacher_student


@pytest.mark.parametrize(
    "path", sorted((ROOT / "spar" / "configs" / "backbone").glob("*.yaml")), ids=lambda p: p.stem
)
def test_backbone_configs_name_registered_backbones(path):
    config = yaml.safe_load(path.read_text())
    # A variant of a family (siglip2-l16: name siglip2 and its architecture) or the entry itself.
    assert config["name"] == path.stem or (
        path.stem.startswith(config["name"] + "-") and "architecture" in config
    )
    entry = backbone_entry(config["name"])
    assert config["pretrained"] == entry.default_pretrained
    if config["pretrained"] is not None and entry.name in ("maskclip", "siglip2"):
        default = {"maskclip": "ViT-B-16", "siglip2": "ViT-B-16-SigLIP2-512"}[entry.name]
        model = config.get("architecture", default)
        assert config["pretrained"] in open_clip.list_pretrained_tags_by_model(model)


def test_bundled_samples_are_images_with_licences():
    paths = list_images(SAMPLE_IMAGES)
    assert len(paths) >= 4
    licences = (SAMPLE_IMAGES / "LICENSES.md").read_text()
    assert all(p.name in licences for p in paths)


def test_compare_teacher_student_writes_pictures_and_summary(tmp_path, tiny_backbone):
    paths = list_images(SAMPLE_IMAGES)[:2]
    # 64 px windows: several per image, so the teacher differs from the single pass (a window
    # covering the whole image would make the two equal).
    teacher = build_teacher(tiny_backbone, {"window": 64, "stride": 48})
    summary = compare_teacher_student(
        tiny_backbone, paths, ["sky", "cat, kitten"], tmp_path, teacher=teacher, bounds=(160, 128)
    )
    assert (summary["stride"], summary["window"]) == (48, [64, 64])
    rows = summary["images"]
    assert [row["image"] for row in rows] == [str(path) for path in paths]
    for path, row in zip(paths, rows, strict=True):
        assert (tmp_path / f"{path.stem}_features.png").is_file()
        assert (tmp_path / f"{path.stem}_segmentation.png").is_file()
        assert max(row["size"]) <= 160 and min(row["size"]) <= 128  # fits the bounds
        assert row["windows"] == teacher.num_windows(*row["size"]) > 1
        assert row["mse"] > 0 and 0 < row["cosine"] < 1
    assert summary["mean_mse"] == pytest.approx(sum(row["mse"] for row in rows) / 2)
    assert summary["mean_cosine"] == pytest.approx(sum(row["cosine"] for row in rows) / 2)
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == summary


def test_demo_script_runs_with_hydra_overrides(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "rocket.jpg").write_bytes((SAMPLE_IMAGES / "rocket.jpg").read_bytes())
    result = run_script(
        "demo.py",
        f"images={images}",
        "teacher.stride=64",
        "bounds=[128,96]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "mean cosine to the teacher" in result.stdout
    summary = json.loads((tmp_path / "run" / "demo_summary.json").read_text())
    assert summary["stride"] == 64 and len(summary["images"]) == 1
    assert (tmp_path / "run" / "rocket_segmentation.png").is_file()


def test_backbone_config_creates_the_tiny_backbone():
    config = yaml.safe_load((ROOT / "spar" / "configs" / "backbone" / "tiny.yaml").read_text())
    backbone = create_backbone(**config)
    assert backbone.num_trainable_parameters() > 0


def test_compare_teacher_student_names_its_renamed_arguments(tmp_path, tiny_backbone):
    with pytest.raises(TypeError, match=r"stride= is now teacher=build_teacher"):
        compare_teacher_student(tiny_backbone, [], ["sky"], tmp_path, stride=48)


def test_scripts_import_spar_from_the_checkout_wherever_they_run(tmp_path):
    """A relative ``PYTHONPATH`` (``.``, as the GPU machine's first tier run had) must not decide
    where scripts run from ``tmp_path`` find spar: the checkout comes first, absolute."""
    import subprocess
    import sys

    from helpers import ROOT, script_environment

    env = script_environment({"PATH": "/usr/bin:/bin", "PYTHONPATH": "."})
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT)
    found = subprocess.run(
        [sys.executable, "-c", "import spar, sys; print(spar.__file__); print(sys.path[1])"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert found[0] == str(ROOT / "spar" / "__init__.py")
    assert found[1] == str(ROOT)
