"""Sharded training: data parallelism, FSDP and tensor parallelism on one
mesh of axes ("data", "fsdp", "tensor"), all through `jax.sharding`.

The model names the axes of its parameters and activations logically
("embed", "heads", "mlp", "vocab", "batch", ...; `models/gpt.py`); the
config's rules map each name to mesh axes, as in MaxText and Flax's
partitioning helpers. With the default rules:

- a batch is split over "data" and "fsdp" (every device of a data-by-fsdp
  group takes its own examples);
- FSDP (ZeRO-3): every parameter is split along its "embed" dimension over
  "fsdp", and so are its gradients and optimizer state (each optimizer leaf
  shaped like the parameters takes their sharding); the compiler gathers a
  layer's weights where they are used and reduce-scatters the gradients;
- tensor parallelism (Megatron): attention heads and the MLP's hidden units
  are split over "tensor", so each device computes its heads and its slice
  of the MLP, with one all-reduce after each block's second matmul.

The state is created sharded (never whole on one device), checkpointed
sharded (each process writes its shards) and restored onto any mesh shape.
"""
import dataclasses
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from research import errors
from research import mesh as mesh_lib
from research.core import config_lib
from research.parallel import sync

AXES = ("data", "fsdp", "tensor")
# logical name -> mesh axes (None: not split). "act_*" name activations,
# which stay whole along the model's width where the weights are split.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")), ("length", None),
    ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
    ("mlp", "tensor"), ("kv", None),
    ("act_embed", None), ("act_heads", "tensor"), ("act_mlp", "tensor"),
    ("act_vocab", "tensor"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sharded(sync.Sync):
    """The `Scheme` of a (data, fsdp, tensor) mesh with logical-axis rules.
    Its step, checkpoint items and communication count are synchronous
    training's (`sync.Sync`): only the layout differs."""
    data: int
    fsdp: int
    tensor: int
    rules: tuple[tuple[str, Any], ...]

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Sharded":
        options = config.sharding
        return cls(data=options.data, fsdp=options.fsdp, tensor=options.tensor,
                   rules=tuple((name, tuple(axes) if isinstance(axes, (list, tuple))
                                else axes) for name, axes in options.rules),
                   grad_accum_steps=config.grad_accum_steps)

    def create_mesh(self, num_devices):
        n = num_devices or jax.device_count()
        mesh_lib.create_mesh(n)  # checks the device count
        data = self.data or n // (self.fsdp * self.tensor)
        if data * self.fsdp * self.tensor != n:
            raise errors.UserError(
                f"config.sharding data={self.data or 'auto'} x fsdp={self.fsdp} x "
                f"tensor={self.tensor} does not make the {n} devices; pick sizes "
                f"whose product is {n} (data=0 fills what fsdp x tensor leave).")
        return jax.make_mesh((data, self.fsdp, self.tensor), AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3,
                             devices=jax.devices()[:n])

    def state_shardings(self, state, param_specs, mesh):
        """The parameters' shardings from their logical names; every subtree
        of the state shaped like the parameters (gradients' optimizer
        moments, an EMA) takes them too; the rest is replicated."""
        params = nn.logical_to_mesh_sharding(param_specs, mesh, self.rules)
        treedef = jax.tree.structure(state.params)
        replicated = mesh_lib.replicated(mesh)

        def like_params(subtree):
            return params if jax.tree.structure(subtree) == treedef else replicated
        return jax.tree.map(like_params, state,
                            is_leaf=lambda x: jax.tree.structure(x) == treedef)

    def shardings(self, state, mesh):
        del mesh
        return jax.tree.map(lambda x: x.sharding, state)

    def trace(self, fn):
        """`fn` traced under the rules, so the model's activation names
        constrain the layout."""
        rules = self.rules

        def traced_with_rules(*args, **kwargs):
            with nn.logical_axis_rules(rules):
                return fn(*args, **kwargs)
        return traced_with_rules


def _check(config: ml_collections.ConfigDict) -> None:
    options = config.sharding
    if options.data < 0 or options.fsdp < 1 or options.tensor < 1:
        raise errors.UserError("config.sharding needs data >= 0 (0: the rest), "
                               "fsdp >= 1 and tensor >= 1.")
    for rule in options.rules:
        axes = rule[1] if len(rule) == 2 else None
        names = axes if isinstance(axes, (list, tuple)) else (axes,)
        if len(rule) != 2 or any(a is not None and a not in AXES for a in names):
            raise errors.UserError(
                f"config.sharding.rules has {tuple(rule)!r}; each rule is (logical "
                f"name, mesh axis or axes or None) with axes from {AXES}.")


# The mesh of `data_parallel.scheme="sharded"` and how logical names map to it.
# The layout does not change what is trained: it may change on resume (the
# checkpoint restores onto any mesh shape).
SECTION = config_lib.Section("sharding", {"sharding": {
    "data": 0,                    # data-parallel groups; 0: devices / (fsdp x tensor)
    "fsdp": 1,                    # devices sharing one copy of the state (ZeRO-3)
    "tensor": 1,                  # devices splitting heads and the MLP (Megatron)
    "rules": DEFAULT_RULES,       # (logical name, mesh axes) for the model's names
}}, check=_check, free=("sharding.",))
