"""research: train, inspect, compress and scale neural networks in JAX."""
import os

# Before TensorFlow loads (TFDS decodes the data with it): its C++ start-up
# banners are noise in every log. TensorFlow's oneDNN ops announce themselves
# even so; TensorFlow here only decodes images, which they do not touch. An
# explicit setting by the user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
