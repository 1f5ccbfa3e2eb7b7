"""Typed config schemas, registered in Hydra's ConfigStore.

Every YAML file under ``configs/`` is merged onto these dataclasses, so a misspelt key
fails when the config is composed, before any work starts. Each field's comment is its
documentation (``transformer-train --help`` lists the groups).
"""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from transformer.errors import UserError

T = TypeVar("T")

E = TypeVar("E", bound=StrEnum)


# The enumerated settings: a config field of one of these types takes the member's name
# (= its value) in YAML and on the command line; OmegaConf rejects any other at compose time,
# naming the key and the allowed values, and the dataclass rejects it when built in Python.
Activation = StrEnum("Activation", "relu gelu silu swiglu geglu", module=__name__)
Positional = StrEnum("Positional", "sinusoidal sinusoidal_fairseq learned rope", module=__name__)
Norm = StrEnum("Norm", "layernorm rmsnorm", module=__name__)
DataFormat = StrEnum("DataFormat", "text tsv jsonl", module=__name__)
Schedule = StrEnum("Schedule", "inverse_sqrt cosine noam constant", module=__name__)
Precision = StrEnum("Precision", "auto fp32 bf16 fp16", module=__name__)
Quantize = StrEnum("Quantize", "auto none int8", module=__name__)
LengthPenalty = StrEnum("LengthPenalty", "gnmt average none", module=__name__)
EarlyStop = StrEnum("EarlyStop", "exact fairseq", module=__name__)


class Switch(StrEnum):
    """auto | true | false. Its fields are declared ``str`` with ``switch()``: YAML and the
    command line hand ``true``/``false`` over as bools, which OmegaConf's enum nodes refuse."""

    auto = "auto"
    true = "true"
    false = "false"


# every enumerated setting's type: checkpoint loading (weights_only) accepts them in a config someone saved with asdict
ENUMS = (Activation, Positional, Norm, DataFormat, Schedule, Precision, Quantize, LengthPenalty, EarlyStop, Switch)


def switch() -> str:
    """A Switch field (``auto`` by default), checked and made a Switch by ``Checked``."""
    return field(default="auto", metadata={"enum": Switch})


def enum_value(kind: type[E], value: object, key: str) -> E:
    """``value`` as a member of ``kind`` (a Switch also from a bool or any case), else one error
    line naming ``key`` and the allowed values."""
    text = str(value).lower() if kind is Switch else value
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(kind)}") from None


@functools.cache
def enum_fields(schema: type) -> dict[str, type[StrEnum]]:
    """The enumerated fields of a schema dataclass and their enum types."""
    hints = typing.get_type_hints(schema)
    kinds = {f.name: f.metadata.get("enum", hints[f.name]) for f in fields(schema)}
    return {name: kind for name, kind in kinds.items() if isinstance(kind, type) and issubclass(kind, StrEnum)}


