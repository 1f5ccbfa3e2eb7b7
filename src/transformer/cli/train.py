"""``transformer-train``: compose the ``train`` config, train and test (evaluate.train_and_test),
print the scores as JSON and write the run card."""

from __future__ import annotations

import json
import os

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from transformer.allocator import use_fast_allocator
from transformer.cli import hydra_entry


def command(cfg: DictConfig) -> float:
    """The command's body: the validation BLEU it returns is what Hydra sweepers optimise."""
    from transformer.evaluate import train_and_test

    if not cfg.run_dir:  # resolved once: a new config holding Hydra's output directory
        cfg = OmegaConf.merge(cfg, {"run_dir": HydraConfig.get().runtime.output_dir})
    if cfg.data.monolingual_tgt:  # back-translation first (docs/distillation.md)
        from transformer.config import TrainConfig, typed
        from transformer.distill import back_translated

        cfg = back_translated(typed(cfg, TrainConfig))
    metrics = train_and_test(cfg)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one summary and report, from the process that wrote the run
        from transformer.report import write_run_report

        print(
            json.dumps(
                {k: v for k, v in metrics.items() if k != "test"}
                | {"test": {k: v for k, v in metrics.get("test", {}).items() if not k.endswith("detail")}},
                indent=2,
            )
        )
        write_run_report(metrics["run_dir"], cfg, metrics)
    return metrics["best_valid_bleu"]


def run() -> None:
    """The command in this process as it is (called from Python, it never re-executes itself)."""
    hydra_entry("train", command)


def main() -> None:
    """The transformer-train command: ``run`` in a process running under mimalloc."""
    use_fast_allocator()
    run()


if __name__ == "__main__":
    main()
