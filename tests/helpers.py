"""Test helpers shared by the test modules (which never import each other): paths, scripts run
as users run them, small generated image folders and benchmarks, evaluation and training configs."""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import spar.configs  # noqa: F401 (registers the structured configs the YAML files name)
from spar.data.benchmarks import SegmentationBenchmark
from spar.distill import run_distillation
from spar.distributed import register_run_id_resolver
from spar.evaluation import read_prediction_png
from spar.metrics import MeanIoU

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "spar" / "configs"  # shipped in the package (spar.configs.CONFIG_DIR)


def script_environment(base: dict[str, str]) -> dict[str, str]:
    """The environment of a script run: offline, one thread, and this checkout first on
    ``PYTHONPATH`` as an absolute path, so that scripts import spar from it wherever they run
    (``cwd=tmp_path``), also where spar is not installed and ``PYTHONPATH`` named the checkout
    relatively (the GPU machine's first run of the tier failed 12 script tests on that)."""
    env = {**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH", "")]))
    return env


def run_script(
    name: str,
    *overrides: str,
    ranks: int = 1,
    torchrun: bool = False,
    cwd: Path | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>`` with Hydra ``overrides`` offline, as users do (under
    ``torchrun --standalone`` with ``ranks`` processes when above 1, or when ``torchrun`` is set,
    e.g. ``torchrun --nproc_per_node 1``); fail on a non-zero exit."""
    launcher = [sys.executable]
    if ranks > 1 or torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*launcher, str(ROOT / "scripts" / name), *overrides]
    env = script_environment(os.environ)
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def write_scene_images(folder: Path, count: int = 5, size: tuple[int, int] = (240, 320)) -> Path:
    """``count`` seeded synthetic scenes (sky, ground, a few shapes) as JPEGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    height, width = size
    for index in range(count):
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        horizon = int(rng.integers(height // 3, 2 * height // 3))
        draw.rectangle(
            [0, horizon, width, height], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
        for _ in range(4):
            x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            w, h = int(rng.integers(20, 80)), int(rng.integers(20, 80))
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x, y, x + w, y + h], fill=colour)
        image.save(folder / f"scene_{index:02d}.jpg", quality=92)
    return folder


# Raw label values as the preparation scripts write them: (largest class value, uses 255).
RAW_LABELS = {
    "voc21": (20, True),
    "voc20": (20, True),
    "context60": (59, False),
    "context59": (59, False),
    "coco_object": (80, True),
    "coco_stuff": (170, True),
    "cityscapes": (18, True),
    "ade20k": (150, False),
}


def _label_image(raw: np.ndarray, name: str) -> Image.Image:
    image = Image.fromarray(raw.astype(np.uint8), mode="L")
    if name.startswith("voc"):  # VOC ships palette PNGs: the indices are the class ids
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 7) % 256)])
    return image


