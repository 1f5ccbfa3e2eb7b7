"""transformer: train, evaluate and deploy encoder-decoder Transformer translation models.

from transformer import Translator
Translator.from_checkpoint("runs/builtin").translate(["twenty-one"])
"""

from transformer.decode.translator import Translation, Translator
from transformer.evaluate import evaluate
from transformer.evaluate import train_and_test as train

__all__ = ["Translator", "Translation", "evaluate", "train"]
__version__ = "0.1.0"
