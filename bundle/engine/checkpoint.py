"""Checkpoints: atomic savers that keep the best score across resumes, a loader that resumes the engine, and
the discovery and pruning of numbered checkpoints."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from bundle.engine.io import atomic_write_bytes, atomic_write_json, remove_temporaries
from bundle.engine.weights import WeightsFileError, read_weights_file

logger = logging.getLogger(__name__)


def numbered_checkpoints(directory: str | os.PathLike, prefix: str = "checkpoint") -> list[tuple[int, str]]:
    """``(N, path)`` of every ``<prefix>_epoch=N.pt`` or ``<prefix>_iteration=N.pt`` in ``directory``, by ``N``."""
    pattern = re.compile(rf"{re.escape(prefix)}_(?:epoch|iteration)=(\d+)\.pt$")
    found = []
    if Path(directory).is_dir():
        for name in os.listdir(directory):
            match = pattern.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the newest ``<prefix>_epoch=N.pt`` or ``<prefix>_iteration=N.pt`` in ``directory``, or ``""``.

    The empty string lets a config write ``"_disabled_": "$not @resume_path"`` for a fresh start.
    """
    found = numbered_checkpoints(directory, prefix)
    return found[-1][1] if found else ""


def resume_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the newest numbered checkpoint in ``directory`` that loads, or ``""`` when there is none.

    A checkpoint that cannot be read (truncated, emptied by a full disk) is skipped with a warning that names it,
    and the next older one is tried.

    Args:
        directory: the checkpoint folder.
        prefix: the checkpoints' file name prefix.

    Returns:
        The path to resume from, or ``""`` for a fresh start.

    Raises:
        WeightsFileError: checkpoints exist but none loads; names each file and its problem.
    """
    found = numbered_checkpoints(directory, prefix)
    problems = []
    for _, path in reversed(found):
        try:
            read_weights_file(path)
        except WeightsFileError as error:
            problems.append(str(error))
            logger.warning(f"cannot resume from {error} Trying an older checkpoint.")
            continue
        if problems:
            logger.warning(f"Resuming from '{path}', the newest checkpoint that loads.")
        return path
    if problems:
        raise WeightsFileError(
            f"no checkpoint in '{directory}' loads: {' '.join(problems)} Delete them or set --resume False to start "
            "afresh."
        )
    return ""


def prune_checkpoints(directory: str | os.PathLike, keep: int, prefix: str = "checkpoint") -> list[str]:
    """Deletes all but the ``keep`` newest numbered checkpoints; returns the deleted paths.

    Ignite's ``n_saved`` only knows the files its own process wrote, so a resumed run would otherwise keep
    every earlier run's last checkpoint forever.
    """
    found = numbered_checkpoints(directory, prefix)
    doomed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in doomed:
        Path(path).unlink(missing_ok=True)
    return doomed


class _AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` writing through :func:`~bundle.engine.io.atomic_write_bytes`, with MONAI's
    fixed-filename option, that deletes a replaced checkpoint only once its successor is on disk.

    MONAI's ``CheckpointSaver`` turns atomic saving off (a kill during ``torch.save`` then leaves a truncated
    ``model.pt``), and Ignite's own atomic mode leaves its temporary file behind when closing or renaming it fails
    (a full disk). Here the checkpoint is serialised in memory, then written, synced and renamed, and a failed write
    removes its temporary file. Files get ordinary permissions.

    Ignite's ``Checkpoint`` removes the oldest file it keeps *before* writing the new one; with ``n_saved=1`` a kill
    or a full disk in between leaves no checkpoint at all, and a resume starts over. Removals are therefore
    deferred until the next save has succeeded.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self._replaced: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        written = self.filename or filename
        super().__call__(checkpoint, written, metadata)
        for name in self._replaced:
            if name != written:
                self._unlink(name)
        self._replaced.clear()

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        buffer = io.BytesIO()
        func(checkpoint, buffer, **self.kwargs)
        atomic_write_bytes(path, buffer.getvalue())

    def remove(self, filename: str) -> None:
        self._replaced.append(self.filename or filename)

    def _unlink(self, filename: str) -> None:
        if idist.get_rank() == self.save_on_rank:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose every file is written atomically, and whose best key-metric score
    survives a restart.

    Ignite's ``Checkpoint`` only remembers the scores of the process that saved them, so after a resume the first
    validation, however poor, would replace the best model. The best ``(priority, filename)`` of the key-metric
    checkpoint's ``state_dict()`` is kept beside the file (``.<key_metric_filename>.best.json``) and given back to
    it with ``load_state_dict()`` when ``resume_best`` is true (a resumed run). Temporary files that a killed run
    left in ``save_dir`` are deleted at construction.

    Args:
        resume_best: reload the best score saved beside the key-metric file.
        args, kwargs: those of ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, *args, resume_best: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if idist.get_rank() == 0:  # left by a killed run; the run lock keeps other runs out of this folder
            remove_temporaries(self.save_dir)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, checkpoint.save_handler.filename)
        self._best_path = None
        if self._key_metric_checkpoint is not None:
            name = self._key_metric_checkpoint.save_handler.filename or "key_metric"
            self._best_path = os.path.join(self.save_dir, f".{name}.best.json")
            if resume_best and os.path.isfile(self._best_path) and os.path.isfile(os.path.join(self.save_dir, name)):
                with open(self._best_path) as f:
                    best = json.load(f)
                self._key_metric_checkpoint.load_state_dict({"_saved": [(best["priority"], best["filename"])]})

    def metrics_completed(self, engine: Engine) -> None:
        super().metrics_completed(engine)
        if self._key_metric_checkpoint is None or idist.get_rank() != 0:  # ignite saves on rank 0 only
            return
        saved = self._key_metric_checkpoint.state_dict()["_saved"]  # (priority, filename) pairs, best last
        if saved:
            priority, filename = saved[-1]
            atomic_write_json(self._best_path, {"priority": float(priority), "filename": filename})


class EngineCheckpointSaver(AtomicCheckpointSaver):
    """Atomic ``CheckpointSaver`` that also saves the engine it is attached to (epoch, iteration) under ``engine_key``.

    A config cannot list ``"trainer": "@train::trainer"`` in a handler of that same trainer (a circular
    reference); the engine is known at ``attach``, so it is added there. Older numbered checkpoints beyond
    ``n_saved`` are deleted even when an earlier (killed or finished) run wrote them.
    Other arguments: ``CheckpointSaver``.
    """

    def __init__(self, *args, engine_key: str = "trainer", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        # Ignite's Checkpoint keeps a reference to this dict, so the engine is saved from now on.
        self.save_dict[self.engine_key] = engine
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        checkpoint = self._interval_checkpoint
        if checkpoint.n_saved and idist.get_rank() == 0:  # ignite saves on rank 0 only
            prefix = f"{checkpoint.filename_prefix}_checkpoint" if checkpoint.filename_prefix else "checkpoint"
            prune_checkpoints(self.save_dir, keep=checkpoint.n_saved, prefix=prefix)


class NamedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose errors name the file and say what is wrong with it.

    A truncated file otherwise fails with a bare ``RuntimeError`` from the zip reader, and random bytes with an
    ``UnpicklingError`` that advises an unsafe load. Arguments: those of ``CheckpointLoader``.
    """

    def __call__(self, engine: Engine) -> None:
        """Loads like ``CheckpointLoader``; an unreadable file raises a ``WeightsFileError`` (or
        ``FileNotFoundError``) naming it, and weights that do not fit raise a ``RuntimeError`` naming it."""
        try:
            super().__call__(engine)
        except Exception as error:
            read_weights_file(self.load_path)  # raises the file's problem when it cannot be read
            raise RuntimeError(f"checkpoint '{self.load_path}' does not fit what it is loaded into: {error}") from error


