"""Special token ids, fixed for every tokenizer and model this package builds."""

PAD, UNK, BOS, EOS = 0, 1, 2, 3
