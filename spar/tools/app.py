"""The interactive page: ``spar-app`` or ``python scripts/app.py`` (Gradio: the ``app`` extra).

An uploaded image or a bundled sample, class names typed as text, and choices of backbone,
checkpoint, teacher stride, prompt templates and background thresholds. The page shows the
student's segmentation overlay with its legend, optionally the sliding-window teacher's beside
it, the PCA picture of their features (one colour basis), and the measured time of each. It runs
on the GPU when there is one, else on the CPU; the default backbone is the tiny random one, which
runs offline (its pictures show the code path, not semantics).

Everything it computes comes from the library (``spar.segmentation``, ``spar.models``,
``spar.viz``); this module loads models and wires the page.
"""

from __future__ import annotations

import argparse
import functools
import html
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..class_names import display_names, parse_classes
from ..configs import CONFIG_DIR
from ..data import list_images, prepare_image
from ..data.samples import SAMPLE_IMAGES
from ..models import build_teacher, create_backbone, from_pretrained, list_backbones
from ..models.pretrained import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME
from ..models.teacher_config import TeacherSettings
from ..protocol import PROTOCOL
from ..provenance import file_digest
from ..segmentation import OpenVocabSegmenter
from ..timing import timed_call
from ..utils import module_device, resolve_device
from ..viz import overlay, palette, pca_picture, source_title

#: (long, short) sides an image is resized to fit, keeping its aspect ratio.
IMAGE_BOUNDS = {"448x336": (448, 336), "896x672": (896, 672), "2048x672": PROTOCOL.bounds}
DEFAULT_CLASSES = "sky\nperson, astronaut\ncat\ncup, coffee\nrocket\ntree\nbuilding"


def classes_from_text(text: str) -> list[list[str]]:
    """Class names typed in the page: one class per line (or separated by ``;``), synonyms
    separated by commas, as in the class-name files: ``"person, pedestrian"``."""
    entries = [entry for line in text.splitlines() for entry in line.split(";") if entry.strip()]
    return parse_classes(entries)


def sample_images() -> list[Path]:
    """The bundled sample images (spar/assets/samples)."""
    return list_images(SAMPLE_IMAGES)


def checkpoint_fingerprint(checkpoint: str) -> str:
    """What the page's model cache keys a checkpoint by, besides its name: the content digest
    (:func:`spar.provenance.file_digest`, memoised by path, size and mtime) of a checkpoint file,
    or of a student folder's ``manifest.json`` (else its weights and config); ``""`` for no
    checkpoint or a hub id. A file rewritten in place (``best.safetensors`` while training) or
    a folder saved again gets a new fingerprint, so it is loaded again."""
    checkpoint = checkpoint.strip()
    path = Path(checkpoint).expanduser()
    if not checkpoint:
        return ""
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        manifest = (path / MANIFEST_NAME).is_file()
        names = (MANIFEST_NAME,) if manifest else (WEIGHTS_NAME, CONFIG_NAME)
        return "+".join(file_digest(path / n) if (path / n).is_file() else "-" for n in names)
    return ""


class ModelCache:
    """The page's loaded models: ``get(name, checkpoint, device)`` returns the model that
    ``load(name, checkpoint, device)`` made for the same arguments and the same content of the
    checkpoint (:func:`checkpoint_fingerprint`), loading it again after the file changed; the
    entry of the earlier content is dropped, and at most ``size`` models are kept (least
    recently used first out)."""

    def __init__(self, load: Callable[[str, str, str], Any], size: int = 4) -> None:
        self.load, self.size = load, size
        self.entries: OrderedDict[tuple[str, str, str, str], Any] = OrderedDict()

    def get(self, name: str, checkpoint: str, device: str) -> Any:
        checkpoint = checkpoint.strip()
        key = (name, checkpoint, device, checkpoint_fingerprint(checkpoint))
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        for stale in [k for k in self.entries if k[:3] == key[:3]]:  # earlier content
            del self.entries[stale]
        value = self.load(name, checkpoint, device)
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


def _load_backbone(name: str, checkpoint: str, device: str) -> nn.Module:
    if not checkpoint:
        backbone = create_backbone(name)
    elif Path(checkpoint).expanduser().is_file():
        backbone = create_backbone(name, checkpoint=Path(checkpoint).expanduser())
    else:
        backbone = from_pretrained(checkpoint)
    return backbone.to(device).eval()


_MODELS = ModelCache(_load_backbone)


