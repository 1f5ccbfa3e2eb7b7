"""One metric logger: every record goes to metrics.jsonl, TensorBoard and the progress bar
(or a log line) through ``RunLog.log``; only rank 0 writes."""

from __future__ import annotations

import logging
from pathlib import Path

from transformer.rundir import TRAIN_KEYS, append_record, truncate_records

log = logging.getLogger(__name__)
PLAIN = ("step", "epoch", "minutes")  # record fields that are coordinates, not scalars to plot


def train_record(step: int, epoch: int, elapsed: float, stats: dict, peak_mem_mb: float | None) -> dict:
    """The metrics.jsonl record of a training log line."""
    record = {"step": step, "epoch": epoch, "minutes": round(elapsed / 60, 3), **{k: stats[k] for k in TRAIN_KEYS}}
    if peak_mem_mb is not None:
        record["peak_mem_mb"] = peak_mem_mb
    return record


class RunLog:
    def __init__(self, run_dir: Path, *, enabled: bool, resumed_at: int | None, bar: bool, total: int):
        self.run_dir, self.enabled = run_dir, enabled
        self.tb = self.bar = None
        if not enabled:
            return
        if resumed_at is not None:
            truncate_records(run_dir, resumed_at)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_at + 1 if resumed_at is not None else None)
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=resumed_at or 0, desc="train", dynamic_ncols=True)

    def log(self, group: str, record: dict, text: str | None = None) -> None:
        """Append ``record`` to metrics.jsonl and plot its scalars as ``group/<key>`` (a
        ``group_`` prefix is dropped: valid_bleu -> valid/bleu); ``text`` goes to TensorBoard too."""
        if not self.enabled:
            return
        append_record(self.run_dir, record)
        for key, value in record.items():
            if key not in PLAIN:
                self.tb.add_scalar(f"{group}/{key.removeprefix(group + '_')}", value, record["step"])
        if text is not None:
            self.tb.add_text(f"{group}/translations", text, record["step"])

    def progress(self, record: dict) -> None:
        """A training record on the bar, or as a log line without one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.2e}"
            )
        else:
            log.info(
                "step %d loss %.4f nll %.4f lr %.2e gnorm %.2f %.0f tok/s",
                record["step"],
                record["loss"],
                record["nll"],
                record["lr"],
                record["grad_norm"],
                record["tokens_per_s"],
            )

    def retotal(self, total: int) -> None:
        """A new length for the progress bar (the time budget revised its plan)."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
