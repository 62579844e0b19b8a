"""Sampling speed: the time to decode one new token against how much of the
context is already filled, with the key-value cache and without it.

python -m research.bench_sample --config=configs/shakespeare_gpt.py:cpu
python -m research.bench_sample --config=configs/shakespeare_gpt.py:cpu \
    --workdir=runs/gpt --positions=1,32,64,127

With the cache, a token at position p is one position's compute plus
attention over the cache (`models/gpt.py` attends over the whole fixed-length
cache, masked, so the time should not grow with p); without it, decoding
re-reads the whole sequence so far: a forward pass over p + 1 positions.
Both are timed as single jitted calls at exactly position p (the cache
filled to p once, the call repeated on it), median of `--repeats` timings of
`--steps` calls. Random weights unless `--workdir` (the speed does not
depend on them). Writes the table as JSON and Markdown with the machine and
commit (`--output`).
"""
from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from flax import linen as nn

from research import assembly
from research import cli
from research import errors
from research import mesh as mesh_lib
from research import provenance
from research import sample

# --config, --workdir (a trained run to take the weights from): research.main's
# flags (one parser, one-line errors, exit status 2).
flags.DEFINE_list("positions", ["1", "16", "32", "64", "96", "127"],
                  "Context positions to time (each below the model's context).")
flags.DEFINE_integer("batch", 1, "Sequences decoded together.", lower_bound=1)
flags.DEFINE_integer("steps", 20, "Calls per timing.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timings per number (the median is kept).",
                     lower_bound=1)
flags.DEFINE_string("output", "bench_sample.json", "Where the JSON goes.")
FLAGS = flags.FLAGS


def _model_and_variables(config):
    mesh = mesh_lib.create_mesh(1)
    if FLAGS.workdir:
        restored = assembly.restore_variables(config, FLAGS.workdir, None, mesh)
        return restored.model, restored.variables
    exp = assembly.build(config, mesh=mesh, info={})
    tokens = jnp.zeros((1, 1), jnp.int32)
    return exp.model, nn.meta.unbox(exp.model.init(jax.random.key(0), tokens))


def main(argv):
    del argv
    config = FLAGS.config
    model, variables = _model_and_variables(config)
    if not hasattr(model, "init_cache"):
        raise errors.UserError(
            f"config.model={config.model!r} has no key-value cache; "
            "research.bench_sample times a Transformer (configs/shakespeare_gpt.py).")
    positions = [int(p) for p in FLAGS.positions]
    if any(not 1 <= p < model.context for p in positions):
        raise errors.UserError(
            f"--positions={','.join(FLAGS.positions)}: each must be 1 to "
            f"{model.context - 1} (the model's context is {model.context}).")
    rows = sample.time_positions(model, variables, positions, FLAGS.batch,
                                 steps=FLAGS.steps, repeats=FLAGS.repeats)
    lines = [f"ms per new token, batch {FLAGS.batch} ({jax.devices()[0].platform}):",
             "", "| position | cached | uncached | uncached / cached |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {row['position']} | {row['cached_ms']:.3f} | "
              f"{row['uncached_ms']:.3f} | {row['uncached_ms'] / row['cached_ms']:.2f} |"
              for row in rows]
    print("\n".join(lines))
    provenance.write(FLAGS.output, provenance.about(), {"rows": rows}, lines)
    logging.info("Wrote %s", FLAGS.output)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(lambda argv: cli.guarded(main, argv), flags_parser=cli.parse_flags)
