"""``spar-export``: write a student's dense forward as one ONNX file (any image size).

``spar-export backbone=siglip2 checkpoint=runs/x/last.safetensors output=student.onnx
classes="[sky,road,'car, automobile']"`` (also ``python -m spar.export_onnx`` and
``scripts/export.py``). With ``classes`` the text embeddings of the class list are written beside
the ONNX file (``<output stem>.text.safetensors``), so a deployment needs no tokenizer. The
library functions are :func:`spar.export.export_onnx` and
:func:`spar.export.export_text_embeddings`; docs/deployment.md shows how to run the file with
onnxruntime.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.class_names import load_class_names, parse_classes
from spar.config import reject_renamed_overrides, report_user_errors
from spar.distributed import register_run_id_resolver
from spar.export import (
    check_destination,
    check_example_size,
    export_onnx,
    export_text_embeddings,
)
from spar.models import create_backbone

register_run_id_resolver()


def text_path(onnx_path: Path) -> Path:
    """Where the text embeddings of ``onnx_path``'s class list go: ``<stem>.text.safetensors``."""
    return onnx_path.with_name(f"{onnx_path.stem}.text.safetensors")


def resolve_classes(classes) -> list | None:
    """``classes`` setting -> class entries: a list, a class-name file (one class a line), or
    ``None``."""
    if classes is None:
        return None
    if isinstance(classes, str):
        return load_class_names(classes)
    return list(OmegaConf.to_container(classes))


@hydra.main(config_path="pkg://spar.configs", config_name="export", version_base="1.3")
@report_user_errors
def export(cfg: DictConfig) -> None:
    """Export as ``cfg`` (``spar/configs/export.yaml``) says; print the written paths."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    output = Path(cfg.output) if cfg.output else out_dir / f"{cfg.backbone.name}.onnx"
    check_destination(output, ".onnx")  # before the backbone is built
    classes = resolve_classes(cfg.classes)
    if classes is not None:
        parse_classes(classes)
        check_destination(text_path(output), ".safetensors")
    size = cfg.example_size
    if OmegaConf.is_config(size):
        size = OmegaConf.to_container(size)
    if size is not None:
        size = check_example_size(size)
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone_cfg.pop("trainable_blocks", None)
    backbone = create_backbone(**backbone_cfg, checkpoint=cfg.checkpoint)
    export_onnx(backbone, output, example_size=size, opset=cfg.opset)
    print(f"dense forward: {output}")
    if classes is not None:
        path = export_text_embeddings(backbone, classes, text_path(output), cfg.templates)
        print(f"text embeddings of {len(classes)} classes: {path}")


def main() -> None:
    """The command line: Hydra overrides in ``sys.argv``."""
    reject_renamed_overrides(sys.argv[1:], "export")
    export()


if __name__ == "__main__":
    main()
