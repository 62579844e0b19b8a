"""Compression in the trainer and the pipeline: pruning resumes bitwise, the
teacher stays out of the student, the smoke pipeline writes its table, and
bad pipelines fail before any compute."""
import os

import jax
import numpy as np
import pytest

from research import compress
from research import runner
from research.core import config_lib
from research import errors
from research import assembly
from research import train
from research.compression import prune
from research.core import writers
from tests import helpers


def _pruned_config(**overrides):
    return helpers.tiny_config(**{
        "prune.sparsity": 0.75, "prune.update_every": 2, "prune.end_step": 8,
        **overrides})


@pytest.mark.slow
def test_pruned_weights_are_zero_and_a_resume_mid_pruning_is_bitwise(tmp_path):
    config = _pruned_config()
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    helpers.mocked(train.train_and_evaluate, config, straight)
    helpers.mocked(train.train_and_evaluate, config, resumed, stop_after_step=5)
    helpers.mocked(train.train_and_evaluate, config, resumed)
    a = assembly.restore_variables(config, straight).variables
    b = assembly.restore_variables(config, resumed).variables
    helpers.assert_trees_equal(a, b)
    # The saved checkpoint itself has the zeros: 75% of every kernel.
    report = prune.sparsity(a["params"])
    for layer in ("Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel",
                  "Dense_1/kernel", "Dense_2/kernel"):
        assert report[layer] == pytest.approx(0.75, abs=1 / 400), (layer, report)
    logged = [r for r in writers.read_metrics(straight)
              if "prune/sparsity" in r]
    assert logged[-1]["prune/sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert "prune/sparsity/Dense_0/kernel" in logged[-1]


@pytest.mark.parametrize("extra", [{"lookahead.every": 3}, {"ema_decay": 0.9}])
def test_pruned_weights_stay_zero_under_lookahead_and_ema(tmp_path, extra):
    # Both blend in weights from before pruning; the saved model (the EMA's
    # variables, or the weights lookahead pulled back) must still be sparse.
    config = _pruned_config(**extra)
    helpers.mocked(train.train_and_evaluate, config, str(tmp_path))
    report = prune.sparsity(
        assembly.restore_variables(config, str(tmp_path)).variables["params"])
    for layer in ("Conv_0/kernel", "Dense_0/kernel", "Dense_2/kernel"):
        assert report[layer] == pytest.approx(0.75, abs=1 / 400), (layer, report)


@pytest.mark.slow
def test_distillation_keeps_the_teacher_out_and_unchanged(tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    teacher_config = helpers.tiny_config(
        model="convnet", **{"model_kwargs": {"features": (8, 16), "num_classes": 10,
                                             "dropout_rate": 0.0}})
    helpers.mocked(train.train_and_evaluate, teacher_config, teacher_dir)
    before = assembly.restore_variables(teacher_config, teacher_dir).variables
    mtimes = {p: os.path.getmtime(p) for p in _files(teacher_dir)}

    student_dir = str(tmp_path / "student")
    config = helpers.tiny_config(objective="distill", objective_kwargs={
        "teacher_workdir": teacher_dir, "temperature": 2.0, "alpha": 0.5,
        "teacher_step": 0})
    result = helpers.mocked(train.train_and_evaluate, config, student_dir)
    # The reported agreement is the top-1 agreement of the two saved models
    # on the evaluation split, computed here apart from the trainer.
    from research import models  # pylint: disable=g-import-not-at-top
    from research.data import input_pipeline, tfds_reader  # pylint: disable=g-import-not-at-top
    dataset = input_pipeline.get_dataset(config.dataset)
    images = helpers.mocked(tfds_reader.read, dataset, config, config.eval_split,
                            ("image",))["image"].astype("float32") / 255.0
    top1 = {}
    for name, cfg, run_dir in (("teacher", teacher_config, teacher_dir),
                               ("student", config, student_dir)):
        model = models.create_model(cfg.model, **cfg.model_kwargs)
        variables = assembly.restore_variables(cfg, run_dir).variables
        top1[name] = model.apply(variables, images, train=False).argmax(-1)
    assert result["eval/agreement"] == pytest.approx(
        float((top1["teacher"] == top1["student"]).mean()), abs=1e-6)
    after = assembly.restore_variables(teacher_config, teacher_dir).variables
    helpers.assert_trees_equal(before, after)
    assert mtimes == {p: os.path.getmtime(p) for p in _files(teacher_dir)}
    # The student's checkpoint holds the student alone: no array of the
    # teacher's shapes, and the student's own parameter count.
    student = assembly.restore_variables(config, student_dir).variables
    assert sum(x.size for x in jax.tree.leaves(student)) == 62_006
    teacher_shapes = {x.shape for x in jax.tree.leaves(before)} - {
        x.shape for x in jax.tree.leaves(student)}
    for root, _, names in os.walk(os.path.join(student_dir, "checkpoints")):
        for name in names:
            if name.endswith((".json", "_METADATA", "METADATA")):
                with open(os.path.join(root, name), "rb") as f:
                    text = f.read().decode(errors="replace")
                for shape in teacher_shapes:
                    assert str(list(shape)) not in text, (name, shape)


def _files(workdir):
    return [os.path.join(r, n) for r, _, names in os.walk(workdir) for n in names
            if "checkpoints" in r]


def test_missing_or_mismatched_teacher_fails_before_compute(tmp_path):
    config = helpers.tiny_config(objective="distill", objective_kwargs={
        "teacher_workdir": str(tmp_path / "nowhere"), "temperature": 2.0,
        "alpha": 0.5, "teacher_step": 0})
    with pytest.raises(errors.UserError, match=r"objective_kwargs.teacher_workdir="
                       r".*nowhere' holds no trained run \(no config.json\)"):
        helpers.mocked(train.train_and_evaluate, config, str(tmp_path / "s"))
    text_teacher = str(tmp_path / "text")
    os.makedirs(text_teacher)
    text = config_lib.load_config(os.path.join(helpers.CONFIGS,
                                               "shakespeare_rnn.py:smoke"))
    config_lib.save_config(text, text_teacher)
    config.objective_kwargs.teacher_workdir = text_teacher
    with pytest.raises(errors.UserError, match="was trained on 'tiny_shakespeare'"):
        helpers.mocked(train.train_and_evaluate, config, str(tmp_path / "s2"))
    assert not os.path.exists(tmp_path / "s2" / "checkpoints")


@pytest.mark.parametrize("key, value, message", [
    ("stages", ("teacher", "fold"), "Unknown stage 'fold'"),
    ("prune.levels", (0.5, 1.0), r"sparsities must be in \[0, 1\)"),
    ("prune.levels", (-0.1,), r"sparsities must be in \[0, 1\)"),
    ("fine_tune.teacher.lr_scale", 0.0, r"fine_tune.teacher needs lr_scale > 0"),
])
def test_bad_pipelines_fail_before_compute(tmp_path, key, value, message):
    config = config_lib.load_config(
        os.path.join(helpers.CONFIGS, "pipelines/compress_cifar.py:smoke"), {key: value})
    with pytest.raises(errors.UserError, match=message):
        compress.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_bad_sparsity_in_a_training_config_fails_before_compute():
    with pytest.raises(errors.UserError, match=r"prune.sparsity must be in \[0, 1\)"):
        assembly.validate(helpers.tiny_config(**{"prune.sparsity": 1.5}))


@pytest.mark.slow
def test_smoke_pipeline_writes_the_table(tmp_path):
    """Every stage on mocked CIFAR-10 (48 examples): the rows and both files."""
    config = config_lib.load_config(
        os.path.join(helpers.CONFIGS, "pipelines/compress_cifar.py:smoke"),
        {"data_dir": "/nonexistent/tfds", "train_split": "train",
         "eval_split": "test", "test_split": "test", "prune.levels": (0.5,),
         "prune.compose_level": 0.5,
         "fine_tune.student.prune_update_every": 1,
         "fine_tune.teacher.prune_update_every": 1, "student.overrides.batch_size": 8,
         "teacher.overrides.batch_size": 8})
    workdir = str(tmp_path / "pipeline")
    rows = helpers.mocked(compress.run, config, workdir)
    names = [r.name for r in rows]
    assert names == ["teacher", "student_seed0", "distill_seed0",
                     "prune_student_50_seed0", "prune_teacher_0_seed0",
                     "prune_teacher_50_seed0", "teacher_int8", "student_seed0_int8",
                     "finetune_teacher", "qat_teacher_int8", "finetune_student",
                     "qat_student_int8", "prune_student_50_seed0_int8",
                     "prune_teacher_50_seed0_int8"]
    saved = runner.read_rows(os.path.join(workdir, "compression_results.json"))
    assert [r["name"] for r in saved] == names
    by_name = {r.name: r for r in rows}
    # Each row names the model with the same extra training, uncompressed.
    assert {n: r.baseline for n, r in by_name.items() if r.baseline} == {
        "distill_seed0": "student_seed0",
        "prune_student_50_seed0": "student_seed0",  # no level 0 for it here
        "prune_teacher_50_seed0": "prune_teacher_0_seed0",
        "teacher_int8": "teacher", "student_seed0_int8": "student_seed0",
        "qat_teacher_int8": "finetune_teacher", "qat_student_int8": "finetune_student",
        "prune_student_50_seed0_int8": "prune_student_50_seed0",
        "prune_teacher_50_seed0_int8": "prune_teacher_0_seed0"}
    assert by_name["prune_student_50_seed0"].nonzeros < 0.55 * by_name["student_seed0"].params
    # The fast CNN trains with lookahead; its saved pruned model is sparse too.
    assert by_name["prune_teacher_50_seed0"].nonzeros < 0.6 * by_name["teacher"].params
    # ... but never its frozen whitening filters (cifar_fast.py's prune.exclude,
    # kept when the pipeline sets none).
    run = os.path.join(workdir, "prune_teacher_50_seed0")
    pruned = assembly.restore_variables(config_lib.load_workdir_config(run),
                                        run).variables
    assert np.count_nonzero(pruned["params"]["whiten_kernel"]) == 2 * 2 * 3 * 24
    assert by_name["student_seed0_int8"].bytes <= 0.27 * by_name["student_seed0"].bytes
    with open(os.path.join(workdir, "compression_results.md")) as f:
        table = f.read()
    assert table.count("\n") == len(rows) + 5  # 3 lines of provenance
    assert all(0.0 <= r.accuracy <= 1.0 and 0.0 <= r.test_accuracy <= 1.0
               and r.eval_images_per_s > 0 for r in rows)


def test_the_measured_table_in_docs_is_in_the_pipelines_format():
    """docs/results/compression_results.json (the notebook's default) is a
    table `research.compress` wrote: every row rebuilds a `Row`."""
    path = os.path.join(helpers.REPO, "docs", "results", "compression_results.json")
    rows = [compress.Row(**r) for r in runner.read_rows(path)]
    assert {r.stage for r in rows} >= {"baseline", "distill", "prune", "ptq"}
    assert all(0.0 < r.accuracy < 1.0 and r.nonzeros <= r.params for r in rows)


@pytest.mark.slow
def test_language_model_pipeline_distils_prunes_the_mlp_and_exports_int8(tmp_path):
    """The GPT's stages on mocked Tiny Shakespeare: scored by validation
    loss; the teacher changes the student's training; pruning leaves the
    attention whole; both int8 files rebuild the scored model."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from research.compression import quantize  # pylint: disable=g-import-not-at-top
    from configs.pipelines import compress_gpt  # pylint: disable=g-import-not-at-top
    config = compress_gpt.get_config("smoke")
    config.data_dir = "/nonexistent/tfds"
    for role in ("teacher", "student"):  # the mocked text: 11 characters
        config[role].overrides.update({"seq_len": 8, "eval_batch_size": 4})
        config[role].overrides.model_kwargs.update({"vocab_size": 11, "context": 16})
    workdir = str(tmp_path / "pipeline")
    rows = helpers.rnn_mocked(compress.run, config, workdir)
    by_name = {r.name: r for r in rows}
    assert list(by_name) == [
        "teacher", "student_seed0", "distill_seed0", "prune_teacher_0_seed0",
        "prune_teacher_50_seed0", "prune_teacher_75_seed0", "teacher_int8",
        "student_seed0_int8",
        "teacher_int8_weights", "student_seed0_int8_weights"]
    assert all(np.isnan(r.accuracy) and 0 < r.loss < np.log(11)
               and 0 < r.test_loss < np.log(11) for r in rows)

    # Same init, data and steps: only the teacher's targets differ.
    alone = assembly.restore_variables(
        config_lib.load_workdir_config(os.path.join(workdir, "student_seed0")),
        os.path.join(workdir, "student_seed0")).variables
    distilled = assembly.restore_variables(
        config_lib.load_workdir_config(os.path.join(workdir, "distill_seed0")),
        os.path.join(workdir, "distill_seed0")).variables
    assert helpers.max_diff(alone, distilled) > 1e-3
    assert by_name["distill_seed0"].loss != by_name["student_seed0"].loss

    pruned = assembly.restore_variables(
        config_lib.load_workdir_config(os.path.join(workdir, "prune_teacher_75_seed0")),
        os.path.join(workdir, "prune_teacher_75_seed0")).variables["params"]
    report = prune.sparsity(pruned)
    for name, level in report.items():
        if name.endswith(("fc1/kernel", "fc2/kernel")):
            assert level == pytest.approx(0.75, abs=0.01), (name, level)
        elif name != "total":  # attention and embeddings: not pruned
            assert level == 0.0, (name, level)

    for name in ("teacher_int8", "teacher_int8_weights"):
        path = os.path.join(workdir, "exports", f"{name}.int8.safetensors")
        model = quantize.load_int8_model(path)
        tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 11
        logits = model.apply_fn(model.variables, tokens, train=False)
        assert np.isfinite(np.asarray(logits)).all()
        assert by_name[name].bytes < 0.6 * by_name["teacher"].bytes
