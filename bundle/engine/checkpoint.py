"""Checkpoints: atomic savers that keep the best score across resumes, a loader that resumes the engine, and
the discovery and pruning of numbered checkpoints."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from bundle.engine.io import atomic_write_json


def _numbered_checkpoints(directory: str | os.PathLike, prefix: str) -> list[tuple[int, str]]:
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
    found = _numbered_checkpoints(directory, prefix)
    return found[-1][1] if found else ""


def prune_checkpoints(directory: str | os.PathLike, keep: int, prefix: str = "checkpoint") -> list[str]:
    """Deletes all but the ``keep`` newest numbered checkpoints; returns the deleted paths.

    Ignite's ``n_saved`` only knows the files its own process wrote, so a resumed run would otherwise keep
    every earlier run's last checkpoint forever.
    """
    found = _numbered_checkpoints(directory, prefix)
    doomed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in doomed:
        Path(path).unlink(missing_ok=True)
    return doomed


class _AtomicDiskSaver(DiskSaver):
    """Ignite's atomic DiskSaver (temporary file, then rename) with MONAI's fixed-filename option.

    MONAI's ``CheckpointSaver`` turns atomic saving off because the temporary file is created user-only
    (0600); a kill during ``torch.save`` then leaves a truncated ``model.pt``. This keeps the rename and
    restores ordinary permissions afterwards.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        if idist.get_rank() != self.save_on_rank:  # ignite saved nothing on this rank
            return
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(self.dirname, filename), 0o666 & ~umask)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose every file is written atomically, and whose best key-metric score
    survives a restart.

    Ignite's ``Checkpoint`` only remembers the scores of the process that saved them, so after a resume the first
    validation, however poor, would replace the best model. The best ``(priority, filename)`` of the key-metric
    checkpoint's ``state_dict()`` is kept beside the file (``.<key_metric_filename>.best.json``) and given back to
    it with ``load_state_dict()`` when ``resume_best`` is true (a resumed run).

    Args:
        resume_best: reload the best score saved beside the key-metric file.
        args, kwargs: those of ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, *args, resume_best: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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


class EngineCheckpointLoader(CheckpointLoader):
    """``CheckpointLoader`` that also restores the engine it is attached to from ``engine_key``, to resume.

    Other arguments: ``CheckpointLoader``; a missing ``load_path`` is an error, so disable it for a fresh start.
    """

    def __init__(self, *args, engine_key: str = "trainer", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        self.load_dict[self.engine_key] = engine
        super().attach(engine)
