"""Evaluation results as tables: one run's per-class table, and every ``eval_results.json`` under
a folder as one markdown table of mIoU, one row per distinct fingerprint (settings + weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .eval_fingerprint import evaluation_settings, row_key
from .provenance import ProvenanceError, describe_differences, fingerprint_differences

#: Two results of one fingerprint closer than this (mIoU points; the table shows 0.1) are one
#: evaluation made twice; further apart, they cannot be one row's cell.
_SAME_MIOU = 0.05


def format_results_table(results: dict[str, Any]) -> str:
    """Per-class IoU table and the summary line, as printed by ``spar-eval``."""
    width = max([len(name) for name in results["per_class_iou"]] + [5])
    lines = [f"{'class':<{width}}  {'IoU':>6}", "-" * (width + 8)]
    for name, value in results["per_class_iou"].items():
        lines.append(f"{name:<{width}}  {'n/a' if value is None else f'{value:.2f}':>6}")
    lines.append("-" * (width + 8))
    lines.append(
        f"mIoU {results['miou']:.2f}  aAcc {results['aacc']:.2f}  mAcc {results['macc']:.2f}  "
        f"images {results['num_images']} (skipped {results['skipped_images']})  "
        f"{results['images_per_second']:.2f} img/s"
    )
    return "\n".join(lines)


def _row_label(results: dict[str, Any]) -> str:
    """Backbone, feature source and checkpoint, then the refinement stages that are on (so an
    LPOSS or AnyUp run gets its own row)."""
    config = results.get("config", {})
    backbone = config.get("backbone", {}).get("name", "?")
    if results.get("features") == "teacher":
        label = f"{backbone} teacher (stride {config.get('teacher', {}).get('stride')})"
    elif config.get("checkpoint"):
        label = f"{backbone} SPAR ({Path(config['checkpoint']).name})"
    else:
        label = f"{backbone} single pass"
    refine = (config.get("refine") or {}).get("name", "none")
    upsample = (config.get("upsample") or {}).get("name", "bilinear")
    stages = [name for name, off in ((refine, "none"), (upsample, "bilinear")) if name != off]
    return " + ".join([label, *stages])


def result_fingerprint(results: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint an ``eval_results.json`` records; for files written before fingerprints,
    its config's scored settings and the checkpoint's path (no weights digest)."""
    if "fingerprint" in results:
        return results["fingerprint"]
    config = {**results.get("config", {}), "features": results.get("features")}
    return {**evaluation_settings(config), "checkpoint": config.get("checkpoint")}


def _distinguishing(rows: list[dict[str, Any]]) -> list[str]:
    """For rows (row fingerprints) that share a label: what tells each apart, as few of the
    settings whose values differ among them as tell them all apart (in key order), then a short
    weights digest when the weights differ."""

    def shown(row: dict[str, Any], key: str) -> str:
        return json.dumps(row.get(key), sort_keys=True, default=str).strip('"')

    keys = sorted({k for a in rows for b in rows for k in fingerprint_differences(a, b)})
    chosen = ["weights"] if "weights" in keys else []

    def groups(chosen_keys: list[str]) -> int:
        return len({tuple(shown(r, k) for k in chosen_keys) for r in rows})

    for key in keys:
        if groups(chosen) == len(rows):
            break
        if key != "weights" and groups([*chosen, key]) > groups(chosen):
            chosen.append(key)
    settings = [k for k in chosen if k != "weights"]
    return [
        ", ".join(
            [f"{k}={shown(row, k)}" for k in settings]
            + ([f"weights {shown(row, 'weights')[:8]}"] if "weights" in chosen else [])
        )
        for row in rows
    ]


def collect_results(root: str | Path) -> str:
    """A markdown table of every ``eval_results.json`` under ``root``: one row per distinct
    fingerprint outside its dataset keys (settings + weights digest), one column per dataset,
    plus their mean (mIoU, percent).

    Rows that would share a label (two students whose checkpoints are both ``best.safetensors``,
    ``templates=imagenet80`` and ``templates=single``) get the differing settings and a short
    weights digest added. Two results of one row and one dataset made from different
    fingerprints (other data, other dataset settings) raise
    :class:`~spar.provenance.ProvenanceError` naming both files and the differences: they are
    never merged, nor one silently dropped.
    """
    rows: dict[str, dict[str, Any]] = {}  # row key (JSON) -> label, fingerprint, cells
    for path in sorted(Path(root).rglob("eval_results.json")):
        results = json.loads(path.read_text())
        fingerprint = result_fingerprint(results)
        shared = row_key(fingerprint)
        row = rows.setdefault(
            json.dumps(shared, sort_keys=True, default=str),
            {"label": _row_label(results), "fingerprint": shared, "cells": {}},
        )
        dataset = results["dataset"]
        if dataset in row["cells"]:
            earlier_path, earlier = row["cells"][dataset]["path"], row["cells"][dataset]["fp"]
            differences = fingerprint_differences(earlier, fingerprint)
            if differences:
                raise ProvenanceError(
                    f"{earlier_path} and {path} are results of one setting on {dataset} made "
                    f"from different fingerprints ({describe_differences(differences)}); move "
                    "one of them out of the folder"
                )
            if abs(row["cells"][dataset]["miou"] - results["miou"]) > _SAME_MIOU:
                raise ProvenanceError(
                    f"{earlier_path} and {path} record one fingerprint on {dataset} but mIoU "
                    f"{row['cells'][dataset]['miou']:.2f} and {results['miou']:.2f}; move one "
                    "of them out of the folder"
                )
            continue  # the same evaluation twice (e.g. a copied folder): one cell
        row["cells"][dataset] = {"miou": results["miou"], "path": path, "fp": fingerprint}
    if not rows:
        raise FileNotFoundError(f"no eval_results.json under {root}")
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows.values():
        by_label.setdefault(row["label"], []).append(row)
    for label, same in by_label.items():
        if len(same) > 1:
            parts = _distinguishing([r["fingerprint"] for r in same])
            for row, part in zip(same, parts, strict=True):
                row["label"] = f"{label} [{part}]"
    datasets = sorted({name for row in rows.values() for name in row["cells"]})
    lines = [
        "| setting | " + " | ".join(datasets) + " | mean |",
        "|---|" + "---|" * (len(datasets) + 1),
    ]
    for row in rows.values():
        values = {name: cell["miou"] for name, cell in row["cells"].items()}
        cells = [f"{values[d]:.1f}" if d in values else "" for d in datasets]
        mean = f"{sum(values.values()) / len(values):.1f}" if len(values) == len(datasets) else ""
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)
