"""Orbax checkpoints of the train state and the input pipeline's position.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or
kill mid-save leaves the previous step as the latest readable checkpoint (tmp directories are
ignored and cleaned up when the next writer opens the directory).

Only the run that trains into a directory opens it for writing. Anything that only reads it
(evaluation, a notebook, a resume check) opens it with `read_only=True`: a writer deletes every
tmp directory in the background as it opens, including the one a live run is saving into, and two
writers on one directory race each other's clean-up.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class _DropReadOnlyNotice(logging.Filter):
    """Orbax warns "Given directory is read only" each time a reader opens; that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


class Checkpointer:
    """Saves {"state": train state pytree, "data": iterator state, "meta": json} every N steps.

    Use it as a context manager, or call `close()`, so that pending saves finish.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.read_only = read_only
        if read_only:  # touches nothing on disk: no directory created, no tmp clean-up
            options = ocp.CheckpointManagerOptions(
                read_only=True,
                create=False,
                cleanup_tmp_directories=False,
                save_interval_steps=0,
                enable_async_checkpointing=False,
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
            )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        if self.read_only:
            raise PermissionError(f"checkpoint directory {self.directory} was opened read-only")
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores step `step` onto the shapes, dtypes and shardings of `abstract_state`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
