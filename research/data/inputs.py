"""The two input paths, behind the interface of `core/inputs.py`.

"memory" places a split whole on the devices (`sharded_data.py`) and draws
each step's batch there from the epoch's order; "stream" reads each step's
rows from converted files on the host (`streaming.py`) and places them a
chunk at a time. Both give a step the same rows and example numbers
(`index`), so the parameters are bitwise equal. `config.input` picks one per
split (`streaming.choose`: "auto" streams what would not fit in memory).
"""
import math
from typing import Any, Callable

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.data import input_pipeline
from research.data import sharded_data
from research.data import streaming
from research import mesh as mesh_lib

Batch = dict[str, jax.Array]
PyTree = Any
INDEX = {"index": ((), np.dtype(np.int32))}  # the examples' numbers in a step


def next_batch(inputs: PyTree, step: jax.Array, batch_size: int, pipeline: Any,
               mesh: jax.sharding.Mesh) -> Batch:
    """Step `step`'s batch: examples `order[k * batch_size:(k + 1) *
    batch_size]`, with `k = step % (len(order) // batch_size)`, gathered from
    the rows on device and preprocessed; `index` holds their example numbers."""
    order = inputs["order"]
    offset = (step % (order.shape[0] // batch_size)) * batch_size
    examples = lax.dynamic_slice_in_dim(order, offset, batch_size)
    rows = jnp.take(inputs["row_of"], examples)
    batch = sharded_data.gather_rows(inputs["rows"], rows, mesh)
    batch = pipeline.preprocess_fn(batch)
    return pipeline.constrain({**batch, "index": examples})


class MemoryTrain:
    """A training split placed whole on the devices; the batches are drawn
    there, so a chunk's inputs are the rows and the epoch's order."""

    def __init__(self, rows: input_pipeline.Shard, batch_size: int,
                 mesh: jax.sharding.Mesh):
        self.num_examples = sum(rows.counts)
        self.batch_size, self.mesh = batch_size, mesh
        self.steps_per_epoch = self.num_examples // batch_size
        placed, row_of = sharded_data.place_rows(rows, mesh)
        self.data = {"rows": placed, "row_of": row_of}
        self.order = self.order_epoch = self.order_fn = None

    @classmethod
    def open(cls, exp, split: str) -> "MemoryTrain":
        del split  # the dataset spec reads config.train_split
        return cls(exp.dataset.train_rows(exp.config, exp.info),
                   exp.config.batch_size, exp.mesh)

    def first_examples(self, n: int, fn: Callable[[Batch], PyTree]) -> PyTree:
        """`fn` of the first n examples' rows (models that initialise from data)."""
        return jax.jit(lambda d: fn(sharded_data.gather_rows(
            d["rows"], d["row_of"][:n], self.mesh)))(self.data)

    def spec(self, num_steps: int) -> PyTree:
        del num_steps  # the rows serve any chunk
        return {**self.data, "order": jax.ShapeDtypeStruct(
            (self.num_examples,), np.dtype(np.int32),
            sharding=mesh_lib.replicated(self.mesh))}

    def start(self, data_key: jax.Array, step: int, stop: int,
              chunk_size: Callable[[int], int]) -> None:
        del stop, chunk_size  # the order is all it prepares
        # An epoch's order of example numbers: a permutation drawn from the
        # seed and the epoch, the same for any device or process count.
        # Drawn outside the mesh context: one trace.
        num_examples = self.num_examples
        self.order_fn = jax.jit(
            lambda key, epoch: jax.random.permutation(
                jax.random.fold_in(key, epoch), num_examples),
            out_shardings=mesh_lib.replicated(self.mesh))
        self.data_key = data_key
        self.order_epoch = step // self.steps_per_epoch
        self.order = self.order_fn(data_key, self.order_epoch)

    def inputs(self, step: int, num_steps: int) -> PyTree:
        del num_steps
        epoch = step // self.steps_per_epoch
        if epoch != self.order_epoch:
            self.order, self.order_epoch = self.order_fn(self.data_key, epoch), epoch
        return {**self.data, "order": self.order}

    def batch(self, inputs: PyTree, i: int, step: jax.Array, pipeline: Any) -> Batch:
        del i  # the step number picks the batch
        return next_batch(inputs, step, self.batch_size, pipeline, self.mesh)

    def report_epoch(self, epoch: int) -> None:
        del epoch

    def close(self) -> None:
        pass


class StreamTrain:
    """A training split read from converted files a step at a time; a
    chunk's inputs are its batches, [steps, batch, ...] over the data axis."""

    def __init__(self, source, batch_size: int, mesh: jax.sharding.Mesh,
                 options: ml_collections.ConfigDict):
        self.source, self.batch_size, self.mesh = source, batch_size, mesh
        self.options = options
        self.num_examples = source.num_examples
        self.steps_per_epoch = self.num_examples // batch_size
        self.stream = None
        logging.info("Training streams %s: %d examples; process %d reads rows "
                     "[%d, %d) of every batch.", source.description,
                     self.num_examples, jax.process_index(),
                     *streaming.process_rows(mesh, batch_size))

    @classmethod
    def open(cls, exp, split: str) -> "StreamTrain":
        config = exp.config
        return cls(streaming.open_source(config, exp.dataset, split),
                   config.batch_size, exp.mesh, config.stream)

    def first_examples(self, n: int, fn: Callable[[Batch], PyTree]) -> PyTree:
        """As in memory: the first n examples placed as rows, then gathered."""
        n = min(n, self.num_examples)
        bounds = input_pipeline.even_bounds(n, jax.process_count())
        mine = np.arange(bounds[jax.process_index()], bounds[jax.process_index() + 1])
        rows, row_of = sharded_data.place_rows(input_pipeline.Shard(
            self.source.read(mine), tuple(int(c) for c in np.diff(bounds))),
            self.mesh)
        return jax.jit(lambda d: fn(sharded_data.gather_rows(
            d["rows"], d["row_of"][:n], self.mesh)))({"rows": rows, "row_of": row_of})

    def spec(self, num_steps: int) -> PyTree:
        return streaming.batch_spec(self.source.features, self.batch_size,
                                    self.mesh, num_steps, extra=INDEX)

    def start(self, data_key: jax.Array, step: int, stop: int,
              chunk_size: Callable[[int], int]) -> None:
        # The chunks the loop will run are known ahead (its boundaries are),
        # so the stream assembles and places them ahead.
        self.stream = streaming.TrainStream(
            self.source, streaming.host_order_fn(data_key, self.num_examples,
                                                 self.mesh),
            batch_size=self.batch_size, steps_per_epoch=self.steps_per_epoch,
            mesh=self.mesh, start=step, stop=stop, options=self.options,
            chunk_size=chunk_size)

    def inputs(self, step: int, num_steps: int) -> PyTree:
        return self.stream.next(step, num_steps)

    def batch(self, inputs: PyTree, i: int, step: jax.Array, pipeline: Any) -> Batch:
        """Step i of the chunk's batches, preprocessed as in memory."""
        del step
        rows = {k: v[i] for k, v in inputs.items() if k != "index"}
        batch = pipeline.preprocess_fn(rows)
        return pipeline.constrain({**batch, "index": inputs["index"][i]})

    def report_epoch(self, epoch: float) -> None:
        """Logs what this process read in the epoch: its share only."""
        count = self.stream.epoch_count(math.ceil(epoch))
        logging.info("process %d of %d read %d records of %s for epoch %d "
                     "(example numbers sum to %d)", jax.process_index(),
                     jax.process_count(), count.reads, self.source.description,
                     math.ceil(epoch), count.index_sum)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class MemoryEval:
    """An evaluation split placed whole on the devices, scored in one call."""

    def __init__(self, exp, split: str):
        del split  # the dataset spec reads config.eval_split
        self.exp = exp
        self.data = sharded_data.place_eval(
            exp.dataset.eval_rows(exp.config, exp.info), exp.config.eval_batch_size,
            exp.mesh)

    def compile(self, variables: PyTree, aux: PyTree, final: bool):
        compiled = self.exp.eval_fn(final).lower(variables, self.data, aux).compile()
        return lambda variables, aux: compiled(variables, self.data, aux)


class StreamEval:
    """An evaluation split streamed a batch at a time, each process reading
    its rows of every batch; the metrics are merged on the devices."""

    def __init__(self, exp, split: str):
        self.exp, self.data = exp, None
        self.source = streaming.open_source(exp.config, exp.dataset, split)
        logging.info("Evaluation streams %s: %d examples.",
                     self.source.description, self.source.num_examples)

    def compile(self, variables: PyTree, aux: PyTree, final: bool):
        exp, config = self.exp, self.exp.config
        batch = streaming.batch_spec(
            self.source.features, config.eval_batch_size, exp.mesh,
            extra={"mask": ((), np.dtype(bool))})
        compiled = exp.eval_batch_fn(final).lower(
            variables, exp.empty_metrics(), batch, aux).compile()

        def evaluate(variables, aux):
            totals = exp.empty_metrics()
            for batch in streaming.eval_batches(self.source, config.eval_batch_size,
                                                exp.mesh, config.stream):
                totals = compiled(variables, totals, batch, aux)
            reads, index_sum = self.source.counter.take()
            logging.info("process %d of %d read %d records of %s for evaluation "
                         "(example numbers sum to %d)", jax.process_index(),
                         jax.process_count(), reads, self.source.description,
                         index_sum)
            return totals
        return evaluate


def placed_eval_split(exp) -> PyTree:
    """The evaluation split placed on the devices, in `exp.eval_fn`'s layout
    (`[batches, batch, ...]` with a padding `mask`), whatever `config.input`."""
    return MemoryEval(exp, exp.config.eval_split).data