class Checked:
    """A schema dataclass whose enumerated fields are checked and made members of their enum
    when it is built (by OmegaConf.to_object, ``replace`` or by hand), so a config in the code
    always holds valid members; ``section`` prefixes the key in the error."""

    section: ClassVar[str] = ""  # not a key: the prefix of this section's keys in error lines

    def __post_init__(self) -> None:
        for name, kind in enum_fields(type(self)).items():
            setattr(self, name, enum_value(kind, getattr(self, name), f"{self.section}.{name}"))


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: ``low``/``high`` bounds (None: unbounded), each
    inclusive unless ``open`` names it ("low", "high" or "both")."""

    low: float | None = None  # the smallest value (None: no lower bound)
    high: float | None = None  # the largest value (None: no upper bound)
    open: str = ""  # "", "low", "high" or "both": which bounds are excluded

    def holds(self, value: float) -> bool:
        above = self.low is None or value > self.low or (value == self.low and self.open not in ("low", "both"))
        below = self.high is None or value < self.high or (value == self.high and self.open not in ("high", "both"))
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"must be {'>' if self.open == 'low' else '>='} {self.low:g}"
        left = "(" if self.open in ("low", "both") else "["
        right = ")" if self.open in ("high", "both") else "]"
        return f"must be in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE, COUNT, NONNEGATIVE = Range(0, open="low"), Range(1), Range(0)  # > 0; >= 1; >= 0
PROBABILITY = Range(0, 1, open="high")  # a rate in [0, 1): 1 would drop or smooth everything
SERVE_LIMITS = ("max_batch_tokens", "max_sentences", "max_chars", "max_queue", "max_beam_size", "max_request_cost")
SERVE_LIMITS += ("max_attention_cells", "batch_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s")
SERVE_LIMITS += ("max_connections", "max_header_bytes")  # each > 0
# every numeric key with a range, checked by ``validate`` when a command starts (before any data or BPE work);
# section "" holds a command's own top-level keys (transformer-serve's port)
RANGES: dict[str, dict[str, Range]] = {
    "model": {
        "d_model": COUNT,
        "n_heads": COUNT,
        "n_encoder_layers": COUNT,
        "n_decoder_layers": COUNT,
        "d_ff": COUNT,
        "dropout": PROBABILITY,
        "attention_dropout": PROBABILITY,
        "activation_dropout": PROBABILITY,
        "src_word_dropout": Range(0, 1),  # 1: every token of that side hidden (tests use it)
        "tgt_word_dropout": Range(0, 1),
        "max_positions": Range(3),  # BOS, one subword, EOS
    },
    "data": {
        "shuffle_buffer": COUNT,
        "encode_workers": NONNEGATIVE,
        "max_len_ratio": NONNEGATIVE,
        "builtin_train": COUNT,
        "builtin_valid": COUNT,
        "builtin_test": COUNT,
        "vocab_size": Range(8),  # the four specials and a few characters; the corpus may need more (BPE says)
        "tokenizer_sample": COUNT,
        "max_len": COUNT,
        "max_tokens": COUNT,
        "valid_max_sentences": NONNEGATIVE,
        "sampling_temperature": POSITIVE,
    },
    "trainer": {
        "max_steps": COUNT,
        "max_epochs": NONNEGATIVE,
        "bidirectional_epochs": NONNEGATIVE,
        "max_minutes": NONNEGATIVE,
        "time_budget_minutes": NONNEGATIVE,
        "update_freq": COUNT,
        "lr": POSITIVE,
        "eps": POSITIVE,
        "weight_decay": NONNEGATIVE,
        "warmup_steps": NONNEGATIVE,
        "min_lr": NONNEGATIVE,
        "label_smoothing": PROBABILITY,
        "rdrop_alpha": NONNEGATIVE,
        "clip_norm": NONNEGATIVE,
        "ema_decay": PROBABILITY,
        "eval_every": COUNT,
        "save_every": NONNEGATIVE,
        "log_every": COUNT,
        "eval_beam_size": COUNT,
        "keep_last": NONNEGATIVE,
        "keep_every": NONNEGATIVE,
        "patience": NONNEGATIVE,
        "average_last": NONNEGATIVE,
        "max_bad_steps": COUNT,
        "threads": NONNEGATIVE,
    },
    "decode": {
        "beam_size": COUNT,
        "n_best": COUNT,
        "max_len_a": NONNEGATIVE,
        "max_len_b": NONNEGATIVE,
        "min_len": NONNEGATIVE,
        "batch_tokens": COUNT,
        "temperature": POSITIVE,
        "top_k": NONNEGATIVE,
        "top_p": Range(0, 1, open="low"),
    },
    "serve": {  # transformer-serve's limits (serve/settings.py ServeConfig)
        **dict.fromkeys(SERVE_LIMITS, POSITIVE),
        **dict.fromkeys(("max_wait_ms", "restart_backoff_s", "worker_max_rss_mb", "drain_timeout_s"), NONNEGATIVE),
        **dict.fromkeys(("threads", "retry_after_s"), NONNEGATIVE),
    },
    "": {"port": Range(1, 65535)},
}


@dataclass
class ModelConfig(Checked):
    """Shapes of the encoder-decoder Transformer (Vaswani et al. 2017)."""

    section: ClassVar[str] = "model"  # not a key: the prefix of this section's keys in error lines

    d_model: int = 512  # width of embeddings and residual stream
    n_heads: int = 8  # attention heads; d_model must divide evenly
    n_encoder_layers: int = 6  # encoder blocks
    n_decoder_layers: int = 6  # decoder blocks
    d_ff: int = 2048  # hidden width of the position-wise feed-forward block
    decoder_d_ff: int = 0  # the decoder blocks' feed-forward width (0: d_ff); a student's light decoder
    dropout: float = 0.1  # on embeddings and every residual branch
    attention_dropout: float = 0.0  # on attention probabilities
    activation_dropout: float = 0.0  # inside the feed-forward block
    src_word_dropout: float = 0.0  # whole source token embeddings zeroed in training (Marian's --dropout-src)
    tgt_word_dropout: float = 0.0  # whole decoder-input token embeddings zeroed in training (--dropout-trg)
    # relu | gelu | silu (x * sigmoid(x): OPUS-MT's swish) | swiglu | geglu: gated, silu(x W1) * (x W3) W2 (geglu:
    # gelu), W1 and W3 both d_ff wide as given (1.5x the parameters of relu; for equal ones set d_ff to 2/3 of it)
    activation: Activation = Activation.relu
    norm_first: bool = False  # False: post-norm (the paper); True: pre-norm with final norms
    norm: Norm = (
        Norm.layernorm
    )  # layernorm | rmsnorm (x / rms(x) * weight: no mean, no bias), every block and final norm
    # sinusoidal (Marian) | sinusoidal_fairseq (M2M100: from position pad_id + 1) | learned | rope (rotary:
    # queries and keys of self-attention rotated by their position, nothing added to the embeddings)
    positional: Positional = Positional.sinusoidal
    max_positions: int = 1024  # longest sequence (in subwords, with BOS/EOS) the model accepts
    share_embeddings: bool = True  # one embedding for source and target (needs a joint vocabulary)
    tie_output: bool = True  # output projection shares the target embedding matrix
    src_vocab_size: int = 0  # filled from the tokenizer at training time
    tgt_vocab_size: int = 0  # filled from the tokenizer at training time
    # Options for imported models (transformer-import); the defaults are what training here builds.
    scale_embedding: bool = True  # token embeddings times sqrt(d_model)
    final_logits_bias: bool = False  # a bias on the output logits (Marian's final_logits_bias)
    pad_id: int = 0  # special ids (transformer.vocab); Marian: pad = decoder start = last id, eos 0
    bos_id: int = 2  # the decoder's first input (decoder_start_token_id)
    eos_id: int = 3  # end of sentence
    forced_bos_id: int = -1  # forced first output token (M2M100's target language); -1: none


@dataclass
class DataConfig(Checked):
    """Where the parallel corpus comes from and how it is tokenized and batched."""

    section: ClassVar[str] = "data"  # not a key: the prefix of this section's keys in error lines

    name: str = "builtin"  # a label for logs and run cards
    source: str = "builtin"  # builtin | files | hub
    src_lang: str = "en"  # source language code (the key inside translation dicts)
    tgt_lang: str = "de"  # target language code
    # files: paths per split. Plain text pairs (src/tgt, optionally .gz), or one TSV/JSONL file.
    format: DataFormat = DataFormat.text  # text | tsv | jsonl
    train_src: str | None = None  # text: training source file, one sentence a line
    train_tgt: str | None = None  # text: training target file, aligned line by line
    valid_src: str | None = None  # text: validation source file
    valid_tgt: str | None = None  # text: validation target file
    test_src: str | None = None  # text: test source file
    test_tgt: str | None = None  # text: test target file
    train_file: str | None = None  # tsv/jsonl: one file per split holding both sides
    valid_file: str | None = None  # tsv/jsonl: validation file
    test_file: str | None = None  # tsv/jsonl: test file
    # hub: a Hugging Face dataset by name
    hub_name: str | None = None  # e.g. wmt14
    hub_config: str | None = None  # e.g. de-en
    train_split: str = "train"  # hub: split names in the dataset
    valid_split: str = "validation"  # hub: e.g. validation or dev
    test_split: str = "test"  # hub: e.g. test
    translation_field: str | None = "translation"  # dict column {src_lang: .., tgt_lang: ..}; null for flat columns
    src_field: str | None = None  # flat-column names (jsonl/hub) when translation_field is null
    tgt_field: str | None = None  # flat-column name of the target side
    streaming: bool = False  # hub or files: read the training split as a stream (bounded memory) instead of loading it
    shuffle_buffer: int = 100000  # streaming: pairs read, sorted by length and batched at a time
    # files: the tokenised training split, memory-mapped (see README "Large corpora")
    # files: encode the training split once into token-id arrays and map them in later runs and resumes
    cache: bool = True
    cache_dir: str | None = None  # where caches live (default: cache/ beside the run directory)
    encode_workers: int = 0  # processes encoding the corpus into the cache (0: one per core; 1: in this process)
    # drop training pairs where one side has more than this many times the other's subwords (0: off)
    max_len_ratio: float = 0.0
    dedup: bool = False  # drop training pairs repeating an earlier (source, target) pair
    # builtin corpus sizes
    builtin_train: int = 20000  # builtin: training pairs generated
    builtin_valid: int = 500  # builtin: validation pairs (no source shared with training)
    builtin_test: int = 500  # builtin: test pairs (no source shared with training or validation)
    builtin_seed: int = 1234  # builtin: generator seed (the splits depend on it and on builtin_train)
    # tokenizer
    vocab_size: int = 8000  # SentencePiece BPE pieces (per side when joint_vocab is false)
    joint_vocab: bool = True  # one BPE model for both languages (needed by model.share_embeddings)
    # pairs SentencePiece trains on (at most; a reproducible random sample of larger corpora)
    tokenizer_sample: int = 2000000
    # batching
    max_len: int = 256  # longer pairs (in subwords) are dropped from training, with a count
    max_tokens: int = 4096  # token budget per batch (padded source or target, whichever is larger)
    # pad each training batch's source and target to the smallest of these lengths holding both (past the
    # largest: a multiple of it), so a compiled model (trainer.compile) meets a few shapes; []: no padding
    length_buckets: list[int] = field(default_factory=list)
    valid_max_sentences: int = 0  # cap on validation sentences used for BLEU during training (0: all)
    # multilingual (README "Multilingual training")
    # several corpora in one run: each entry (a CorpusEntry) sets data keys on top of its preset, with its
    # src_lang and tgt_lang; empty: this config is the one corpus. Tokenizer and batching keys stay here.
    corpora: list[CorpusEntry] = field(default_factory=list)
    tgt_lang_tag: bool = False  # prepend the target-language tag (<2de>) to every source; BPE keeps the tags whole
    # data.corpora: corpus i is drawn with probability p_i ~ n_i^(1/T) (1: as its size; larger: flatter)
    sampling_temperature: float = 1.0
    # synthetic pairs (docs/distillation.md); transformer-distill and the back-translation stage write these files
    distilled_file: str | None = None  # TSV of the training sources with a teacher's translations, used as targets
    original_ratio: float = 1.0  # with distilled_file: share of the corpus's own pairs kept beside the teacher's
    monolingual_tgt: str | None = None  # target-language text, one sentence a line, back-translated (reverse_model)
    reverse_model: str | None = None  # checkpoint or run directory translating target -> source (back-translation)
    bt_file: str | None = None  # TSV of back-translated pairs (synthetic source, real target); set from monolingual_tgt
    bt_ratio: float = 1.0  # back-translated pairs mixed in per original pair (at most all of them; 1.0: as many)
    bt_tag: str = "<BT>"  # opens every back-translated source (Caswell et al. 2019), one BPE piece; "" for none

    def __post_init__(self) -> None:
        super().__post_init__()
        self.corpora = [corpus_entry(entry, i) for i, entry in enumerate(self.corpora)]


@dataclass
class CorpusConfig(DataConfig):
    """One entry of data.corpora: a data config's keys on top of ``preset``'s."""

    preset: str | None = None  # start from this data config (configs/data: builtin, files, hub, multi30k)
    reverse: bool = False  # train the corpus target -> source (tgt_lang -> src_lang), e.g. the built-in one de -> en


# One data.corpora entry as composed: every key of CorpusConfig with its type, unset (MISSING) unless
# the entry sets it, so Hydra checks an entry's keys and values while an explicit null stays apart from
# "not given" (the preset's value). The fields are init=False because OmegaConf leaves unset ones out
# of the object only there; entry_keys reads what an entry sets.
_entry_hints = typing.get_type_hints(CorpusConfig, localns={"CorpusEntry": None})  # corpora: not an entry's key
CorpusEntry = make_dataclass(
    "CorpusEntry",
    [
        (f.name, _entry_hints[f.name], field(default=MISSING, init=False))
        for f in fields(CorpusConfig)
        if f.name != "corpora"
    ],
)


def missing_keys(cfg: DictConfig) -> list[str]:
    """The keys the user must still give (``???``), sorted; a data.corpora entry's unset keys
    are not among them: those are left to its preset."""
    return sorted(k for k in OmegaConf.missing_keys(cfg) if not re.search(r"\bcorpora\[\d+\]\.", k))


def corpus_entry(entry: object, i: int) -> CorpusEntry:
    """``data.corpora[i]`` as a CorpusEntry: as composed, or from a mapping built in Python, whose
    keys must be data keys (one error line naming the entry otherwise)."""
    if isinstance(entry, CorpusEntry):
        return entry
    if not isinstance(entry, Mapping):
        raise UserError(
            f"data.corpora[{i}]: expected a mapping of data keys such as {{src_lang: en, tgt_lang: de}}, got {entry!r}"
        )
    made = CorpusEntry()
    names = {f.name for f in fields(made)}
    for key, value in entry_keys(entry).items():
        if key not in names:
            raise UserError(f"data.corpora[{i}]: {key!r} is not a data key")
        setattr(made, key, value)
    return made


def entry_keys(entry: object) -> dict:
    """The keys a data.corpora entry sets: a mapping as written, or a composed CorpusEntry."""
    if isinstance(entry, DictConfig):
        return {k: entry[k] for k in entry if not OmegaConf.is_missing(entry, k)}
    items = entry.items() if isinstance(entry, Mapping) else ((f.name, getattr(entry, f.name)) for f in fields(entry))
    return {k: v for k, v in items if not (isinstance(v, str) and v == MISSING)}


@dataclass
class TrainerConfig(Checked):
    """The optimisation loop."""

    section: ClassVar[str] = "trainer"  # not a key: the prefix of this section's keys in error lines

    seed: int = 1  # initial weights, batch order and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto | fp32 | bf16 | fp16; auto: bf16 where the CPU (avx512_bf16/AMX) or GPU runs it natively, else fp32 (fp16: CUDA only, with a gradient scaler)
    max_steps: int = 100000  # optimizer updates
    max_epochs: int = 0  # 0: no limit
    # BiT: the first N epochs also train every pair reversed (target -> source); joint vocabulary only
    bidirectional_epochs: int = 0
    max_minutes: float = 0.0  # stop after this much wall time (0: no limit)
    time_budget_minutes: float = 0.0  # whole run (BPE, training, test scoring) in this many minutes: the first updates are timed, then max_steps, warmup, eval_every and save_every are scaled to fit, and refitted after each evaluation from the measured pace (0: off)
    update_freq: int = 1  # gradient accumulation: batches per optimizer update
    lr: float = 5e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW beta1, beta2
    eps: float = 1e-9  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not on biases, norms, embeddings)
    schedule: Schedule = Schedule.inverse_sqrt  # inverse_sqrt | cosine | noam | constant
    warmup_steps: int = 4000  # linear warmup to trainer.lr
    min_lr: float = 0.0  # floor of the cosine schedule
    label_smoothing: float = 0.1  # epsilon of label-smoothed cross-entropy (0: plain NLL)
    rdrop_alpha: float = 0.0  # R-Drop: each batch twice through dropout, + alpha x their symmetric KL (the paper's loss, halved; 0: off; 2x compute)
    clip_norm: float = 1.0  # 0 disables gradient clipping
    # EMA of the weights (fp32), updated after every optimizer step: ema = decay * ema + (1 - decay) * weights; used
    # for validation and saved as the checkpoints' "model" (what decoding loads), the raw weights as "train_model"
    ema_decay: float = 0.0  # e.g. 0.999; 0: off
    eval_every: int = 1000  # steps between validation loss + BLEU (each also saves a checkpoint)
    save_every: int = 0  # extra checkpoints between evaluations (0: only at evaluations)
    log_every: int = 100  # steps between training log lines
    eval_beam_size: int = 1  # search used for validation BLEU (1: greedy)
    keep_last: int = 3  # step checkpoints kept besides last and best
    keep_every: int = 0  # also keep every step checkpoint at a multiple of this (snapshots; 0: none)
    patience: int = 0  # early stopping: evaluations without a better BLEU (0: off)
    average_last: int = 0  # average the last N kept checkpoints at the end (0: off)
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops
    compile: bool = False  # torch.compile the model (with data.length_buckets it meets a few shapes: docs/gpu.md)
    # auto | true | false: loss, token counts and the finite check stay on the device, read at log steps only (the
    # host never waits for the GPU; a non-finite update is skipped by the fused AdamW, counted at the next log line)
    deferred_metrics: str = switch()  # auto: true on CUDA
    onednn_linear: str = switch()  # auto | true | false: fp32 CPU linear layers on oneDNN instead of MKL; auto times both per layer shape at start-up
    threads: int = 0  # torch intra-op threads (0: PyTorch's default)
    # CPU with the system allocator (TRANSFORMER_ALLOCATOR=system, or no mimalloc): glibc keeps
    # freed memory for reuse (no page faults on big tensors; ~10% faster); unused under mimalloc
    keep_freed_memory: bool = True
    resume: str | None = None  # run directory or checkpoint to continue from
    # resume: settings that may differ from the checkpoint's config, e.g. [trainer.lr,data.max_tokens] (docs/runs.md)
    resume_allow: list[str] = field(default_factory=list)
    # start from this checkpoint's weights, tokenizer and model config (fresh optimizer; resume wins)
    init_from: str | None = None
    progress: bool = True  # show a tqdm progress bar
    loggers: list[str] = field(
        default_factory=lambda: ["jsonl", "tensorboard", "console"]
    )  # where records go: jsonl | tensorboard | console | wandb | mlflow, or a logger registered by name (docs/runs.md#loggers)


@dataclass
class DecodeConfig(Checked):
    """Search settings shared by decode, evaluate and validation."""

    section: ClassVar[str] = "decode"  # not a key: the prefix of this section's keys in error lines

    beam_size: int = 5  # 1: greedy
    n_best: int = 1  # hypotheses returned per sentence (at most beam_size)
    length_penalty: float = 1.0  # GNMT alpha (lp_style=gnmt) or exponent (lp_style=average)
    lp_style: LengthPenalty = LengthPenalty.gnmt  # gnmt | average | none
    max_len_a: float = 1.5  # hypotheses stop at a * source length + b subwords
    max_len_b: int = 10  # see max_len_a
    min_len: int = 0  # EOS is forbidden before this many subwords
    # exact: stop once no live beam can still win; fairseq: once beam_size hypotheses finished
    early_stop: EarlyStop = EarlyStop.exact
    batch_tokens: int = 4096  # source tokens per decoding batch
    prepack: str = switch()  # auto | true | false: CPU fp32 search on a copy with linear weights packed for oneDNN; auto times both per layer shape
    # auto | fp32 | bf16 | fp16 (CUDA); auto: bf16 where native (avx512_bf16/AMX CPU, CUDA), else fp32
    precision: Precision = Precision.auto
    # auto | none | int8 (CPU: int8 x int8 linear layers, output projection too); auto: int8 only when
    # decode.max_bleu_loss > 0 allows int8's bound (decode/fast.py INT8_BLEU_LOSS) and it times faster here
    quantize: Quantize = Quantize.auto
    # auto | none | PATH of a vocabulary shortlist (transformer-shortlist); auto: the shortlist.pt beside the
    # checkpoint, only when decode.max_bleu_loss > 0 covers the BLEU loss it measured on the validation split
    shortlist: str = "auto"
    max_bleu_loss: float = 0.0  # BLEU the auto choices (quantize, shortlist) may give up for speed; 0: exact paths only
    sampling: bool = False  # sample instead of search (back-translation)
    temperature: float = 1.0  # sampling: logits are divided by it
    top_k: int = 0  # sampling: keep the k most likely subwords (0: all)
    top_p: float = 1.0  # sampling: keep the smallest set holding this probability mass (1.0: all)
    tgt_lang: str | None = None  # models trained with data.tgt_lang_tag: the language to translate into (e.g. de)
    prefix: str | None = None  # target text every output starts with (forced; its log-probs count in the score)
    prefix_file: str | None = None  # transformer-decode: one forced target prefix per input line (empty line: none)
    # transformer-decode: per input line, tab-separated target phrases every output must contain (empty line: none)
    constraints_file: str | None = None
    alignment: bool = False  # Pharaoh word alignments (source-target) from cross-attention, with each output
    # decoder layer giving alignments (mean over heads; negative counts from the end, clamped to the first layer)
    alignment_layer: int = -1


@dataclass
class TrainConfig:
    """transformer-train (configs/train.yaml): model, data, optimisation and test-set search."""

    model: ModelConfig = field(default_factory=ModelConfig)  # group model/: tiny | small | base
    data: DataConfig = field(default_factory=DataConfig)  # group data/: builtin | multi30k | files | hub
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # group trainer/: default | fast
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # group decode/: beam | greedy | sample
    evaluate_test: bool = True  # score the test split with the best checkpoint at the end
    run_dir: str | None = None  # filled with Hydra's output directory


@dataclass
class DistillSettings:
    """transformer-distill's own keys (docs/distillation.md)."""

    chunk_lines: int = 1000  # sources translated and saved at a time: a killed run loses at most one chunk
    # time budget of the translation stage: it stops after the chunk that passes it (0: none)
    translate_minutes: float = 0.0
    compare: bool = True  # last stage: teacher and student on the test split, beam and greedy, BLEU, chrF and speed
    # the comparison's deploy row: the student decoded with decode.quantize=this (none: fp32) and its shortlist
    quantize: Quantize = Quantize.int8
    shortlist: bool = True  # build the student's vocabulary shortlist beside its checkpoint; use it in the deploy row


