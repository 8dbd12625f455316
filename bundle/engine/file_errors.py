"""Workflows over many files: every unreadable file is named, in one pass.

- :class:`CheckedCacheDataset`: a ``CacheDataset`` whose cache build (the data check before training) reads every
  file and raises one error naming all the unreadable ones, instead of stopping at the first.
- :class:`FileErrors`: inference and evaluation skip a file that cannot be read (or whose result is not finite),
  name it in the log, process the rest, and raise one summary at the end so the run exits non-zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from ignite.engine import Engine
from monai.data import CacheDataset

logger = logging.getLogger(__name__)


def error_reason(error: BaseException) -> str:
    """The message of the error a user needs, under MONAI's ``applying transform ...`` wrappers."""
    while isinstance(error, RuntimeError) and str(error).startswith("applying transform") and error.__cause__:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _item_path(item: Any, key: Hashable) -> str:
    return str(item.get(key, item)) if isinstance(item, Mapping) else str(item)


class UnreadableFilesError(ValueError):
    """Files that cannot be used; the message names each one and why, ``failures`` maps each path to why."""

    failures: dict[str, str]


def _unreadable(summary: str, failures: Mapping[str, str]) -> UnreadableFilesError:
    listing = "\n".join(f"  {path}: {reason}" for path, reason in failures.items())
    error = UnreadableFilesError(f"{summary}:\n{listing}")
    error.failures = dict(failures)
    return error


class CheckedCacheDataset(CacheDataset):
    """``CacheDataset`` whose cache build reads every item and reports all unreadable ones at once.

    MONAI's cache build stops at the first file that fails; with thousands of slices, fixing them one run at a
    time is slow. Items left out of the cache (``cache_rate < 1``) are read once too, up to the first random
    transform, so the whole split is checked before training. With ``runtime_cache`` nothing is read up front
    and so nothing is checked.

    Args:
        args, kwargs: those of ``monai.data.CacheDataset``.
        split: the split's name for the message, e.g. ``"train"``.
        key: the key holding each item's file path.
    """

    def __init__(self, *args, split: str = "", key: Hashable = "image", **kwargs) -> None:
        self.split, self.key = split, key
        self._failures: dict[str, str] | None = None
        super().__init__(*args, **kwargs)

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list:
        self._failures = {}
        try:
            cache = super()._fill_cache(indices)
            cached = set(range(self.cache_num) if indices is None else indices)
            for index in range(len(self.data)):
                if index not in cached:
                    self._load_cache_item(index)
            failures = self._failures
        finally:
            self._failures = None
        if failures:
            where = f"split '{self.split}'" if self.split else "the data set"
            raise _unreadable(
                f"{len(failures)} of {len(self.data)} files of {where} cannot be used; fix or remove them", failures
            )
        return cache

    def _load_cache_item(self, idx: int) -> Any:
        if self._failures is None:  # reading outside the check: errors propagate as usual
            return super()._load_cache_item(idx)
        try:
            return super()._load_cache_item(idx)
        except Exception as error:
            self._failures[_item_path(self.data[idx], self.key)] = error_reason(error)
            return None


class FileErrors:
    """The files a workflow skipped and why, raised together at the end.

    Args:
        key: the key holding each item's file path.
    """

    def __init__(self, key: Hashable = "image") -> None:
        self.key = key
        self.skipped: dict[str, str] = {}
        self.total = 0

    def add(self, path: str, reason: str) -> None:
        """Records a skipped file and logs an error naming it."""
        self.skipped[str(path)] = reason
        logger.error(f"skipped '{path}': {reason}")

    def readable(self, items: Sequence[Any], transform: Callable) -> list[Any]:
        """The items that ``transform`` (the loading and preprocessing) accepts; the others are skipped.

        Each file is read here and again by the workflow: this suits inference and evaluation sets, not caching.

        Args:
            items: the datalist.
            transform: applied to each item; its result is discarded.

        Returns:
            The readable items, in order.
        """
        self.total += len(items)
        kept = []
        for item in items:
            try:
                transform(dict(item) if isinstance(item, Mapping) else item)
            except Exception as error:
                self.add(_item_path(item, self.key), error_reason(error))
                continue
            kept.append(item)
        return kept

    def evaluator_iteration(self, engine: Engine, batch: Any) -> Any:
        """An ``iteration_update`` for a MONAI evaluator without metrics (inference): a batch whose inference or
        postprocessing raises (for example on a non-finite result) is skipped and its files recorded.

        Args:
            engine: the evaluator.
            batch: the collated batch.

        Returns:
            The evaluator's output, or an empty list for a skipped batch.
        """
        try:
            return engine._iteration(engine, batch)
        except Exception as error:
            for path in self._batch_paths(batch):
                self.add(path, error_reason(error))
            return []

    def _batch_paths(self, batch: Any) -> list[str]:
        image = batch.get(self.key) if isinstance(batch, Mapping) else None
        names = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
        if names is None:
            return ["<unnamed batch>"]
        return [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)]

    def raise_if_any(self, workflow: str = "the run") -> None:
        """Raises one error listing every skipped file, so the run exits non-zero; does nothing when none was.

        Args:
            workflow: what ran, for the message.

        Raises:
            UnreadableFilesError: some files were skipped.
        """
        if self.skipped:
            of_total = f" of {self.total}" if self.total >= len(self.skipped) else ""
            raise _unreadable(
                f"{workflow} skipped {len(self.skipped)}{of_total} files (the others were processed)", self.skipped
            )
