"""transformer: train, evaluate and deploy encoder-decoder Transformer translation models.

from transformer import Translator
Translator.from_checkpoint("runs/builtin").translate(["twenty-one"])
"""

from importlib.metadata import PackageNotFoundError, version

from transformer.decode.translator import Translation, Translator
from transformer.evaluate import evaluate
from transformer.evaluate import train_and_test as train

__all__ = ["Translator", "Translation", "evaluate", "train"]
try:
    __version__ = version("transformer")  # one source of truth: pyproject.toml's version
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
