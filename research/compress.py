"""Compression as config-driven stages, and one table of what each buys.

python -m research.compress --config=configs/pipelines/compress_cifar.py \
    --workdir=runs/compress

The config names a teacher and a student (each a config file plus
overrides) and the stages to run: train the teacher and the student alone,
distil the student from the teacher, prune either model to each sparsity
level (fine-tuning from its trained weights with the gradual schedule),
quantize to int8 after training (weights and activations calibrated on
training examples, `ptq`, or weights only, `ptq_weights`) or through
quantization-aware training, and prune-then-quantize. Every training stage is
an ordinary run in its own sub-workdir, so it resumes like any run and a
finished one is only evaluated (`runner.py`). The results go to
`<workdir>/compression_results.{json,md}`: the evaluation's accuracy (or,
for a language model, its loss), parameters, non-zeros counted in the saved
checkpoint, bytes of the exported weights, and evaluation examples/s here.
configs/pipelines/compress_gpt.py is the language model's.

Fair comparisons: each row names its `baseline`, the model that got the
same extra training without the compression (a pruned model: the same
fine-tune without pruning, level 0; a QAT model: the same fine-tune in
float; int8 after training: the model it quantizes; a distilled student:
the student alone with the same seed). Runs are scored on the config's
`eval_split` (a validation split carved from the training data, where any
setting is chosen) and, once, on `test_split`. With several `seeds`, the
students, the distilled students and the pruning levels of
`prune.seeded_levels` run with each (the teacher's fine-tunes from the one
teacher, with the seed's data order), and the table adds their mean ± std.
"""
import dataclasses
import os
import re
import statistics
import time
import zipfile
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.core import config_lib
from research import errors
from research import assembly
from research.core import experiment as experiment_lib
from research import cli
from research import mesh as mesh_lib
from research.core import steps
from research import runner
from research.core import writers
from research.data import inputs as data_inputs
from research.compression import distill
from research.compression import prune
from research.compression import quantize

RESULTS = "compression_results"
STAGES = ("teacher", "student", "distill", "prune", "ptq", "ptq_weights", "qat",
          "prune_ptq")


@dataclasses.dataclass
class Row:
    """One model of the table."""
    name: str
    model: str  # "teacher" or "student": the dense float model it comes from
    stage: str
    accuracy: float
    params: int
    nonzeros: int
    bytes: int
    bytes_zipped: int
    eval_images_per_s: float  # examples (images, or characters of text) a second
    workdir: str
    loss: float = float("nan")  # the evaluation's cross-entropy (nats)
    seed: int = 0
    baseline: str = ""  # the row with the same extra training, uncompressed
    test_accuracy: float = float("nan")  # on config.test_split, scored once
    test_loss: float = float("nan")


def check(config: ml_collections.ConfigDict) -> None:
    """Names, levels and files, before any compute; raises UserError."""
    for stage in config.stages:
        if stage not in STAGES:
            raise errors.UserError(f"Unknown stage {stage!r} in config.stages; "
                                   f"choose from {list(STAGES)}.")
    for level in (*config.prune.levels, *config.prune.teacher_levels):
        if not 0.0 <= level < 1.0:
            raise errors.UserError(f"config.prune.levels has {level}; sparsities "
                                   "must be in [0, 1).")
    for role in ("teacher", "student"):
        config_lib.load_config(config[role].config)  # exists, presets known
        options = config.fine_tune[role]
        if options.lr_scale <= 0 or options.epochs < 1 or options.prune_update_every < 1:
            raise errors.UserError(
                f"config.fine_tune.{role} needs lr_scale > 0, epochs >= 1 and "
                f"prune_update_every >= 1; got {options.to_dict()}.")
    if "distill" in config.stages:
        distill.check_options(config.distill.temperature, config.distill.alpha,
                              "config.distill.")
    for name in config.prune.models:
        if name not in ("teacher", "student"):
            raise errors.UserError(f"config.prune.models has {name!r}; choose from "
                                   "['student', 'teacher'].")


