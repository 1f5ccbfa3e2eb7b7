"""``transformer-distill``: compose the ``distill`` config, translate the training data with
the teacher and train the student on it (distill.distill); print the distillation summary."""

from __future__ import annotations

import json

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from transformer.allocator import use_fast_allocator
from transformer.cli import hydra_entry


def command(cfg: DictConfig) -> float:
    """The command's body: the student's validation BLEU is what Hydra sweepers optimise."""
    from transformer.distill import distill

    if not cfg.run_dir:  # resolved once: a new config holding Hydra's output directory
        cfg = OmegaConf.merge(cfg, {"run_dir": HydraConfig.get().runtime.output_dir})
    metrics = distill(cfg)
    print(json.dumps(metrics.get("distill", {}), indent=2))
    return metrics["best_valid_bleu"]


def main() -> None:
    """The transformer-distill command, under mimalloc (see cli/train.py)."""
    use_fast_allocator()
    hydra_entry("distill", command)


if __name__ == "__main__":
    main()
