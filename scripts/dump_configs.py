"""Print every composed config a user can start from: transformer-train's default and each
experiment, transformer-distill's, -evaluate's and -decode's, and transformer-serve's schema.

Run it before and after a change to the configs or the schemas and diff the two outputs: a
refactor of where defaults live must leave every effective value as it was.

    python scripts/dump_configs.py > before.yaml   # ... change ...
    python scripts/dump_configs.py | diff before.yaml -
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from transformer.config import config_dir, register_configs
from transformer.serve.settings import ServeRunConfig

REQUIRED = {"decode": ["checkpoint=CKPT"], "evaluate": ["checkpoint=CKPT"], "distill": ["teacher=CKPT"]}


def compositions() -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every composition dumped."""
    experiments = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
    runs = [("train", []), *(("train", [f"experiment={name}"]) for name in experiments)]
    return [*runs, ("distill", REQUIRED["distill"]), ("evaluate", REQUIRED["evaluate"]), ("decode", REQUIRED["decode"])]


def dump(config_name: str, overrides: list[str]) -> str:
    """One composition as YAML, its values typed by the schema (enums by their names)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_yaml(OmegaConf.to_container(cfg, enum_to_str=True), sort_keys=True)


def main() -> None:
    register_configs()
    for config_name, overrides in compositions():
        sys.stdout.write(f"### {config_name} {' '.join(overrides)}\n{dump(config_name, overrides)}\n")
    serve = OmegaConf.to_container(OmegaConf.structured(ServeRunConfig), enum_to_str=True)
    sys.stdout.write(f"### serve\n{OmegaConf.to_yaml(serve, sort_keys=True)}")


if __name__ == "__main__":
    main()