def _run_config(config: ml_collections.ConfigDict, role: str,
                extra: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The role's config file with its overrides, the shared data settings
    and `extra` (dotted keys)."""
    spec = config[role]
    overrides = dict(config_lib.dotted_items(spec.overrides.to_dict()))
    overrides.update({"data_dir": config.data_dir, **(extra or {})})
    if config.train_split:
        overrides["train_split"] = config.train_split
    if config.eval_split:
        overrides["eval_split"] = config.eval_split
    return config_lib.load_config(spec.config, overrides)


class Pipeline:
    """The stages of one compression config in `workdir`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 allow_config_change: bool = False):
        self.config = config
        self.table = runner.Runner(workdir, RESULTS, render, allow_config_change)

    @property
    def rows(self) -> list[Row]:
        return [Row(**r) for r in self.table.rows]

    def path(self, name: str) -> str:
        return self.table.path(name)

    def train(self, name: str, role: str, extra: dict[str, Any] | None = None
              ) -> ml_collections.ConfigDict:
        """Trains (or resumes, or only evaluates) one run; returns its config."""
        run_config = _run_config(self.config, role, extra)
        self.table.train(name, run_config)
        return run_config

    def float_row(self, name: str, model: str, stage: str,
                  config: ml_collections.ConfigDict, baseline: str = "",
                  seed: int = 0) -> Row:
        """Scores a trained run's checkpoint as it was saved (float32)."""
        restored, exp, data = self._restore(config, self.path(name))
        variables = restored.variables
        metrics, speed = _score(exp.model.apply, variables, exp, data)
        test = self._test(exp.model.apply, variables, config, restored)
        path = self.path(os.path.join("exports", f"{name}.npz"))
        flat = {"/".join(map(str, k)): np.asarray(v) for k, v in
                jax.tree_util.tree_flatten_with_path(variables)[0]}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, **flat)
        return self._row(name, model, stage, metrics, variables, path, speed,
                         test, baseline, seed)

    def int8_row(self, name: str, model: str, stage: str,
                 config: ml_collections.ConfigDict, source: str,
                 activations: bool = True, baseline: str = "", seed: int = 0) -> Row:
        """Post-training int8 of the run in `source` (weights and, with
        `activations`, the ops' inputs, calibrated on training examples),
        scored with the normal eval step."""
        xla = _with_xla_kernels(config)
        restored, exp, data = self._restore(xla, self.path(source))
        module_path = self.config.quant.get("module_path", ".*")
        quantize.check_traceable(exp.model, _calibration(exp, 1)[0][:1])
        quantized = quantize.post_training_quantize(
            exp.model, restored.variables,
            _calibration(exp, self.config.quant.calibration_batches),
            module_path=module_path, activations=activations)
        metrics, speed = _score(quantized.apply_fn, quantized.variables, exp, data)
        test = self._test(quantized.apply_fn, quantized.variables, xla, restored)
        path = self.path(os.path.join("exports", f"{name}.int8.safetensors"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        quantize.export_int8(quantized.variables, path, model={
            "model": xla.model, "model_kwargs": xla.model_kwargs.to_dict(),
            "module_path": module_path, "activations": activations})
        return self._row(name, model, stage, metrics, restored.variables, path,
                         speed, test, baseline or source, seed)

    def _restore(self, config, workdir):
        """The run's checkpoint, scored with its dataset's own objective (a
        distilled student without its teacher)."""
        config = _scored(config)
        mesh = mesh_lib.create_mesh(config.num_devices)
        restored = assembly.restore_variables(config, workdir, mesh=mesh)
        exp = assembly.build(config, mesh=mesh, info=restored.info or None)
        return restored, exp, data_inputs.placed_eval_split(exp)

    def _test(self, apply_fn, variables, config, restored) -> dict[str, float]:
        """The metrics on `config.test_split` (none without one)."""
        if not self.config.get("test_split"):
            return {}
        config = _scored(config)
        config.eval_split = self.config.test_split
        exp = assembly.build(config, mesh=mesh_lib.create_mesh(config.num_devices),
                             info=restored.info or None)
        return _score(apply_fn, variables, exp, data_inputs.placed_eval_split(exp),
                      timed=False)[0]

    def _row(self, name, model, stage, metrics, variables, path, speed, test,
             baseline, seed) -> Row:
        params = variables["params"]
        row = Row(name=name, model=model, stage=stage,
                  accuracy=metrics.get("accuracy", float("nan")),
                  loss=metrics["loss"], seed=seed, baseline=baseline,
                  test_accuracy=test.get("accuracy", float("nan")),
                  test_loss=test.get("loss", float("nan")),
                  params=sum(x.size for x in jax.tree.leaves(params)),
                  nonzeros=prune.count_nonzero(params), bytes=os.path.getsize(path),
                  bytes_zipped=_zipped_size(path), eval_images_per_s=speed,
                  workdir=name)
        logging.info("%s", row)
        self.table.add(dataclasses.asdict(row))
        return row


def _scored(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with its dataset's own objective (a distilled
    student is scored without its teacher)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.objective = ""
    config.objective_kwargs = ml_collections.ConfigDict()
    return config


def _with_xla_kernels(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every kernel option of its model set to XLA and float32
    compute: qwix sees only XLA's convolutions and matmuls (the parameters
    are the same)."""
    config = config.copy_and_resolve_references()
    for key, value in _kernels_off(config).items():
        config_lib.override(config, key, value)
    return config


def _calibration(exp: experiment_lib.Experiment, batches: int) -> list[jax.Array]:
    """Model inputs of the first `batches` x 256 training examples."""
    rows = exp.dataset.train_rows(exp.config, exp.info).rows
    out = []
    for i in range(batches):
        raw = {k: jnp.asarray(v[i * 256:(i + 1) * 256]) for k, v in rows.items()}
        if next(iter(raw.values())).shape[0]:
            out.append(exp.objective.model_input(exp.dataset.preprocess(raw)))
    return out


def _score(apply_fn: Callable[..., Any], variables: Any,
           exp: experiment_lib.Experiment, data: dict[str, jax.Array],
           timed: bool = True) -> tuple[dict[str, float], float]:
    """The metrics of the placed eval split with the normal eval step, and
    the evaluation's examples/s (the second of two timed passes; `timed`
    False: one pass, nan)."""
    fn = jax.jit(lambda v, d, aux: steps.evaluate_batches(
        apply_fn, v, d, aux, pipeline=exp.pipeline(train=False)))
    aux = exp.aux()
    with jax.set_mesh(exp.mesh):
        metrics = fn(variables, data, aux)
        jax.block_until_ready(metrics)
        if not timed:
            return {k: float(v) for k, v in metrics.compute().items()}, float("nan")
        start = time.perf_counter()
        metrics = jax.block_until_ready(fn(variables, data, aux))
    seconds = time.perf_counter() - start
    examples = int(np.asarray(data["mask"]).sum())
    return ({k: float(v) for k, v in metrics.compute().items()},
            examples / seconds)


def _zipped_size(path: str) -> int:
    with zipfile.ZipFile(path + ".zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(path, os.path.basename(path))
    size = os.path.getsize(path + ".zip")
    os.remove(path + ".zip")
    return size


def run(config: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False) -> list[Row]:
    """Runs the config's stages in order; writes and returns the table.
    `allow_config_change` lets every stage resume with a changed config."""
    check(config)
    p = Pipeline(config, workdir, allow_config_change)
    stages = set(config.stages)
    seeds = tuple(config.seeds)
    p.table.about["seeds"] = list(seeds)
    configs = {}
    if stages & {"teacher", "distill", "prune", "ptq", "ptq_weights", "qat",
                 "prune_ptq"}:
        configs["teacher"] = p.train("teacher", "teacher")
        p.float_row("teacher", "teacher", "baseline", configs["teacher"])
    if stages & {"student", "distill", "prune", "ptq", "ptq_weights", "qat",
                 "prune_ptq"}:
        for seed in seeds:
            name = f"student_seed{seed}"
            configs[name] = p.train(name, "student", {"seed": seed})
            p.float_row(name, "student", "baseline", configs[name], seed=seed)
    if "distill" in stages:
        for seed in seeds:
            name = f"distill_seed{seed}"
            cfg = p.train(name, "student", {
                "seed": seed, "objective": "distill",
                "objective_kwargs": ml_collections.ConfigDict({
                    "teacher_workdir": p.path("teacher"),
                    "temperature": config.distill.temperature,
                    "alpha": config.distill.alpha, "teacher_step": 0})})
            p.float_row(name, "student", "distill", cfg, f"student_seed{seed}", seed)

    def source(model: str, seed: int) -> tuple[str, str]:
        """(run, role) that `model`'s compression starts from with `seed`."""
        return ("teacher", "teacher") if model == "teacher" else (
            f"student_seed{seed}", "student")

    pruned = {}  # (model, level, seed) -> run name
    if "prune" in stages or "prune_ptq" in stages:
        seeded = set(config.prune.get("seeded_levels", ()))
        for model in config.prune.models:
            levels = (config.prune.teacher_levels or config.prune.levels
                      if model == "teacher" else config.prune.levels)
            for level in sorted(levels):  # 0 first: the others compare to it
                for seed in (seeds if level in seeded else seeds[:1]):
                    start, role = source(model, seed)
                    name = f"prune_{model}_{int(round(100 * level))}_seed{seed}"
                    cfg = p.train(name, role, {
                        **_prune_overrides(config, level, model, configs[start]),
                        "seed": seed, "init_from": p.path(start)})
                    configs[name] = cfg
                    pruned[model, level, seed] = name
                    dense = pruned.get((model, 0.0, seed), start)
                    p.float_row(name, model, "prune", cfg,
                                "" if level == 0 else dense, seed)
    ptq_seeds = {"teacher": seeds[:1], "student": seeds}  # one teacher
    for stage, activations in (("ptq", True), ("ptq_weights", False)):
        if stage in stages:
            suffix = "_int8" if activations else "_int8_weights"
            for model in ("teacher", "student"):
                for seed in ptq_seeds[model]:
                    start, _ = source(model, seed)
                    p.int8_row(start + suffix, model, stage, configs[start], start,
                               activations, seed=seed)
    if "qat" in stages:
        for model in config.quant.qat_models:
            start, role = source(model, seeds[0])
            tune = {**_kernels_off(configs[start]),
                    **_fine_tune(config, model, configs[start]),
                    "num_epochs": config.quant.qat_epochs,
                    "init_from": p.path(start)}
            # The same fine-tune in float (XLA's ops, float32): QAT's fair baseline.
            name = f"finetune_{model}"
            cfg = p.train(name, role, tune)
            p.float_row(name, model, "finetune", cfg, "", seeds[0])
            cfg = p.train(f"qat_{model}", role, {**tune, "quant.qat": True})
            p.int8_row(f"qat_{model}_int8", model, "qat", cfg, f"qat_{model}",
                       baseline=name, seed=seeds[0])
    if "prune_ptq" in stages:
        level = config.prune.compose_level
        for (model, lvl, seed), name in pruned.items():
            if lvl == level:
                # Against the dense fine-tune: what pruning and int8 cost together.
                p.int8_row(f"{name}_int8", model, "prune_ptq", configs[name], name,
                           baseline=pruned.get((model, 0.0, seed), ""), seed=seed)
    return p.rows


def _fine_tune(config: ml_collections.ConfigDict, model: str,
               source: ml_collections.ConfigDict) -> dict[str, Any]:
    """Overrides that fine-tune `source` (the trained model's config) at
    `config.fine_tune[model].lr_scale` times its learning rates and weight
    decay, without warmup: the trained weights need no ramp, and a recipe's
    peak rate would undo much of the training (scale 1: `source` as is)."""
    scale = config.fine_tune[model].lr_scale
    if scale == 1.0:
        return {}
    return {"learning_rate": source.learning_rate * scale,
            "end_learning_rate": source.end_learning_rate * scale,
            "weight_decay": source.weight_decay * scale,
            "warmup_fraction": 0.0}


def _prune_overrides(config: ml_collections.ConfigDict, level: float,
                     model: str, source: ml_collections.ConfigDict
                     ) -> dict[str, Any]:
    options = config.fine_tune[model]
    # The pipeline's `exclude` if it sets one, else the model config's own
    # (the fast CNN's frozen whitening layer is never pruned).
    exclude = config.prune.get("exclude") or source.prune.exclude
    return {"prune.sparsity": level, "prune.schedule": config.prune.schedule,
            "prune.scope": config.prune.scope,
            "prune.update_every": options.prune_update_every,
            "prune.exclude": exclude,
            "num_epochs": options.epochs, **_fine_tune(config, model, source)}


def _kernels_off(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Overrides for quantization: XLA's ops (qwix intercepts them), and
    float32 between the int8 ops (qwix's quantized weights are not cast)."""
    overrides = {f"model_kwargs.{k}": "xla" for k in config.model_kwargs
                 if k.endswith("_impl")}
    if config.model_kwargs.get("dtype", "float32") != "float32":
        overrides["model_kwargs.dtype"] = "float32"
    return overrides


def render(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown tables: every model beside its fair baseline (the same
    extra training without the compression) and its dense model, scored by
    accuracy, or, for language models (which have none), by the loss; then
    the rows run with several seeds as mean ± std over the seeds."""
    by_name = {r["name"]: r for r in rows}
    dense = {}  # the first baseline of each model: what the sizes compare to
    for r in rows:
        if r["stage"] == "baseline":
            dense.setdefault(r["model"], r)
    by_loss = all(np.isnan(r["accuracy"]) for r in rows)
    key, scale, digits = ("loss", 1.0, 4) if by_loss else ("accuracy", 100.0, 2)
    tested = any(not np.isnan(r.get("test_" + key, float("nan"))) for r in rows)

    def fmt(value: float) -> str:
        return f"{value:.4f}" if by_loss else f"{100 * value:.2f}%"

    def diff(r: dict[str, Any], b: dict[str, Any] | None) -> str:
        return f"{scale * (score(r) - score(b)):+.{digits}f}" if b else "-"

    def score(r: dict[str, Any]) -> float:  # what comparisons use
        return r.get("test_" + key, float("nan")) if tested else r[key]

    def fair(r: dict[str, Any]) -> dict[str, Any] | None:
        return by_name.get(r.get("baseline") or "")

    split = "validation" if tested else "eval"
    unit = "loss (nats)" if by_loss else "accuracy"
    compared = "test" if tested else split
    lines = [f"| model | stage | seed | {split} {unit} | "
             + (f"test {unit} | " if tested else "")
             + f"{compared} vs fair baseline | fair baseline | {compared} vs dense | "
             "parameters | non-zeros | bytes (vs dense) | zipped | eval examples/s |",
             "|---" * (12 + tested) + "|"]
    for r in rows:
        base, against = dense[r["model"]], fair(r)
        lines.append(
            f"| {r['name']} | {r['stage']} | {r.get('seed', 0)} | {fmt(r[key])} | "
            + (f"{fmt(r.get('test_' + key, float('nan')))} | " if tested else "")
            + f"{diff(r, against)} | {against['name'] if against else '-'} | "
            f"{diff(r, base)} | "
            f"{r['params']:,} | "
            f"{r['nonzeros']:,} ({r['nonzeros'] / r['params']:.0%}) | "
            f"{r['bytes']:,} ({r['bytes'] / base['bytes']:.2f}x) | "
            f"{r['bytes_zipped']:,} ({r['bytes_zipped'] / base['bytes']:.2f}x) | "
            f"{r['eval_images_per_s']:,.0f} |")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"_seed\d+", "", r["name"]), []).append(r)
    groups = {g: rs for g, rs in groups.items() if len(rs) > 1}
    if groups:
        lines += ["", f"Over seeds (mean ± sample std; {compared} {unit}; the "
                  "difference to the fair baseline taken seed by seed):", "",
                  f"| rows | seeds | {split} | " + ("test | " if tested else "")
                  + "vs fair baseline |", "|---" * (4 + tested) + "|"]
        for group, rs in groups.items():
            diffs = [scale * (score(r) - score(fair(r))) for r in rs if fair(r)]
            cells = [_mean_std([scale * r[key] for r in rs], digits)]
            if tested:
                cells.append(_mean_std([scale * score(r) for r in rs], digits))
            cells.append(_mean_std(diffs, digits, "+") if len(diffs) == len(rs)
                         else "-")
            seeds = ", ".join(str(r.get("seed", 0)) for r in rs)
            lines.append(f"| {group} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def _mean_std(values: list[float], digits: int, sign: str = "") -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _main(argv: list[str]) -> None:
    """`--config` is a compression config here; `--workdir` holds the stages."""
    workdir = cli.pipeline_workdir(argv, "configs/pipelines/compress_cifar.py")
    rows = run(flags.FLAGS.config, workdir, flags.FLAGS.allow_config_change)
    for r in rows:
        score = (f"loss {r.loss:.4f}" if np.isnan(r.accuracy)
                 else f"{100 * r.accuracy:.2f}%")
        writers.report(f"{r.name}: {score}, {r.nonzeros:,} non-zeros, "
                       f"{r.bytes:,} bytes")
    writers.report(f"table: {os.path.join(workdir, RESULTS + '.md')}")


if __name__ == "__main__":
    app.run(lambda argv: cli.guarded(_main, argv),
            flags_parser=cli.parse_flags)
