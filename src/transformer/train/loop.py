"""The training recipe, one straight line: setup -> loop -> final evaluation.

One loop serves CPU and CUDA, one process or many (torchrun + DDP). Everything a resumed
run needs is in the checkpoint: weights, optimizer, scaler, RNG states, and where in which
epoch it stopped, so a killed run continues with the same batches and the same dropout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import sacrebleu
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor, nn

from transformer.config import DecodeConfig, ModelConfig
from transformer.data.batching import Batch, Example, collate, encode_examples, shard, token_batches
from transformer.data.corpus import Pair, load_split
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.decode.translator import translate_ids
from transformer.errors import UserError, first_line
from transformer.model import Transformer, build_model
from transformer.model.prepack import train_linears_on_onednn
from transformer.runtime import autocast, keep_freed_memory, resolve_device
from transformer.train.checkpoint import (
    CHECKPOINT_DIR, FORMAT, atomic_save, average_checkpoints, checkpoint_step, list_step_checkpoints,
    load_checkpoint, newest_valid_checkpoint, resolve_checkpoint,
)
from transformer.train.init import apply_init_from, load_init_weights
from transformer.train.loss import label_smoothed_loss, symmetric_kl
from transformer.train.optim import build_optimizer, lr_at, set_lr

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch (this rank's shard) already consumed
    best_bleu: float = -1.0
    best_step: int = 0
    evals_without_gain: int = 0
    elapsed: float = 0.0  # training seconds before this process started


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def chunked(items: Iterable[Any], size: int) -> Iterator[list]:
    """Consecutive groups of ``size`` items; the last group may be shorter."""
    it = iter(items)
    while group := list(itertools.islice(it, size)):
        yield group


def accumulate_gradients(
    net: nn.Module, batches: list[Batch], n_tokens: Tensor, *, label_smoothing: float, precision: str,
    scaler: Optional[torch.amp.GradScaler] = None, world: int = 1, rdrop_alpha: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Forward and backward over the batches of one update, adding to ``.grad`` the gradient of
    (smoothed loss summed over every real target token) / ``n_tokens``, where ``n_tokens``
    counts the update's tokens on all ranks. DDP averages gradients over ranks, so each rank
    scales by ``world``: accumulation and data parallelism both equal one large batch.
    With ``rdrop_alpha`` each batch goes through the network twice in one forward (stacked,
    so dropout differs) and the loss per token is the mean of the two smoothed losses plus
    ``rdrop_alpha / 2`` times their symmetric KL (the R-Drop paper's loss, halved).
    Returns this rank's (smoothed loss sum, NLL sum)."""
    device = batches[0].src.device
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    for j, b in enumerate(batches):
        defer_sync = world > 1 and j < len(batches) - 1  # DDP all-reduces once, after the last batch
        with net.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast(device, precision):
                keep = b.tgt_out != b.pad_id  # (B, T)
                src, tgt_in, tgt_keep, target = b.src, b.tgt_in, keep, b.tgt_out[keep]
                if rdrop_alpha:  # the batch twice, stacked
                    src, tgt_in, tgt_keep, target = (torch.cat([t, t]) for t in (src, tgt_in, tgt_keep, target))
                logits = net(src, tgt_in, tgt_keep)  # (M, V), (2M, V) with R-Drop
                loss, nll = label_smoothed_loss(logits, target, label_smoothing)
                if rdrop_alpha:
                    loss = (loss + rdrop_alpha * symmetric_kl(*logits.chunk(2))) / 2
                    nll = nll / 2
            scaled = loss * world / n_tokens
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
        nll_sum += nll.detach()
    return loss_sum, nll_sum


