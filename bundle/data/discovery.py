"""Data discovery: turns a ``dataset_dir`` into MONAI datalists (lists of ``{"image": path, ...}`` dicts).

Three layouts are understood, chosen by what ``dataset_dir`` holds or by ``layout``:

- ``hipmri``: ``keras_slices_{train,validate,test}/case_XXX_week_Y_slice_Z.nii[.gz]`` (masks in
  ``keras_slices_seg_*`` are ignored);
- ``oasis``: ``keras_png_slices_{train,validate,test}/*.png`` (masks in ``keras_png_slices_seg_*`` are ignored);
- ``datalist``: a MONAI (Medical Segmentation Decathlon) datalist JSON ``{"training": [...], "validation": [...],
  "test": [...]}`` given as ``dataset_dir`` itself or found as ``dataset_dir/datalist.json``, read with
  ``monai.data.load_decathlon_datalist``; relative paths are taken from the JSON's folder.

Looking for data never creates any: the demo phantoms are written by ``scripts/make_phantoms.py`` (or
``bundle.data.phantom.write_demo_phantoms``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from monai.data import load_decathlon_datalist

SPLITS = ("train", "validate", "test")
DATALIST_KEYS = {"train": "training", "validate": "validation", "test": "test"}
FOLDERS = {"hipmri": "keras_slices_{split}", "oasis": "keras_png_slices_{split}"}
EXTENSIONS = {"hipmri": (".nii.gz", ".nii"), "oasis": (".png",)}
SLICE_PATTERN = re.compile(r"case_(\d+)_week_(\d+)_slice_(\d+)")


def _how_to_get_data(path: Path) -> str:
    return (
        f"Set --dataset_dir to your data folder, or create the demo phantoms there with "
        f"`python scripts/make_phantoms.py --out_dir '{path}'` (bash scripts/demo.sh does this too)."
    )


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
        raise FileNotFoundError(f"dataset_dir '{path}' does not exist. {_how_to_get_data(path)}")
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
        f"keras_png_slices_train/ (OASIS PNG) or datalist.json. {_how_to_get_data(path)}"
    )


def slice_index(path: str | os.PathLike) -> int | None:
    """The slice position ``Z`` parsed from a HipMRI name ``case_XXX_week_Y_slice_Z``, or None."""
    match = SLICE_PATTERN.search(Path(path).name)
    return int(match.group(3)) if match else None


def scan_key(path: str | os.PathLike) -> tuple[str, str, str] | None:
    """(folder, case, week) of a HipMRI slice name: the slices of one scan share it. None for other names.

    Args:
        path: a slice's file path or name.
    """
    match = SLICE_PATTERN.search(Path(path).name)
    return (str(Path(path).parent), match.group(1), match.group(2)) if match else None


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
    key = DATALIST_KEYS[split]
    try:
        # is_segmentation=False: a "label" is a class index here, not a file to resolve against the JSON's folder.
        items = load_decathlon_datalist(json_path, is_segmentation=False, data_list_key=key)
    except json.JSONDecodeError as error:
        raise ValueError(f"datalist '{json_path}' is not valid JSON: {error}") from error
    except IndexError:  # MONAI reads test[0] to detect a list of bare paths before checking that it is non-empty
        return []
    except TypeError as error:  # a bare path outside "test"
        raise ValueError(f"datalist '{json_path}' list '{key}': {error}") from error
    for index, item in enumerate(items):
        if "image" not in item:
            raise ValueError(f"datalist '{json_path}' entry {key}[{index}] has no 'image'.")
    return items


def datalist(
    dataset_dir: str | os.PathLike, split: str, layout: str = "auto", num_classes: int = 0, max_slice: int = 0
) -> list[dict]:
    """Lists the images of one split.

    Args:
        dataset_dir: the data folder (or datalist JSON).
        split: ``"train"``, ``"validate"`` or ``"test"``.
        layout: ``"auto"`` (detect), ``"hipmri"``, ``"oasis"`` or ``"datalist"``.
        num_classes: when > 0, each item gets an integer ``label`` in ``[0, num_classes)``: the datalist's own
            ``label`` if it has one, else its slice position bucketed by :func:`slice_position_label`.
        max_slice: the largest slice position of every scan, the same for all splits; 0 buckets each slice by its
            position relative to its own scan's largest slice index.

    Returns:
        A list of dicts with key ``image`` (and ``label`` when ``num_classes`` > 0), sorted by path for the folder
        layouts and in file order for a datalist JSON.

    Raises:
        FileNotFoundError: the folder or split is missing.
        ValueError: the split holds no image, or a label cannot be made.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
    root = Path(dataset_dir)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in (*FOLDERS, "datalist"):
        raise ValueError(f"layout must be 'auto', 'hipmri', 'oasis' or 'datalist', got '{layout}'.")
    items = _json_datalist(root, split) if layout == "datalist" else _folder_datalist(root, layout, split)
    if not items:
        raise ValueError(f"split '{split}' of '{root}' ({layout} layout) holds no images.")
    if num_classes > 0:
        _add_labels(items, num_classes, max_slice)
    return items