def load_backbone(name: str, checkpoint: str, device: str) -> nn.Module:
    """A backbone on ``device``, kept for the next request while its checkpoint is unchanged
    (:class:`ModelCache`): ``name``'s default weights when ``checkpoint`` is empty; otherwise a
    checkpoint file on top of them, or a student folder of :func:`~spar.models.save_pretrained`
    (or its hub id), whose own backbone name is used."""
    return _MODELS.get(name, checkpoint, device)


def find_checkpoints(root: str | Path = "outputs") -> list[str]:
    """Best checkpoints of the training runs under ``root`` (``make demo``'s and
    ``scripts/train.py``'s)."""
    root = Path(root)
    patterns = ("demo/train/checkpoints/best.safetensors", "train/*/*/checkpoints/best.safetensors")
    return sorted(str(path) for pattern in patterns for path in root.glob(pattern))


def _timed_prediction(
    segmenter: OpenVocabSegmenter, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(``(H, W)`` class mask on the CPU, the ``(C, h, w)`` dense features of the image, the
    seconds of the prediction).

    Without refinement stages the features are the ones the prediction used (caught by a
    forward hook); the stages run the source on windows, so the image's map is one more pass,
    outside the timing.
    """
    staged = any(getattr(segmenter, stage, None) is not None for stage in ("refiner", "upsampler"))
    captured = []
    hook = None
    if not staged:
        hook = segmenter.dense.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        mask, seconds = timed_call(lambda: segmenter.predict(inputs)[0].cpu(), inputs.device)
    finally:
        if hook is not None:
            hook.remove()
    features = segmenter.dense(inputs) if staged else captured[0]
    return mask, features[0].float(), seconds


def stage_names() -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(refine names, upsample names) of ``spar.refine`` when their configs are there (shipped in
    ``spar/configs``), else ``None``: the page then offers no refinement stages."""
    from ..refine import REFINE_NAMES, UPSAMPLE_NAMES

    if not (CONFIG_DIR / "refine").is_dir() or not (CONFIG_DIR / "upsample").is_dir():
        return None
    return tuple(REFINE_NAMES), tuple(UPSAMPLE_NAMES)


@functools.lru_cache(maxsize=4)
def load_stages(refine: str, upsample: str, device: str) -> dict[str, nn.Module | None]:
    """``{"refiner", "upsampler"}`` for :class:`OpenVocabSegmenter` from
    ``configs/refine/<refine>.yaml`` and ``configs/upsample/<upsample>.yaml`` (their published
    weights are downloaded once into the hub cache)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ..refine import build_stages

    settings = {}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for group, name in (("refine", refine), ("upsample", upsample)):
            settings.update(OmegaConf.to_container(compose(config_name=f"{group}/{name}")))
    return build_stages(settings, device)


@dataclass
class PageResult:
    """What the page shows: pictures, the legend rows and the timings in seconds."""

    student: Image.Image
    features: Image.Image
    legend: list[tuple[str, tuple[int, int, int], float]]
    seconds: dict[str, float] = field(default_factory=dict)
    teacher: Image.Image | None = None
    teacher_title: str = ""
    windows: int = 0


@torch.no_grad()
def segment_page(
    pretrained: nn.Module,
    student: nn.Module,
    image: str | Path | torch.Tensor,
    classes: Sequence[str | Sequence[str]],
    *,
    teacher_stride: int | None = TeacherSettings.stride,
    templates: str = PROTOCOL.templates,
    logit_scale: float = PROTOCOL.logit_scale,
    prob_threshold: float | None = None,
    area_threshold: float | None = None,
    bounds: Sequence[int] | None = (448, 336),
    stages: dict[str, nn.Module | None] | None = None,
) -> PageResult:
    """Segment ``image`` with the ``student``'s single pass and, when ``teacher_stride`` is
    set, with the sliding-window teacher of the ``pretrained`` backbone; time each.

    Args:
        pretrained: the backbone with its pretrained weights (the teacher runs it).
        student: the single pass shown: the same object, or the distilled student.
        image: an image file or a (3, H, W) tensor in [0, 1], resized to fit ``bounds``.
        classes: class entries (names, or synonyms ``"person, pedestrian"``).
        stages: refinement stages for both segmenters (``refiner``, ``upsampler``; see
            :func:`load_stages`), or ``None``.
    """
    names = display_names(classes)
    device = module_device(student)
    pixels, inputs = prepare_image(image, bounds, student.mean, student.std, device)
    options = dict(
        templates=templates,
        logit_scale=logit_scale,
        prob_threshold=prob_threshold,
        area_threshold=area_threshold,
        **{name: stage for name, stage in (stages or {}).items() if stage is not None},
    )
    seconds = {}
    segmenter, seconds["text"] = timed_call(
        lambda: OpenVocabSegmenter.from_backbone(student, classes, **options), device
    )
    mask, student_features, seconds["student"] = _timed_prediction(segmenter, inputs)
    maps, titles = [student_features], ["image", "student (single pass)"]
    result = PageResult(
        student=overlay(pixels, mask, names),
        features=Image.new("RGB", (1, 1)),
        legend=_legend_rows(names, mask),
        seconds=seconds,
    )
    if teacher_stride:
        teacher = build_teacher(pretrained, {"stride": teacher_stride})
        teacher_segmenter = OpenVocabSegmenter.from_backbone(
            pretrained, classes, dense=teacher, **options
        )
        teacher_mask, teacher_features, seconds["teacher"] = _timed_prediction(
            teacher_segmenter, inputs
        )
        result.teacher = overlay(pixels, teacher_mask, names)
        result.teacher_title = source_title(teacher)
        result.windows = teacher.num_windows(*inputs.shape[-2:])
        maps.append(teacher_features)
        titles.append(result.teacher_title)

    result.features, seconds["features"] = timed_call(
        lambda: pca_picture(pixels, maps, titles), device
    )
    return result


def _legend_rows(
    names: Sequence[str], mask: torch.Tensor
) -> list[tuple[str, tuple[int, int, int], float]]:
    """(name, overlay colour, fraction of the pixels) of every class, in class order."""
    colours = palette(max(len(names), 1))
    counts = np.bincount(mask.flatten().numpy(), minlength=len(names))
    total = max(int(mask.numel()), 1)
    return [
        (name, tuple(int(c) for c in colours[i]), counts[i] / total) for i, name in enumerate(names)
    ]


def legend_html(rows: Sequence[tuple[str, tuple[int, int, int], float]]) -> str:
    """The legend as an HTML list: colour swatch, class name, share of the pixels."""
    items = "".join(
        f'<li><span style="display:inline-block;width:12px;height:12px;margin-right:6px;'
        f'border:1px solid #000;background:rgb{colour}"></span>'
        f'<span class="spar-class">{html.escape(name)}</span> {100 * share:.1f}%</li>'
        for name, colour, share in rows
    )
    return f'<ul style="list-style:none;padding-left:0">{items}</ul>'


def timings_markdown(result: PageResult, device: torch.device) -> str:
    """One line per measured step, with the teacher/student time ratio."""
    seconds = result.seconds
    lines = [
        f"- text embeddings: {seconds['text']:.3f} s",
        f"- student (single pass): {seconds['student']:.3f} s",
    ]
    if "teacher" in seconds:
        ratio = seconds["teacher"] / max(seconds["student"], 1e-9)
        lines.append(
            f"- {result.teacher_title}, {result.windows} windows: {seconds['teacher']:.3f} s "
            f"({ratio:.1f}x the student)"
        )
    lines.append(f"- PCA picture: {seconds['features']:.3f} s")
    return f"Measured on {device}:\n\n" + "\n".join(lines)


def run_page(
    image: str | None,
    classes_text: str,
    backbone_name: str,
    checkpoint: str | None,
    show_teacher: bool,
    teacher_stride: float,
    templates: str,
    bounds: str,
    prob_threshold: float,
    area_threshold: float,
    refine: str = "none",
    upsample: str = "bilinear",
    *,
    device: str,
) -> tuple[Image.Image, Image.Image | None, Image.Image, str, str]:
    """The page's one action: inputs as the widgets give them -> (student overlay, teacher
    overlay or None, PCA picture, legend HTML, timings markdown). A threshold of 0 is off;
    ``refine``/``upsample`` other than ``none``/``bilinear`` need ``spar.refine``."""
    if not image:
        raise ValueError("upload an image or pick one of the samples")
    classes = classes_from_text(classes_text)
    student = load_backbone(backbone_name, checkpoint or "", device)
    # A student folder names its own backbone; the teacher runs that one's pretrained weights.
    pretrained = load_backbone(student.identity["name"], "", device) if checkpoint else student
    stages = None
    if (refine, upsample) != ("none", "bilinear"):
        if stage_names() is None:
            raise ValueError("refinement stages need spar.refine and configs/refine, upsample")
        stages = load_stages(refine, upsample, device)
    result = segment_page(
        pretrained,
        student,
        image,
        classes,
        teacher_stride=int(teacher_stride) if show_teacher else None,
        templates=templates,
        prob_threshold=prob_threshold or None,
        area_threshold=area_threshold or None,
        bounds=IMAGE_BOUNDS[bounds],
        stages=stages,
    )
    return (
        result.student,
        result.teacher,
        result.features,
        legend_html(result.legend),
        timings_markdown(result, module_device(student)),
    )


def build_page(
    backbone: str = "tiny", checkpoint: str = "", device: str | None = None
) -> Any:  # gradio.Blocks; gradio is an optional extra
    """The Gradio page; ``launch_page`` serves it."""
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError('the page needs Gradio: pip install -e ".[app]"') from error

    device = str(device or resolve_device("auto"))
    names = stage_names()
    found = find_checkpoints()
    checkpoints = [("none: the pretrained single pass", "")] + [(p, p) for p in found]
    if checkpoint and checkpoint not in found:
        checkpoints.append((checkpoint, checkpoint))

    def on_click(*values: Any) -> tuple:
        try:
            return run_page(*values, device=device)
        except (ValueError, FileNotFoundError, KeyError) as error:
            raise gr.Error(str(error)) from error

    with gr.Blocks(title="spar: open-vocabulary segmentation", analytics_enabled=False) as page:
        gr.Markdown(
            "## spar: single-pass student vs. sliding-window teacher\n"
            "Upload an image or pick a sample, type class names (one per line, synonyms "
            "separated by commas), then **Segment**."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="image", elem_id="input-image")
                gr.Examples([[str(p)] for p in sample_images()], inputs=[image], label="samples")
                classes = gr.Textbox(DEFAULT_CLASSES, lines=6, label="classes", elem_id="classes")
                with gr.Row():
                    backbone_choice = gr.Dropdown(
                        list_backbones(), value=backbone, label="backbone", elem_id="backbone"
                    )
                    checkpoint_choice = gr.Dropdown(
                        checkpoints,
                        value=checkpoint,
                        allow_custom_value=True,
                        label="checkpoint (file, student folder or hub id)",
                        elem_id="checkpoint",
                    )
                with gr.Row():
                    show_teacher = gr.Checkbox(True, label="teacher beside the student")
                    stride = gr.Slider(
                        8, 512, value=TeacherSettings.stride, step=8, label="teacher stride (px)"
                    )
                with gr.Row():
                    templates = gr.Radio(
                        ["imagenet80", "single"], value=PROTOCOL.templates, label="prompt templates"
                    )
                    bounds = gr.Radio(list(IMAGE_BOUNDS), value="448x336", label="resize to fit")
                with gr.Row():
                    prob = gr.Slider(
                        0, 1, value=0, step=0.05, label="probability threshold (0 = off)"
                    )
                    area = gr.Slider(0, 1, value=0, step=0.01, label="area threshold (0 = off)")
                stage_inputs = []
                if names is not None:  # spar.refine: LPOSS / LPOSS+ and AnyUp
                    with gr.Row():
                        stage_inputs = [
                            gr.Dropdown(
                                list(names[0]), value="none", label="refine", elem_id="refine"
                            ),
                            gr.Dropdown(
                                list(names[1]),
                                value="bilinear",
                                label="upsample",
                                elem_id="upsample",
                            ),
                        ]
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                # Pictures without Gradio's label and buttons, which would cover their legends
                # and titles; headings above them instead.
                plain = dict(format="png", show_label=False, buttons=[], interactive=False)
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**student** (single pass)")
                        student_out = gr.Image(elem_id="student", **plain)
                    with gr.Column():
                        gr.Markdown("**teacher** (sliding window)")
                        teacher_out = gr.Image(elem_id="teacher", **plain)
                legend = gr.HTML(elem_id="legend")
                gr.Markdown("**PCA of the features** (first three components as RGB, one basis)")
                features_out = gr.Image(elem_id="features", **plain)
                timings = gr.Markdown(elem_id="timings")
        button.click(
            on_click,
            inputs=[
                image,
                classes,
                backbone_choice,
                checkpoint_choice,
                show_teacher,
                stride,
                templates,
                bounds,
                prob,
                area,
                *stage_inputs,
            ],
            outputs=[student_out, teacher_out, features_out, legend, timings],
        )
    return page


def launch_page(page: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve ``page`` on ``host:port`` with fonts of the system (nothing fetched from
    elsewhere); ``block=False`` returns at once (tests)."""
    import gradio as gr

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        ssr_mode=False,
        theme=theme,
        quiet=not block,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``spar-app`` (``scripts/app.py``): parse the command line, build the page and serve it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--backbone", default="tiny", choices=list_backbones())
    parser.add_argument("--checkpoint", default="", help="preselected checkpoint or folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    try:
        page = build_page(args.backbone, args.checkpoint, str(resolve_device(args.device)))
    except ImportError as error:  # Gradio is an optional extra
        raise SystemExit(f"error: {error}") from None
    launch_page(page, args.host, args.port)
