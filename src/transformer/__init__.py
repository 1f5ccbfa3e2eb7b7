"""transformer: train, evaluate and deploy encoder-decoder Transformer translation models.

from transformer import Translator
Translator.from_checkpoint("runs/builtin").translate(["twenty-one"])

Training and scoring from Python: ``from transformer.evaluate import evaluate, train_and_test``.
No name here shadows a module of the package: ``transformer.train`` and ``transformer.evaluate``
are the modules, whatever was imported first (tests/test_module_names.py).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformer.decode.translator import Translation, Translator

__all__ = ["Translator", "Translation"]


def __getattr__(name: str) -> object:
    """``Translator`` and ``Translation`` are imported when first asked for: importing the
    package (every console command does) costs no ``import torch``, so a command can re-execute
    itself under mimalloc (``allocator.use_fast_allocator``) for the price of a Python start-up."""
    if name in __all__:
        from transformer.decode import translator

        return getattr(translator, name)
    raise AttributeError(f"module 'transformer' has no attribute {name!r}")


try:
    __version__ = version("transformer")  # one source of truth: pyproject.toml's version
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