def _optimizers(load_dict: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    return [obj for obj in load_dict.values() if isinstance(obj, torch.optim.Optimizer)]


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _differences(saved: list[dict[str, Any]], configured: list[dict[str, Any]]) -> list[str]:
    changes = []
    for index, (old, new) in enumerate(zip(saved, configured)):
        group = f" (group {index})" if len(configured) > 1 else ""
        for key in sorted(new):
            if key in old and old[key] != new[key]:
                changes.append(f"optimizer {key}{group} {old[key]} -> {new[key]}")
    return changes


class EngineCheckpointLoader(NamedCheckpointLoader):
    """Resumes training: loads a checkpoint into the network, the optimizer and the engine it is attached to
    (saved under ``engine_key``), then runs on with the configured settings.

    ``torch.optim.Optimizer.load_state_dict`` brings back the checkpoint's hyper-parameters (learning rate,
    weight decay...), and Ignite the checkpoint's iterations per epoch: a changed ``--learning_rate`` or
    ``--batch_size`` would otherwise be ignored without a word. Here the configured optimizer hyper-parameters
    are put back after loading (the optimizer's moments stay), and when the number of iterations per epoch
    changed (batch size or data), training continues after the last completed epoch with the new epoch length;
    the iteration counter is re-based to ``completed epochs x new epoch length``. Each setting that differs from
    the checkpoint is logged. Other arguments: ``CheckpointLoader``; a missing ``load_path`` is an error, so
    disable the loader for a fresh start.

    Args:
        engine_key: the checkpoint entry of the engine's state.
        optional: entries of ``load_dict`` that a checkpoint written by an older version may lack; they are then
            left as they are, and the log says so.
    """

    def __init__(self, *args, engine_key: str = "trainer", optional: Sequence[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key
        self.optional = tuple(optional)
        self.changes: list[str] = []

    def attach(self, engine: Engine) -> None:
        self.load_dict[self.engine_key] = engine
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        """Loads the checkpoint, then restores the configured optimizer settings and epoch length."""
        optimizers = _optimizers(self.load_dict)
        configured = [_hyperparameters(optimizer) for optimizer in optimizers]
        epoch_length = engine.state.epoch_length
        absent = self._absent_optional_entries()
        kept = {key: self.load_dict.pop(key) for key in absent}
        try:
            super().__call__(engine)
        finally:
            self.load_dict.update(kept)
        self.changes = []
        for optimizer, settings in zip(optimizers, configured):
            self.changes += _differences(_hyperparameters(optimizer), settings)
            for group, values in zip(optimizer.param_groups, settings):
                group.update(values)
        if epoch_length and engine.state.epoch_length != epoch_length:
            self.changes.append(self._rebase(engine, epoch_length))
        if self.changes:
            self.logger.warning(
                f"Resuming from '{self.load_path}' with the configured settings, which differ from the checkpoint's: "
                + "; ".join(self.changes)
                + "."
            )

    def _absent_optional_entries(self) -> list[str]:
        """The optional entries that the checkpoint lacks (each logged)."""
        if not self.optional:
            return []
        saved = read_weights_file(self.load_path, map_location="cpu")
        absent = [key for key in self.optional if key in self.load_dict and key not in saved]
        for key in absent:
            self.logger.info(f"'{self.load_path}' has no '{key}' (an older version wrote it): it starts afresh.")
        return absent

    @staticmethod
    def _rebase(engine: Engine, epoch_length: int) -> str:
        saved_length = engine.state.epoch_length
        completed = engine.state.iteration // saved_length
        partial = engine.state.iteration % saved_length
        engine.state.epoch, engine.state.iteration = completed, completed * epoch_length
        engine.state.epoch_length = epoch_length
        restart = f", epoch {completed + 1} restarts" if partial else ""
        return (
            f"iterations per epoch {saved_length} -> {epoch_length} (batch size or data changed): continuing after "
            f"epoch {completed} at iteration {engine.state.iteration}{restart}"
        )