class Trainer:
    """State of one run: the model, optimizer, data and where it stands."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        t = cfg.trainer
        self.dist, self.device = setup_distributed(t.device)
        autocast(self.device, t.precision)  # a wrong precision fails now, not after data loading
        if not self.dist.main:
            logging.getLogger("transformer").setLevel(logging.WARNING)  # one rank tells the story
        if self.dist.world > 1:  # Hydra names run directories by the clock: take rank 0's
            box = [cfg.run_dir]
            dist.broadcast_object_list(box, src=0)
            cfg.run_dir = box[0]
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if t.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        resume = self.find_resume()
        init = apply_init_from(cfg)  # cfg.model becomes the checkpoint's

        self.streaming = bool(cfg.data.streaming)
        if self.streaming and cfg.data.source != "hub":
            raise UserError(f"data.streaming=true needs data.source=hub (got {cfg.data.source!r}); other sources are read into memory")
        train_pairs = None if self.streaming else load_split(cfg.data, "train")
        valid_pairs = load_split(cfg.data, "valid")
        if cfg.data.valid_max_sentences > 0:
            valid_pairs = valid_pairs[: cfg.data.valid_max_sentences]
        self.tokenizer = self.setup_tokenizer(train_pairs, resume or init)
        self.train_examples = [] if train_pairs is None else self.encode(train_pairs, "train")
        self.both_ways_examples = self.train_examples + self.reversed_examples(train_pairs)
        self.valid_examples = self.encode(valid_pairs, "valid")
        self.valid_sources = [s for s, _ in valid_pairs]
        self.valid_refs = [r for _, r in valid_pairs]
        self.valid_source_ids = self.tokenizer.encode_src(self.valid_sources)  # BLEU needs every sentence

        model_cfg = OmegaConf.to_object(cfg.model) if OmegaConf.is_config(cfg.model) else ModelConfig(**cfg.model)
        model_cfg.src_vocab_size, model_cfg.tgt_vocab_size = self.tokenizer.src_vocab_size, self.tokenizer.tgt_vocab_size
        self.model_cfg = model_cfg
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model: Transformer = build_model(model_cfg).to(self.device)
        if init is not None and resume is None:
            load_init_weights(self.model, init)
        if t.onednn_linear and not t.compile:
            train_linears_on_onednn(self.model)  # acts on fp32 CPU calls only (autocast, CUDA: nn.Linear)
        self.net: nn.Module = self.model  # what the loop calls: maybe DDP-wrapped, maybe compiled
        if self.dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if t.compile:
            self.net = torch.compile(self.net)  # checkpoints keep self.model's plain state dict
        self.optimizer = build_optimizer(self.model, t)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.progress = Progress()
        self.stop_signal: Optional[int] = None
        self.interrupted = False
        self.bad_steps = 0
        seed_everything(t.seed + self.dist.rank)  # dropout streams differ across ranks
        if resume is not None:
            self.restore(*resume)
        if self.dist.main:
            size = "streamed" if self.streaming else f"{len(self.train_examples)}"
            log.info("model: %s parameters; %s training pairs, %d validation", f"{self.model.num_parameters():,}", size, len(self.valid_examples))
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.progress.step + 1 if resume else None)
        else:
            self.tb = None

    # setup -------------------------------------------------------------------------

    def find_resume(self) -> Optional[tuple[Path, dict]]:
        """The checkpoint to continue from: ``trainer.resume`` (a run directory or file);
        a run directory falls back to its newest readable checkpoint."""
        target = self.cfg.trainer.resume
        if not target:
            return None
        p = Path(target).expanduser()
        if p.is_dir():
            found = newest_valid_checkpoint(p / CHECKPOINT_DIR)
            if found is None:
                raise UserError(f"trainer.resume={target}: no readable checkpoint in {p / CHECKPOINT_DIR}")
            if found[0].name != "last.pt":
                log.warning("resuming from %s (last.pt was missing or unreadable)", found[0])
            return found
        path = resolve_checkpoint(str(p), "last.pt")
        return path, load_checkpoint(path)

    def setup_tokenizer(self, train_pairs: Optional[list[Pair]], resume) -> Tokenizer:
        """Reuse the run's tokenizer (resume) or trainer.init_from's, else train BPE on rank 0 and share it; a
        streamed corpus trains it on its first ``data.tokenizer_sample`` pairs."""
        if resume is not None:
            tok = Tokenizer.from_state(resume[1]["tokenizer"])
        else:
            tok = Tokenizer.load(self.run_dir)
            if tok is None and self.dist.main:
                d = self.cfg.data
                if train_pairs is None:
                    from transformer.data.streaming import stream_pairs

                    train_pairs = list(itertools.islice(stream_pairs(d), d.tokenizer_sample))
                tok = build_tokenizer(train_pairs, d.vocab_size, d.joint_vocab, d.tokenizer_sample)
            if self.dist.world > 1:
                box = [tok.to_state() if self.dist.main else None]
                dist.broadcast_object_list(box, src=0)
                tok = Tokenizer.from_state(box[0])
        if self.dist.main:
            tok.save(self.run_dir)
        return tok

    def reversed_examples(self, train_pairs: Optional[list[Pair]]) -> list[Example]:
        """Each training pair as target -> source, for the first trainer.bidirectional_epochs
        (BiT, Ding et al. 2021: both directions through one model warm it up on twice the
        data; no language tags, the source's language tells the direction)."""
        if not self.cfg.trainer.bidirectional_epochs:
            return []
        if train_pairs is None or not self.tokenizer.joint:
            raise UserError("trainer.bidirectional_epochs needs data.joint_vocab=true and an in-memory corpus (not data.streaming)")
        return self.encode([(t, s) for s, t in train_pairs], "train, reversed")

    def encode(self, pairs: list[Pair], name: str) -> list[Example]:
        return encode_examples(*self.tokenizer.encode_pairs(pairs), self.max_len, f"{self.cfg.data.name} {name}")

    @property
    def max_len(self) -> int:
        return min(self.cfg.data.max_len, self.cfg.model.max_positions)

    # checkpoints -------------------------------------------------------------------

    def checkpoint(self) -> dict:
        rngs = [rng_state()]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, rng_state())
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "model_config": vars(self.model_cfg).copy(),
            "tokenizer": self.tokenizer.to_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": vars(self.progress).copy(),
            "rng": rngs,
            "world_size": self.dist.world,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self, best: bool = False) -> None:
        """Write last.pt and a step checkpoint, best.pt when best; keep the newest
        trainer.keep_last step checkpoints (or trainer.average_last, if more) and those at
        multiples of trainer.keep_every."""
        ckpt = self.checkpoint()  # collective under DDP: every rank calls save
        if not self.dist.main:
            return
        t = self.cfg.trainer
        atomic_save(ckpt, self.ckpt_dir / "last.pt")  # first: a crash before the step file leaves last.pt the newest
        atomic_save(ckpt, self.ckpt_dir / f"step_{self.progress.step:08d}.pt")
        if best:
            atomic_save(ckpt, self.ckpt_dir / "best.pt")
        for old in list_step_checkpoints(self.ckpt_dir)[: -max(t.keep_last, t.average_last, 1)]:
            if not (t.keep_every and checkpoint_step(old) % t.keep_every == 0):
                old.unlink(missing_ok=True)

    def restore(self, path: Path, ckpt: dict) -> None:
        if ckpt["tokenizer"] != self.tokenizer.to_state():
            raise UserError(f"{path}: checkpoint vocabulary differs from the run's tokenizer")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not fit model config ({first_line(e)})") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(**ckpt["progress"])
        if ckpt["world_size"] == self.dist.world:
            set_rng_state(ckpt["rng"][self.dist.rank])
        else:
            # shards interleave, so the ranks together consumed the epoch's first world x position batches
            self.progress.batch_in_epoch = self.progress.batch_in_epoch * ckpt["world_size"] // self.dist.world
            log.warning("resuming a %d-process run with %d processes: batches continue, dropout randomness differs", ckpt["world_size"], self.dist.world)
        if self.dist.main:
            self.truncate_metrics(self.progress.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.progress.step, self.progress.epoch, self.progress.batch_in_epoch)

    # the loop ----------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> Iterator[list[Example]]:
        """This rank's batches of ``epoch``, a pure function of the seed and the epoch."""
        d, seed = self.cfg.data, self.cfg.trainer.seed
        if self.streaming:
            from transformer.data.streaming import stream_batches

            return stream_batches(d, self.tokenizer, self.max_len, seed, epoch, self.dist.rank, self.dist.world)
        examples = self.both_ways_examples if epoch < self.cfg.trainer.bidirectional_epochs else self.train_examples
        lengths = [(len(e.src), len(e.tgt) - 1) for e in examples]
        batches = shard(token_batches(lengths, d.max_tokens, seed, epoch), self.dist.rank, self.dist.world)
        return ([examples[i] for i in b] for b in batches)

    def train_step(self, group: list[list[Example]]) -> dict:
        """One optimizer update over ``group`` (update_freq batches); see accumulate_gradients."""
        t = self.cfg.trainer
        self.net.train()
        batches = [collate(examples, self.model_cfg.pad_id).to(self.device) for examples in group]
        n_tokens = torch.tensor(float(sum(b.n_tokens for b in batches)), device=self.device)
        if self.dist.world > 1:
            dist.all_reduce(n_tokens)
        loss_sum, nll_sum = accumulate_gradients(
            self.net, batches, n_tokens, label_smoothing=t.label_smoothing, precision=t.precision,
            scaler=self.scaler, world=self.dist.world, rdrop_alpha=t.rdrop_alpha,
        )
        if self.dist.world > 1:  # before the finiteness test, so every rank takes the same decision
            dist.all_reduce(loss_sum)
            dist.all_reduce(nll_sum)
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm if t.clip_norm > 0 else float("inf"))
        finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        lr = lr_at(self.progress.step + 1, t, self.model_cfg.d_model)
        if finite or t.precision == "fp16":
            set_lr(self.optimizer, lr)
            self.scaler.step(self.optimizer)  # the scaler skips fp16 overflow steps itself
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "finite": finite,
            "loss": (loss_sum / n_tokens).item(),
            "nll": (nll_sum / n_tokens).item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "tokens": int(n_tokens.item()),
        }

    def guard(self, stats: dict) -> bool:
        """False for a NaN/inf step (skipped); stop after trainer.max_bad_steps in a row,
        keeping the weights from before the problem."""
        if stats["finite"] or self.cfg.trainer.precision == "fp16" and math.isfinite(stats["loss"]):
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped", self.progress.step + 1, stats["loss"], stats["grad_norm"])
        if self.bad_steps >= self.cfg.trainer.max_bad_steps:
            self.save()
            raise UserError(
                f"{self.bad_steps} consecutive non-finite steps after step {self.progress.step}: stopped; weights from before "
                f"the problem are in {self.ckpt_dir / 'last.pt'} (lower trainer.lr, or use fp32/bf16)"
            )
        return False

    def run(self) -> dict:
        t = self.cfg.trainer
        start = time.time() - self.progress.elapsed
        window = {"tokens": 0, "time": time.time()}
        bar = None
        if t.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.progress.step, desc="train", dynamic_ncols=True)
        done = self.progress.step >= t.max_steps
        with self.catch_signals():
            while not done:
                batches = itertools.islice(self.epoch_batches(self.progress.epoch), self.progress.batch_in_epoch, None)
                for group in chunked(batches, t.update_freq):
                    stats = self.train_step(group)
                    self.progress.batch_in_epoch += len(group)
                    if not self.guard(stats):
                        continue
                    self.progress.step += 1
                    self.progress.elapsed = time.time() - start
                    window["tokens"] += stats["tokens"]
                    step = self.progress.step
                    if bar is not None:
                        bar.update(1)
                    if step % t.log_every == 0 or step == 1:
                        now = time.time()
                        stats["tokens_per_s"] = window["tokens"] / max(now - window["time"], 1e-9)
                        window = {"tokens": 0, "time": now}
                        self.log_train(stats, bar)
                    stop = self.stop_reason(start)
                    if stop == "signal":  # save at once: no validation when the machine is being taken away
                        log.warning("received signal %d: saved a checkpoint at step %d; continue with trainer.resume=%s", self.stop_signal or 0, step, self.run_dir)
                        self.interrupted = True
                        self.save()
                    elif step % t.eval_every == 0 or stop:
                        best = self.validate()
                        if t.patience > 0 and self.progress.evals_without_gain >= t.patience:
                            log.info("early stop: no better validation BLEU in %d evaluations (best %.2f at step %d)", t.patience, self.progress.best_bleu, self.progress.best_step)
                            stop = "patience"
                        self.save(best=best)
                    elif t.save_every and step % t.save_every == 0:
                        self.save()
                    if stop:
                        done = True
                        break
                else:
                    if self.progress.batch_in_epoch == 0:
                        raise UserError(f"data.max_tokens={self.cfg.data.max_tokens} gives no batches for {self.dist.world} processes")
                    self.progress.epoch += 1
                    self.progress.batch_in_epoch = 0
                    if t.max_epochs and self.progress.epoch >= t.max_epochs:
                        best = self.validate()
                        self.save(best=best)
                        done = True
        if bar is not None:
            bar.close()
        return {"step": self.progress.step, "best_valid_bleu": self.progress.best_bleu, "best_step": self.progress.best_step, "minutes": (time.time() - start) / 60, "interrupted": self.interrupted}

    def stop_reason(self, start: float) -> str:
        """Why to stop after this step ("" to go on): signal, time or steps. Under DDP every
        rank gets the same answer, since a signal or the clock may reach them apart."""
        t = self.cfg.trainer
        reasons = ("", "steps", "time", "signal")
        if self.stop_signal is not None:
            reason = "signal"
        elif t.max_minutes and (time.time() - start) / 60 >= t.max_minutes:
            reason = "time"
        else:
            reason = "steps" if self.progress.step >= t.max_steps else ""
        if self.dist.world > 1:
            code = torch.tensor(reasons.index(reason), device=self.device)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            reason = reasons[int(code.item())]
        if reason == "time":
            log.info("trainer.max_minutes=%s reached", t.max_minutes)
        return reason

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save and stop; a second one acts at once."""
        def handler(signum, frame):
            self.stop_signal = signum
            signal.signal(signum, previous[signum] or signal.SIG_DFL)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # logging and validation ----------------------------------------------------------

    def log_train(self, stats: dict, bar) -> None:
        if not self.dist.main:
            return
        step = self.progress.step
        record = {"step": step, "epoch": self.progress.epoch, "minutes": round(self.progress.elapsed / 60, 3)}
        record.update({k: stats[k] for k in ("loss", "nll", "grad_norm", "lr", "tokens_per_s")})
        if self.device.type == "cuda":
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.append_metrics(record)
        for k in ("loss", "nll", "grad_norm", "lr", "tokens_per_s"):
            self.tb.add_scalar(f"train/{k}", stats[k], step)
        if "peak_mem_mb" in record:
            self.tb.add_scalar("train/peak_mem_mb", record["peak_mem_mb"], step)
        if bar is not None:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}", lr=f"{stats['lr']:.2e}")
        else:
            log.info("step %d loss %.4f nll %.4f lr %.2e gnorm %.2f %.0f tok/s", step, stats["loss"], stats["nll"], stats["lr"], stats["grad_norm"], stats["tokens_per_s"])

    def truncate_metrics(self, step: int) -> None:
        """Drop log records written after the checkpoint a resumed run starts from (and a
        line cut short by a kill)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                if line.endswith("\n") and json.loads(line)["step"] <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                pass
        path.write_text("".join(kept), encoding="utf-8")

    def append_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def valid_loss(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for b in token_batches([(len(e.src), len(e.tgt)) for e in self.valid_examples], self.cfg.data.max_tokens, 0, 0, shuffle=False):
            batch = collate([self.valid_examples[i] for i in b], self.model_cfg.pad_id).to(self.device)
            with autocast(self.device, self.cfg.trainer.precision):
                keep = batch.tgt_out != batch.pad_id
                _, nll = label_smoothed_loss(self.model(batch.src, batch.tgt_in, keep), batch.tgt_out[keep], 0.0)
            total += nll.item()
            count += batch.n_tokens
        return total / max(count, 1)

    def validate(self) -> bool:
        """Validation NLL and BLEU on rank 0; returns whether this is the best BLEU so far
        (the same answer on every rank)."""
        is_best = torch.zeros((), device=self.device)
        if self.dist.main:
            step = self.progress.step
            nll = self.valid_loss()
            t = self.cfg.trainer
            decode_cfg = DecodeConfig(**{**OmegaConf.to_container(self.cfg.decode), "beam_size": t.eval_beam_size, "n_best": 1, "sampling": False})
            hyps = translate_ids([self.model], self.valid_source_ids, decode_cfg)
            texts = self.tokenizer.decode_tgt([h[0].tokens for h in hyps])
            bleu = sacrebleu.corpus_bleu(texts, [self.valid_refs]).score
            gain = bleu > self.progress.best_bleu
            if gain:
                self.progress.best_bleu, self.progress.best_step = bleu, step
                self.progress.evals_without_gain = 0
            else:
                self.progress.evals_without_gain += 1
            record = {"step": step, "minutes": round(self.progress.elapsed / 60, 3), "valid_nll": nll, "valid_ppl": math.exp(min(nll, 50)), "valid_bleu": bleu}
            self.append_metrics(record)
            self.tb.add_scalar("valid/nll", nll, step)
            self.tb.add_scalar("valid/ppl", record["valid_ppl"], step)
            self.tb.add_scalar("valid/bleu", bleu, step)
            samples = "\n\n".join(f"    src: {s}\n    ref: {r}\n    hyp: {h}" for s, r, h in list(zip(self.valid_sources, self.valid_refs, texts))[:3])
            self.tb.add_text("valid/translations", samples, step)
            log.info("step %d: valid nll %.4f ppl %.2f BLEU %.2f (best %.2f at step %d)", step, nll, record["valid_ppl"], bleu, self.progress.best_bleu, self.progress.best_step)
            is_best.fill_(float(gain))
        if self.dist.world > 1:
            dist.broadcast(is_best, src=0)
            progress = [vars(self.progress)]
            dist.broadcast_object_list(progress, src=0)
            self.progress = Progress(**progress[0])
        return bool(is_best.item())

    def finish(self) -> dict:
        """Averaging, then test scores of the best (or averaged) checkpoint."""
        results: dict = {}
        if not self.dist.main:
            return results
        t = self.cfg.trainer
        final = self.ckpt_dir / "best.pt"
        if self.interrupted:  # stopped by a signal: leave the run as it is, ready to resume
            if self.tb is not None:
                self.tb.close()
            return results
        if t.average_last > 1:
            paths = list_step_checkpoints(self.ckpt_dir)[-t.average_last :]
            atomic_save(average_checkpoints(paths), self.ckpt_dir / "averaged.pt")
            log.info("averaged the weights of %s into %s", ", ".join(p.name for p in paths), self.ckpt_dir / "averaged.pt")
            final = self.ckpt_dir / "averaged.pt"
        if self.tb is not None:
            self.tb.close()
        if self.cfg.evaluate_test and final.exists():
            from transformer.evaluate import evaluate

            decode_cfg = DecodeConfig(**OmegaConf.to_container(self.cfg.decode))
            results["test"] = evaluate(str(final), data=self.cfg.data, split="test", decode=decode_cfg, output=str(self.run_dir / "test.hyp.txt"), device=str(self.device))
        return results


def train(cfg: Any) -> dict:
    """Train with a composed config (``TrainConfig`` node); returns the run's metrics."""
    if not cfg.run_dir:
        raise UserError("run_dir must be set (the CLI sets it to Hydra's output directory)")
    if cfg.trainer.resume and Path(cfg.trainer.resume).is_dir():
        cfg.run_dir = str(Path(cfg.trainer.resume).expanduser())
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    metrics = trainer.run()
    metrics.update(trainer.finish())
    metrics["run_dir"] = str(trainer.run_dir)
    if trainer.dist.main:
        (trainer.run_dir / "results.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return metrics
