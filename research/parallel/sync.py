"""Synchronous data parallelism: every device holds the whole state, takes
its slice of every batch, and the gradients are all-reduced every step (the
compiler inserts the all-reduce: the batch is split over the `data` axis
and the state replicated)."""
import dataclasses

import ml_collections

from research.core import schemes
from research.core import state as state_lib
from research import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Sync:
    """The state replicated; `grad_accum_steps` micro-batches per step."""
    grad_accum_steps: int = 1

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Sync":
        return cls(config.grad_accum_steps)

    def create_mesh(self, num_devices):
        return mesh_lib.create_mesh(num_devices)

    def state_shardings(self, state, param_specs, mesh):
        del state, param_specs
        return mesh_lib.replicated(mesh)

    def distribute(self, state, total_steps, mesh):
        del total_steps, mesh
        return state  # created replicated

    def shardings(self, state, mesh):
        del state
        return mesh_lib.replicated(mesh)

    def train_step(self, state, batch, rng, aux, *, inner_step, mesh, constrain):
        del mesh
        return inner_step(state, batch, rng, aux,
                          grad_accum_steps=self.grad_accum_steps, constrain=constrain)

    def trace(self, fn):
        return fn

    def train_state(self, state):
        return state

    def checkpoint_items(self, state, loop):
        return state_lib.checkpoint_items(state, loop)

    def restore_items(self, state, items):
        return state_lib.restore_items(state, items)

    def communication(self, state, step, devices, final_step):
        """A gradient all-reduce every step, over several devices (the
        payload per participant, before the algorithm's own factor)."""
        del final_step
        syncs = step if devices > 1 else 0
        per_sync = schemes.parameter_bytes(state.params)
        return {"comm/syncs": float(syncs),
                "comm/bytes_per_step": per_sync * syncs / max(step, 1)}
