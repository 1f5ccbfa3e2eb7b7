"""Special token ids: fixed for every tokenizer and model this package trains; an imported
model (Marian, M2M100) carries its own in its ``ModelConfig`` (``Specials``)."""

from __future__ import annotations

from dataclasses import dataclass

PAD, UNK, BOS, EOS = 0, 1, 2, 3


@dataclass(frozen=True)
class Specials:
    """The ids that batching and search treat apart from the vocabulary."""

    pad: int = PAD  # padding (masked keys, no loss)
    bos: int = BOS  # the decoder's first input (Hugging Face: decoder_start_token_id)
    eos: int = EOS  # ends a sentence
    forced_bos: int = -1  # a token forced as the first output (M2M100's target language); -1: none

    @property
    def never_generated(self) -> tuple[int, ...]:
        """PAD and the start token, unless the start token is EOS (M2M100 starts from EOS)."""
        return tuple(sorted({self.pad, self.bos} - {self.eos}))
