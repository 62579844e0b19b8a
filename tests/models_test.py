"""Model shapes, exact parameter counts, and the registry."""
import jax
import jax.numpy as jnp
import pytest
from absl.testing import absltest

from research import errors
from research import models
from research.core import state as state_lib


class LeNetTest(absltest.TestCase):

    def test_shapes_and_parameter_count(self):
        model = models.create_model("lenet", num_classes=10)
        variables = state_lib.init_variables(jax.random.key(0), model, (2, 32, 32, 3))
        self.assertEqual(state_lib.count_params(variables["params"]), 62_006)
        shapes = jax.tree.map(jnp.shape, variables["params"])
        self.assertEqual(shapes["Conv_0"]["kernel"], (5, 5, 3, 6))
        self.assertEqual(shapes["Conv_1"]["kernel"], (5, 5, 6, 16))
        self.assertEqual(shapes["Dense_0"]["kernel"], (400, 120))
        self.assertEqual(shapes["Dense_1"]["kernel"], (120, 84))
        self.assertEqual(shapes["Dense_2"]["kernel"], (84, 10))
        logits = model.apply(variables, jnp.zeros((3, 32, 32, 3)), train=False)
        self.assertEqual(logits.shape, (3, 10))
        self.assertEqual(logits.dtype, jnp.float32)

    def test_torch_style_init_bounds(self):
        model = models.create_model("lenet")
        params = state_lib.init_variables(
            jax.random.key(0), model, (1, 32, 32, 3))["params"]
        bound = 1 / (5 * 5 * 3) ** 0.5
        for leaf in jax.tree.leaves(params["Conv_0"]):
            self.assertLessEqual(float(jnp.abs(leaf).max()), bound)
        # Uniform, not a point mass: the spread reaches most of the bound.
        self.assertGreater(float(jnp.abs(params["Conv_0"]["kernel"]).max()),
                           0.9 * bound)

    def test_num_classes(self):
        model = models.create_model("lenet", num_classes=3)
        variables = state_lib.init_variables(jax.random.key(0), model, (1, 32, 32, 3))
        self.assertEqual(
            model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape, (2, 3))

    def test_unknown_model_lists_choices(self):
        with pytest.raises(errors.UserError, match=r"Unknown model 'resnet'.*lenet"):
            models.create_model("resnet")

    def test_bad_kwargs(self):
        with pytest.raises(errors.UserError, match="model_kwargs"):
            models.create_model("lenet", width=3)


def test_lenet_falls_back_to_xla_without_the_kernels(monkeypatch):
    """Where the C++ kernels are missing (or JAX is not on CPU), "auto" runs
    flax's convolutions and "kernel" is refused before any compute."""
    from research import kernels  # pylint: disable=g-import-not-at-top
    from research.models import impl  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "load_error", lambda: "not built (test)")
    assert impl.resolve("auto", "conv_impl") == "xla"
    model = models.create_model("lenet")
    variables = state_lib.init_variables(jax.random.key(0), model, (1, 32, 32, 3))
    jaxpr = str(jax.make_jaxpr(model.apply)(variables, jnp.zeros((4, 32, 32, 3))))
    assert "conv_general_dilated" in jaxpr and "ffi_call" not in jaxpr
    with pytest.raises(errors.UserError, match="not built"):
        models.create_model("lenet", conv_impl="kernel")