def write_benchmark(
    name: str, root: Path, count: int = 3, size: tuple[int, int] = (48, 64), seed: int = 0
) -> dict[str, np.ndarray]:
    """A tiny split of benchmark ``name`` in its on-disk layout under ``root``.

    Returns the raw label arrays by image name (before any conversion).
    """
    rng = np.random.default_rng(seed)
    largest, uses_ignore = RAW_LABELS[name]
    labels = {}
    for index in range(count):
        raw = rng.integers(0, largest + 1, size)
        raw[:, : size[1] // 4] = rng.integers(0, 3)  # a large region of one low class
        if uses_ignore:
            raw[0, :5] = 255
        pixels = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        if name in ("voc21", "voc20", "context60", "context59"):
            stem = f"2008_{index:06d}"
            labels_dir = (
                "SegmentationClass" if name.startswith("voc") else "SegmentationClassContext"
            )
            split_dir = "Segmentation" if name.startswith("voc") else "SegmentationContext"
            image_path = root / "JPEGImages" / f"{stem}.jpg"
            label_path = root / labels_dir / f"{stem}.png"
            split = root / "ImageSets" / split_dir / "val.txt"
            split.parent.mkdir(parents=True, exist_ok=True)
            with split.open("a") as file:
                file.write(stem + "\n")
        elif name in ("coco_object", "coco_stuff"):
            stem = f"{index:012d}"
            suffix = "_instanceTrainIds.png" if name == "coco_object" else "_labelTrainIds.png"
            image_path = root / "images" / "val2017" / f"{stem}.jpg"
            label_path = root / "annotations" / "val2017" / f"{stem}{suffix}"
        elif name == "cityscapes":
            city = ["frankfurt", "lindau"][index % 2]
            stem = f"{city}_000000_{index:06d}"
            image_path = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
            label_path = root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png"
        else:
            stem = f"ADE_val_{index:08d}"
            image_path = root / "images" / "validation" / f"{stem}.jpg"
            label_path = root / "annotations" / "validation" / f"{stem}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        pixels.save(image_path)
        _label_image(raw, name).save(label_path)
        labels[stem] = raw
    return labels


def eval_config(*overrides: str, templates: str = "single"):
    """The ``configs/eval.yaml`` config for a quick CPU run, with Hydra ``overrides``.

    ``templates="single"`` encodes one prompt per class name, 80x cheaper than the paper's
    ``"imagenet80"`` ensemble (an ADE20K classifier through the tiny text tower takes seconds
    instead of a quarter of a minute); pass ``templates="imagenet80"`` to test the ensemble.
    """
    register_run_id_resolver()
    base = [
        "device=cpu",
        "num_workers=0",
        "show_progress=false",
        "dataset.bounds=[128,96]",
        f"templates={templates}",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=base + list(overrides))


def miou_from_pngs(name: str, root: Path, predictions: Path) -> tuple[float, MeanIoU]:
    """The mIoU (in %) of benchmark ``name`` under ``root`` recomputed from the prediction PNGs
    in ``predictions``, and the metric it came from."""
    dataset = SegmentationBenchmark(name, root)
    metric = MeanIoU(dataset.num_classes)
    for item in dataset:
        metric.update(read_prediction_png(predictions / f"{item['name']}.png"), item["label"])
    return 100 * metric.compute().miou, metric


# A few small views of generated images, 96 px teacher windows: a training run of seconds.
SMALL_TRAINING = (
    "train_images.augment.bounds=[160,128]",
    "train_images.augment.min_crop=64",
    "train_images.augment.min_short_side=64",
    "train_images.draws_per_image=1",
    "heldout.num_images=1",
    "heldout.sizes=[[160,128],[256,192]]",
    "teacher.window=96",
    "trainer.num_workers=0",
)


def train_config(tmp_path, *overrides):
    """``configs/train.yaml`` composed with ``overrides``, pointed at ``tmp_path``, small."""
    base = [
        f"teacher.cache_dir={tmp_path / 'cache'}",
        "trainer.num_workers=0",
        "trainer.show_progress=false",
        "trainer.log_every=1",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=base + list(overrides))


def small_run(tmp_path, name, *overrides, images=None):
    """A short distillation on generated images (tiny backbone, 96 px windows); returns the
    summary and the run directory."""
    images = images or write_scene_images(tmp_path / "images", count=5)
    cfg = train_config(
        tmp_path,
        f"train_images.root={images}",
        "train_images.augment.bounds=[160,128]",
        "train_images.augment.min_crop=64",
        "train_images.augment.min_short_side=64",
        "train_images.draws_per_image=2",
        "heldout.num_images=1",
        "heldout.sizes=[[160,128],[256,192]]",
        "teacher.window=96",
        "teacher.stride=24",
        *overrides,
    )
    summary = run_distillation(cfg, tmp_path / name)
    return summary, tmp_path / name


class LightningAttributeDict(dict):
    """Lightning's hyper-parameter container, pickled under its real name (see
    :func:`register_fake_lightning`)."""

    __module__ = "lightning.fabric.utilities.data"
    __qualname__ = "AttributeDict"


def register_fake_lightning(monkeypatch) -> None:
    """Make :class:`LightningAttributeDict` importable as Lightning's ``AttributeDict`` (without
    Lightning), so that ``torch.save`` pickles it by that exact name."""
    parts = LightningAttributeDict.__module__.split(".")
    for depth in range(1, len(parts) + 1):  # pickle imports the module, so its parents too
        name = ".".join(parts[:depth])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[LightningAttributeDict.__module__].AttributeDict = LightningAttributeDict


def anyup_official_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the authors' ``anyup_multi_backbone.pth``, as their public
    model code (``anyup/model.py``, ``layers/``) defines them: qk_dim 128, 4 heads, 5x5 bases."""
    dim = 128

    def residual(prefix: str) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.block.0.weight": (dim,),
            f"{prefix}.block.0.bias": (dim,),
            f"{prefix}.block.2.weight": (dim, dim, 1, 1),
            f"{prefix}.block.3.weight": (dim,),
            f"{prefix}.block.3.bias": (dim,),
            f"{prefix}.block.5.weight": (dim, dim, 1, 1),
        }

    first_layers = {
        "image_encoder.0.weight": (dim, 3, 1, 1),
        "key_encoder.0.weight": (dim, dim, 1, 1),
        "query_encoder.0.weight": (dim, dim, 1, 1),
        "key_features_encoder.0.basis": (dim, 1, 5, 5),
        "aggregation.0.weight": (dim, 2 * dim, 3, 3),
    }
    shapes = {}
    for name, shape in first_layers.items():
        encoder = name.split(".")[0]
        shapes[name] = shape
        shapes.update(residual(f"{encoder}.1"))
        shapes.update(residual(f"{encoder}.2"))
    attention = "cross_decode.cross_attn"
    shapes.update(
        {
            f"{attention}.norm_q.weight": (dim,),
            f"{attention}.norm_k.weight": (dim,),
            f"{attention}.attention.in_proj_weight": (3 * dim, dim),
            f"{attention}.attention.in_proj_bias": (3 * dim,),
            f"{attention}.attention.out_proj.weight": (dim, dim),
            f"{attention}.attention.out_proj.bias": (dim,),
            "cross_decode.conv2d.weight": (dim, dim, 3, 3),
            "rope.freqs": (2, dim),
        }
    )
    return shapes


def write_anyup_file(path: Path, seed: int = 0) -> Path:
    """A ``torch.save`` file with AnyUp's official parameter names and shapes, random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: 0.1 * torch.randn(shape, generator=generator)
        for name, shape in anyup_official_shapes().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# A tiny timm ViT in place of DINO ViT-B/16 as LPOSS's affinity backbone.
TINY_AFFINITY = {"model": "vit_tiny_patch16_224", "embed_dim": 32, "depth": 2, "num_heads": 2}


def write_tiny_affinity(path: Path, seed: int = 0) -> Path:
    """The weights of :data:`TINY_AFFINITY` (random, seeded) as a ``.safetensors`` file."""
    import timm  # only the refinement tests need it

    torch.manual_seed(seed)
    options = {k: v for k, v in TINY_AFFINITY.items() if k != "model"}
    model = timm.create_model(TINY_AFFINITY["model"], num_classes=0, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return path


def refine_overrides(tmp_path: Path, refine: str = "lposs_plus", upsample: str = "anyup") -> list:
    """Hydra overrides for ``refine``/``upsample`` on tiny random weights written under
    ``tmp_path``, with windows and neighbourhoods small enough for a quick CPU run."""
    overrides = [f"refine={refine}", f"upsample={upsample}"]
    if refine != "none":
        options = ",".join(f"{k}:{v}" for k, v in TINY_AFFINITY.items() if k != "model")
        overrides += [
            f"refine.affinity.model={TINY_AFFINITY['model']}",
            f"refine.affinity.weights={write_tiny_affinity(tmp_path / 'affinity.safetensors')}",
            f"refine.affinity.options={{{options}}}",
            "refine.window=48",
            "refine.stride=32",
            "refine.short_side=null",
            "refine.max_iter=20",
        ]
        if refine == "lposs_plus":
            overrides.append("refine.neighbourhood=5")
    if upsample == "anyup":
        overrides += [f"upsample.weights={write_anyup_file(tmp_path / 'anyup.pth')}"]
    return overrides