def slice_position_label(position: int, top: int, num_classes: int) -> int:
    """The class of slice ``position`` of a scan whose slices run from 0 to ``top``: ``[0, top]`` cut into
    ``num_classes`` equal buckets, 0 the most inferior.

    Args:
        position: slice index, ``0 <= position <= top``.
        top: the scan's largest slice index (or a fixed one for all scans).
        num_classes: number of buckets, >= 1.

    Returns:
        The bucket index in ``[0, num_classes)``.
    """
    return min(num_classes - 1, position * num_classes // (top + 1))


def _add_labels(items: list[dict], num_classes: int, max_slice: int) -> None:
    tops: dict[tuple[str, str, str], int] = {}
    for item in items:
        key = scan_key(item["image"])
        if key is not None:
            tops[key] = max(tops.get(key, 0), slice_index(item["image"]))
    for item in items:
        position = slice_index(item["image"])
        if "label" in item:
            item["label"] = int(item["label"])
        elif position is not None:
            top = max_slice or tops[scan_key(item["image"])]
            item["label"] = slice_position_label(position, top, num_classes)
        else:
            raise ValueError(
                f"cannot label '{item['image']}': no 'label' in the datalist and no '_slice_Z' in its name."
            )
        if not 0 <= item["label"] < num_classes:
            raise ValueError(f"label {item['label']} of '{item['image']}' is outside [0, {num_classes}).")


def require_files(items: list[dict], source: str | os.PathLike) -> list[dict]:
    """Raises a clear error when a file listing came back empty; returns ``items`` unchanged otherwise."""
    if not items:
        raise ValueError(
            f"no NIfTI images (*.nii, *.nii.gz) found in '{source}'. For the demo phantoms, run "
            "`python scripts/make_phantoms.py`."
        )
    return items


def require_batches(split: str, num_items: int, batch_size: int, drop_last: bool = True) -> int:
    """The number of batches a training split gives each process; an error when it gives none.

    With ``drop_last`` a split smaller than one batch yields no batch at all, and MONAI's trainer then skips the
    run, exits 0 and writes no weights. The split is divided among the processes of a distributed run
    (``DistributedSampler`` pads every process to the same share).

    Args:
        split: the split's name for the message, e.g. ``"train"``.
        num_items: images (or code maps) in the split.
        batch_size: the training batch size.
        drop_last: whether the loader drops an incomplete last batch.

    Returns:
        Batches per epoch on each process.

    Raises:
        ValueError: the split gives no batch; names the split, its size and the batch size.
    """
    import ignite.distributed as idist

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    world = idist.get_world_size()
    share = -(-num_items // world)
    batches = share // batch_size if drop_last else -(-share // batch_size)
    if batches == 0:
        per_process = f" ({share} per process on {world} processes)" if world > 1 else ""
        raise ValueError(
            f"split '{split}' has {num_items} images{per_process}, fewer than batch_size {batch_size}, and the "
            f"incomplete batch is dropped: training would run no iteration. Lower the batch size to at most "
            f"{max(share, 1)} or add data."
        )
    return batches


def require_distinct_outputs(
    items: list[dict],
    output_dir: str | os.PathLike,
    postfix: str = "recon",
    extension: str = ".nii.gz",
    key: str = "image",
) -> list[dict]:
    """Raises when two inputs would be written to the same output file; returns ``items`` unchanged otherwise.

    MONAI's ``SaveImage`` names an output after its input without folder or extension, so ``a.nii`` and
    ``a.nii.gz``, or ``x/a.nii.gz`` and ``y/a.nii.gz``, would overwrite each other's result.

    Args:
        items: the datalist.
        output_dir: the writer's ``output_dir``.
        postfix: the writer's ``output_postfix``.
        extension: the writer's ``output_ext``.
        key: the input image key.

    Returns:
        ``items``.

    Raises:
        ValueError: names each output and the inputs that collide on it.
    """
    from monai.data import FolderLayout

    layout = FolderLayout(output_dir=output_dir, postfix=postfix, extension=extension, parent=False, makedirs=False)
    by_output: dict[str, list[str]] = {}
    for item in items:
        by_output.setdefault(str(layout.filename(subject=str(item[key]))), []).append(str(item[key]))
    collisions = {output: inputs for output, inputs in by_output.items() if len(inputs) > 1}
    if collisions:
        listing = "; ".join(f"{' and '.join(repr(i) for i in inputs)} -> '{out}'" for out, inputs in collisions.items())
        raise ValueError(
            f"{len(collisions)} output file(s) would be written by more than one input, each overwriting the "
            f"other: {listing}. Rename or separate those inputs."
        )
    return items
