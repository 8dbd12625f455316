"""Data discovery: turns a ``dataset_dir`` into MONAI datalists (lists of ``{"image": path, ...}`` dicts).

Three layouts are understood, chosen by what ``dataset_dir`` holds or by ``layout``:

- ``hipmri``: ``keras_slices_{train,validate,test}/case_XXX_week_Y_slice_Z.nii[.gz]`` (masks in
  ``keras_slices_seg_*`` are ignored);
- ``oasis``: ``keras_png_slices_{train,validate,test}/*.png`` (masks in ``keras_png_slices_seg_*`` are ignored);
- ``datalist``: a MONAI-style JSON file ``{"training": [...], "validation": [...], "test": [...]}`` given as
  ``dataset_dir`` itself or found as ``dataset_dir/datalist.json``; relative paths are taken from the JSON's folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "validate", "test")
DATALIST_KEYS = {"train": "training", "validate": "validation", "test": "test"}
FOLDERS = {"hipmri": "keras_slices_{split}", "oasis": "keras_png_slices_{split}"}
EXTENSIONS = {"hipmri": (".nii.gz", ".nii"), "oasis": (".png",)}
SLICE_PATTERN = re.compile(r"case_(\d+)_week_(\d+)_slice_(\d+)")


def detect_layout(dataset_dir: str | os.PathLike) -> str:
    """Tells which layout ``dataset_dir`` holds.

    Args:
        dataset_dir: a folder in the HipMRI or OASIS layout, a datalist JSON, or a folder holding ``datalist.json``.

    Returns:
        ``"hipmri"``, ``"oasis"`` or ``"datalist"``.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist.
        ValueError: it exists but holds none of the layouts.
    """
    path = Path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(f"dataset_dir '{path}' does not exist; set --dataset_dir to your data folder.")
    if path.is_file():
        if path.suffix == ".json":
            return "datalist"
        raise ValueError(f"dataset_dir '{path}' is a file but not a datalist .json.")
    if (path / "datalist.json").is_file():
        return "datalist"
    for layout, pattern in FOLDERS.items():
        if any((path / pattern.format(split=split)).is_dir() for split in SPLITS):
            return layout
    raise ValueError(
        f"dataset_dir '{path}' holds no known layout: expected keras_slices_train/ (HipMRI NIfTI), "
        "keras_png_slices_train/ (OASIS PNG) or datalist.json."
    )


def slice_index(path: str | os.PathLike) -> int | None:
    """The slice position ``Z`` parsed from a HipMRI name ``case_XXX_week_Y_slice_Z``, or None."""
    match = SLICE_PATTERN.search(Path(path).name)
    return int(match.group(3)) if match else None


def _is_image_file(name: str, layout: str) -> bool:
    # Masks sometimes share a folder with images in user copies of the data; never train on them.
    return name.endswith(EXTENSIONS[layout]) and not name.startswith("seg_")


def _folder_datalist(root: Path, layout: str, split: str) -> list[dict]:
    folder = root / FOLDERS[layout].format(split=split)
    if not folder.is_dir():
        raise FileNotFoundError(f"split '{split}' not found: '{folder}' does not exist.")
    names = sorted(n for n in os.listdir(folder) if _is_image_file(n, layout))
    return [{"image": str(folder / n)} for n in names]


def _json_datalist(path: Path, split: str) -> list[dict]:
    json_path = path / "datalist.json" if path.is_dir() else path
    try:
        content = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"datalist '{json_path}' is not valid JSON: {error}") from error
    key = DATALIST_KEYS[split]
    if key not in content:
        raise ValueError(f"datalist '{json_path}' has no '{key}' list (split '{split}').")
    items = []
    for index, item in enumerate(content[key]):
        item = {"image": item} if isinstance(item, str) else dict(item)
        if "image" not in item:
            raise ValueError(f"datalist '{json_path}' entry {key}[{index}] has no 'image'.")
        image = Path(item["image"])
        item["image"] = str(image if image.is_absolute() else json_path.parent / image)
        items.append(item)
    return items


def datalist(
    dataset_dir: str | os.PathLike,
    split: str,
    layout: str = "auto",
    demo_dir: str | os.PathLike | None = None,
    num_classes: int = 0,
    max_slice: int = 0,
) -> list[dict]:
    """Lists the images of one split.

    Args:
        dataset_dir: the data folder (or datalist JSON).
        split: ``"train"``, ``"validate"`` or ``"test"``.
        layout: ``"auto"`` (detect), ``"hipmri"``, ``"oasis"`` or ``"datalist"``.
        demo_dir: the bundle's demo-data folder. When ``dataset_dir`` is this folder and does not exist yet,
            the synthetic pelvis phantoms are generated there first, so a fresh clone runs with no data.
        num_classes: when > 0, each item gets an integer ``label`` in ``[0, num_classes)``: the datalist's own
            ``label`` if it has one, else the HipMRI slice position bucketed over ``[0, max_slice]``.
        max_slice: the largest slice position, for bucketing; 0 takes the largest one found in this split.

    Returns:
        A list of dicts with key ``image`` (and ``label`` when ``num_classes`` > 0), sorted by path.

    Raises:
        FileNotFoundError: the folder or split is missing.
        ValueError: the split holds no image, or a label cannot be made.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
    root = Path(dataset_dir)
    if demo_dir is not None and not root.exists() and root.resolve() == Path(demo_dir).resolve():
        from bundle.data.phantom import write_hipmri_phantoms

        logger.info(f"Demo data not found; generating synthetic pelvis phantoms in '{root}'.")
        write_hipmri_phantoms(root)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in (*FOLDERS, "datalist"):
        raise ValueError(f"layout must be 'auto', 'hipmri', 'oasis' or 'datalist', got '{layout}'.")
    items = _json_datalist(root, split) if layout == "datalist" else _folder_datalist(root, layout, split)
    if not items:
        raise ValueError(f"split '{split}' of '{root}' ({layout} layout) holds no images.")
    if num_classes > 0:
        _add_labels(items, num_classes, max_slice)
    return items


def _add_labels(items: list[dict], num_classes: int, max_slice: int) -> None:
    positions = [slice_index(item["image"]) for item in items]
    top = max_slice or max((p for p in positions if p is not None), default=0)
    for item, position in zip(items, positions):
        if "label" in item:
            item["label"] = int(item["label"])
        elif position is not None:
            item["label"] = min(num_classes - 1, position * num_classes // (top + 1))
        else:
            raise ValueError(f"cannot label '{item['image']}': no 'label' in the datalist and no '_slice_Z' in its name.")
        if not 0 <= item["label"] < num_classes:
            raise ValueError(f"label {item['label']} of '{item['image']}' is outside [0, {num_classes}).")


def require_files(items: list[dict], source: str | os.PathLike) -> list[dict]:
    """Raises a clear error when a file listing came back empty; returns ``items`` unchanged otherwise."""
    if not items:
        raise ValueError(f"no NIfTI images (*.nii, *.nii.gz) found in '{source}'.")
    return items
