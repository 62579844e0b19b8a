"""What a compiled program needs of one device's memory, and a limit on it.

XLA's memory analysis of the compiled program (per device) gives its
arguments, outputs, the outputs that reuse (alias) donated arguments, and
its temporaries; their sum is what the device must hold while the program
runs. `config.device_memory_mib` imposes an accelerator's memory on any
backend: on a CPU, whose simulated devices share the host's memory and never
run out, a train step that would not fit is refused before it runs, with the
numbers and what to change.
"""
from typing import Any

from research import errors

MIB = 2 ** 20


def needed_bytes(memory: Any) -> int | None:
    """Arguments + outputs not aliased to arguments + temporaries, per
    device, from a compiled program's `memory_analysis()` (None where the
    backend gives none)."""
    if memory is None:
        return None
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def check_fits(compiled: Any, limit_mib: float, what: str) -> None:
    """Raises a UserError when `compiled` needs more than `limit_mib` MiB of
    one device's memory (0: no limit)."""
    if not limit_mib:
        return
    memory = compiled.memory_analysis()
    needed = needed_bytes(memory)
    if needed is None:
        raise errors.UserError(
            f"config.device_memory_mib={limit_mib} needs XLA's memory analysis, "
            "which this backend does not give; set it to 0.")
    if needed > limit_mib * MIB:
        outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
        raise errors.UserError(
            f"The {what} needs {needed / MIB:.1f} MiB per device (XLA's memory "
            f"analysis: arguments {memory.argument_size_in_bytes / MIB:.1f}, "
            f"temporaries {memory.temp_size_in_bytes / MIB:.1f}, outputs not "
            f"donated {outputs / MIB:.1f}), over config.device_memory_mib="
            f"{limit_mib}. Shard the state (--config.data_parallel.scheme=sharded "
            "--config.sharding.fsdp=N), rematerialise (model_kwargs.remat), lower "
            "batch_size or raise grad_accum_steps.")
