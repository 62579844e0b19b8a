"""Model registry: configs name a model, `create_model` builds it."""
from typing import Any

from flax import linen as nn

from research import errors
from research.models import airbench
from research.models import cnn
from research.models import gpt
from research.models import rnn

MODELS: dict[str, type[nn.Module]] = {
    "lenet": cnn.LeNet,
    "convnet": cnn.ConvNet,
    "airbench": airbench.AirbenchNet,
    "char_rnn": rnn.CharRNN,
    "gpt": gpt.GPT,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the registered model `name` with its config kwargs."""
    if name not in MODELS:
        raise errors.UserError(
            f"Unknown model {name!r}; choose from {sorted(MODELS)}.")
    try:
        return MODELS[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise errors.UserError(
            f"Bad config.model_kwargs for model {name!r}: {e}") from None
