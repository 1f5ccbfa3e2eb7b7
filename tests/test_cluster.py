"""Sweeps through Hydra's own engines: the SLURM launcher (submitit) and the Optuna sweeper
compose from configs/hydra/, and a 3-trial Optuna search runs here with the basic launcher,
maximising the validation BLEU the train entry returns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'transformer[cluster]'")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'transformer[cluster]'")


def test_slurm_launcher_and_optuna_sweeper_compose() -> None:
    from hydra import compose, initialize_config_dir

    from transformer.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train", ["experiment=tiny", "hydra/launcher=slurm", "hydra/sweeper=bleu"], return_hydra_config=True
        )
    launcher, sweeper = cfg.hydra.launcher, cfg.hydra.sweeper
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (
        launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    )  # one process a job; multi-GPU runs use torchrun
    assert sweeper._target_.endswith("optuna_sweeper.OptunaSweeper") and sweeper.direction == "maximize"
    assert all(OmegaConf.select(cfg, key) is not None for key in sweeper.params)  # the search space names real keys


@pytest.mark.slow
def test_optuna_search_of_three_tiny_trials_runs_locally(cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = cli(
        "train",
        "-m",
        "experiment=tiny",
        "hydra/sweeper=bleu",
        "hydra.sweeper.n_trials=3",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "evaluate_test=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    bleus = [json.loads((sweep / job / "results.json").read_text())["best_valid_bleu"] for job in ("0", "1", "2")]
    assert best["best_value"] == max(bleus)  # the sweeper maximised what the runs returned
    assert set(best["best_params"]) == {"trainer.lr", "model.dropout", "trainer.warmup_steps"}
