"""Unlabeled training images: the train/held-out split and the dataset of augmented views."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from ..config import renamed_arguments
from ..data.images import load_image, to_model_input
from .augment import AugmentationPlan, AugmentationRecipe, apply_plan, draw_plan, plan_generator

if TYPE_CHECKING:
    from .targets import TeacherTargets


@dataclass(frozen=True)
class ImageSplit:
    """Training and held-out image files (disjoint)."""

    train: list[Path]
    heldout: list[Path]


def split_images(
    paths: Sequence[Path], num_heldout: int, max_train: int | None = None
) -> ImageSplit:
    """Hold out the last ``num_heldout`` files; train on the first ``max_train`` of the rest.

    ``paths`` should be sorted (``list_images`` sorts), so the split is stable across runs and
    machines. Raises ``ValueError`` when no training image would remain.
    """
    paths = list(paths)
    if num_heldout < 0:
        raise ValueError(f"num_heldout must be >= 0, got {num_heldout}")
    if num_heldout >= len(paths):
        raise ValueError(
            f"{len(paths)} image(s) cannot give {num_heldout} held-out image(s) and a training set"
        )
    train = paths[: len(paths) - num_heldout]
    heldout = paths[len(paths) - num_heldout :]
    if max_train is not None:
        train = train[:max_train]
    return ImageSplit(train, heldout)


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A micro-batch of same-size views (size buckets) -> one dict.

    Returns ``images`` ((n, 3, H, W), or ``None`` when every image was unreadable), ``items``
    (the n usable views, with their ``key`` and ``target``) and ``skipped``
    ((path, reason) of the unreadable ones).
    """
    usable = [item for item in items if item["skipped"] is None]
    sizes = {tuple(item["image"].shape) for item in usable}
    if len(sizes) > 1:
        raise ValueError(f"a micro-batch mixes view sizes {sorted(sizes)}")
    return {
        "images": torch.stack([item["image"] for item in usable]) if usable else None,
        "items": usable,
        "skipped": [(item["path"], item["skipped"]) for item in items if item["skipped"]],
    }


class DistillationViews(Dataset):
    """Augmented views of training images, normalised for the backbone, keyed for the teacher.

    Item ``i`` is view ``i % draws_per_image`` of image ``i // draws_per_image``. With
    ``fixed_views`` (the cached teacher) its augmentation is drawn once from
    ``(augment_seed, image, draw)`` and is the same in every epoch, so its teacher map can be
    cached; otherwise it is drawn from ``(augment_seed, epoch, i)`` afresh each epoch
    (``set_epoch``).

    Each item is a dict: ``index``, ``path``, ``image`` ((3, H, W) normalised float32),
    ``plan`` (:class:`AugmentationPlan`), ``key`` (:class:`~spar.distill.targets.TargetKey`,
    ``None`` without ``targets``), ``target`` ((C, h, w) float16 read through ``targets`` in the
    loading process, or ``None``: not read, missing or bad) and ``skipped`` (``None``, or why
    the image could not be used; then no image).

    Args:
        targets: the owner of the teacher maps, which keys the views; ``None``: unkeyed views,
            e.g. for the online teacher.
        read_targets: read each keyed view's stored map through ``targets`` while loading (in
            the data-loading workers); :meth:`without_targets` gives the views without it.
    """

    @renamed_arguments()
    def __init__(
        self,
        paths: Sequence[Path],
        root: str | Path,
        recipe: AugmentationRecipe,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment_seed: int = 0,
        draws_per_image: int = 1,
        fixed_views: bool = True,
        targets: TeacherTargets | None = None,
        read_targets: bool = True,
    ) -> None:
        if draws_per_image < 1:
            raise ValueError(f"draws_per_image must be >= 1, got {draws_per_image}")
        self.paths = list(paths)
        self.root = Path(root)
        self.recipe = recipe
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment_seed = augment_seed
        self.draws_per_image = draws_per_image
        self.fixed_views = fixed_views
        self.targets = targets
        self.read_targets = read_targets
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths) * self.draws_per_image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def without_targets(self) -> DistillationViews:
        """The same views, keyed but without reading stored maps (to fill the cache)."""
        views = copy.copy(self)
        views.read_targets = False
        return views

    def plan_for(
        self, index: int, source_size: tuple[int, int], epoch: int | None = None
    ) -> AugmentationPlan:
        """The view of item ``index`` (in ``epoch``, default the current one)."""
        if self.fixed_views:
            image, draw = divmod(index, self.draws_per_image)
            rng = plan_generator(self.augment_seed, image, draw)
        else:
            rng = plan_generator(self.augment_seed, self.epoch if epoch is None else epoch, index)
        return draw_plan(source_size, self.recipe, rng)

    def view_size(
        self, index: int, source_sizes: Sequence[tuple[int, int] | None], epoch: int
    ) -> tuple[int, int] | None:
        """Output (H, W) of view ``index`` in ``epoch`` without loading the image.

        ``source_sizes`` holds the (H, W) of every image file (``None`` if unreadable).
        """
        source = source_sizes[index // self.draws_per_image]
        return None if source is None else self.plan_for(index, source, epoch).output

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index // self.draws_per_image]
        item: dict[str, Any] = {"index": index, "path": str(path), "skipped": None}
        try:
            pixels = load_image(path)
        except (ValueError, OSError) as error:
            item["skipped"] = str(error)
            return item
        plan = self.plan_for(index, tuple(pixels.shape[-2:]))
        item["plan"] = plan
        item["image"] = to_model_input(apply_plan(pixels, plan), self.mean, self.std)[0]
        item["key"] = item["target"] = None
        if self.targets is not None:
            item["key"] = self.targets.key_for(path, {"augmentation": plan.to_dict()})
            if self.read_targets:
                item["target"] = self.targets.load(item["key"], plan.output)
        return item