@dataclass
class DistillConfig(TrainConfig):
    """transformer-distill (configs/distill.yaml): a teacher translates the training corpus, a
    student (model/trainer/decode keys, as transformer-train's) trains on it, then both are compared."""

    teacher: str = MISSING  # checkpoint file or run directory (averaged.pt, else best.pt) translating the corpus
    ensemble: list[str] = field(default_factory=list)  # extra checkpoints ensembled with the teacher
    distill: DistillSettings = field(default_factory=DistillSettings)  # the stages' settings


@dataclass
class EvaluateConfig:
    """transformer-evaluate (configs/evaluate.yaml): score a checkpoint with sacreBLEU."""

    checkpoint: str = MISSING  # checkpoint file or run directory (uses best.pt)
    data: DataConfig = field(default_factory=DataConfig)  # group data/: builtin | multi30k | files | hub
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # group decode/: beam | greedy | sample
    split: str = "test"  # split of the data config to score
    src_file: str | None = None  # or score these files instead of a data split
    ref_file: str | None = None  # references aligned line by line with src_file
    output: str | None = None  # hypotheses file (default: next to the checkpoint)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ensemble: list[str] = field(default_factory=list)  # extra checkpoints ensembled with the first


@dataclass
class DecodeRunConfig:
    """transformer-decode (configs/decode.yaml): translate text with a checkpoint."""

    checkpoint: str = MISSING  # checkpoint file or run directory (uses best.pt)
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # group decode/: beam | greedy | sample
    input: str | None = None  # a file to translate (default: stdin)
    sentence: str | None = None  # or one sentence given on the command line
    output: str | None = None  # default: stdout
    scores: bool = False  # print "score<TAB>translation"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ensemble: list[str] = field(
        default_factory=list
    )  # extra checkpoints ensembled with the first (probabilities averaged)
    plot_attention: str | None = None  # write a PNG heat map of the first sentence's cross-attention here
    attention_layer: int = -1  # decoder layer for plot_attention (-1: mean over layers)
    attention_head: int = -1  # head for plot_attention (-1: mean over heads)


