"""transformer: train, evaluate and deploy encoder-decoder Transformer translation models.

from transformer import Translator
Translator.from_checkpoint("runs/builtin").translate(["twenty-one"])

Training and scoring from Python: ``from transformer.evaluate import evaluate, train_and_test``.
No name here shadows a module of the package: ``transformer.train`` and ``transformer.evaluate``
are the modules, whatever was imported first (tests/test_module_names.py).
"""

from importlib.metadata import PackageNotFoundError, version

from transformer.decode.translator import Translation, Translator

__all__ = ["Translator", "Translation"]
try:
    __version__ = version("transformer")  # one source of truth: pyproject.toml's version
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
