"""Orbax checkpoints of the train state together with the data-iterator state.

A checkpoint is one orbax step directory holding two items: `state` (the sharded
TrainState, restored straight onto the current mesh, whatever mesh saved it) and
`data` (the grain iterator state as JSON), so a resumed run sees exactly the
examples it would have seen. Orbax writes into a temporary directory and renames it
on commit, so a half-written checkpoint is never listed as a step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.errors import UserError


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with jaxllm's two items."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create checkpoint directory '{self.directory}' ({e.strerror}); "
                "choose a writable --workdir"
            ) from e
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
        """Starts a (possibly asynchronous) save; returns whether one was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores `step` (default: latest) onto the shardings inside `abstract_state`."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint found in '{self.directory}'; train a model first")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"] or {}), step

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores only the parameters (for eval, generate, init_from)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint found in '{self.directory}'; train a model first")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=jax.tree.map(
                        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                        {"params": abstract_params},
                    ),
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"], step

    def wait(self) -> None:
        """Blocks until any asynchronous save has committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