SECTIONS: dict[str, type[Checked]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "decode": DecodeConfig,
}  # the sections of the commands' configs holding enumerated keys


def register_configs() -> None:
    """Register schemas so YAML files are validated against them."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="decode_schema", node=DecodeRunConfig)
    cs.store(name="distill_schema", node=DistillConfig)


def config_dir() -> str:
    """Absolute path of the YAML configs, installed (package data) or in a source checkout."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")


def typed(cfg: DictConfig | dict | T, schema: type[T]) -> T:
    """The composed config as its dataclasses (``OmegaConf.to_object``): the one boundary
    between Hydra's nodes and the code, crossed once by each entry point."""
    if isinstance(cfg, schema):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


def to_dict(cfg: object) -> dict:
    """A plain dict of a dataclass or OmegaConf node, for checkpoints and logs."""
    if isinstance(cfg, dict):
        return cfg
    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    out = OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # enums as their names: torch.load reads them
    for section in (out, out.get("data")):  # a DataConfig or a whole config: corpus entries as written
        if isinstance(section, dict) and isinstance(section.get("corpora"), list):
            section["corpora"] = [entry_keys(e) for e in section["corpora"]]
    return out


def setting(value: object, key: str) -> StrEnum:
    """``value`` of the enumerated key ``key`` (section.name, e.g. decode.prepack) as its enum's
    member: for values that reach the code outside a schema dataclass (a function's argument)."""
    section, name = key.split(".")
    return enum_value(enum_fields(SECTIONS[section])[name], value, key)


def validate(cfg: object, sections: tuple[str, ...] = tuple(RANGES)) -> None:
    """Check every range of a composed config (or of the sections
    it has; "": its top-level keys) at start-up, so a typo or an impossible value fails before
    data loads, naming the key, instead of at the first step or deep inside PyTorch."""
    for section in sections:
        node = cfg if section == "" else getattr(cfg, section, None)
        if node is not None:
            validate_section(section, node)


def validate_section(section: str, node: object) -> None:
    """The ranged keys of one section (a ModelConfig, DecodeConfig, ... or its node; the enumerated
    ones are checked by their types)."""
    for key, allowed in RANGES.get(section, {}).items():
        value = getattr(node, key, None)
        if isinstance(value, (int, float)) and not allowed.holds(value):
            raise UserError(f"{section + '.' if section else ''}{key}={value} {allowed}")
    if section == "trainer" and not all(0 <= beta < 1 for beta in node.betas):
        raise UserError(f"trainer.betas={list(node.betas)} must each be in [0, 1)")
