"""research: train, inspect, compress and scale neural networks in JAX."""
import os

# Before TensorFlow loads (through TFDS and clu): its C++ start-up banners are
# noise in every log. An explicit setting by the user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
