"""A 48-example TFDS image dataset written to disk, for reads that mock_data
cannot fake (it returns the same examples for every sub-split)."""
import numpy as np
import tensorflow_datasets as tfds

from research.data import input_pipeline

NAME = "research_tiny_images"
NUM_EXAMPLES = 48  # per split


class ResearchTinyImages(tfds.core.GeneratorBasedBuilder):
    """Random 32x32x3 images, labels 0-9, different in every example."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

    def _generate_examples(self, seed):
        rng = np.random.default_rng(seed)
        for i in range(NUM_EXAMPLES):
            yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                      "label": int(rng.integers(0, 10))}


def register() -> None:
    """Makes `config.dataset="research_tiny_images"` usable in this process."""
    input_pipeline.DATASETS[NAME] = input_pipeline.ImageClassification(
        NAME, (32, 32, 3), 10, download_host="localhost")


def prepare(data_dir: str) -> None:
    ResearchTinyImages(data_dir=data_dir).download_and_prepare()
