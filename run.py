"""Train a language model with a data mixer: ``python run.py mixer=dograph model=gpt2_medium``.

Hydra composes ``conf/config.yaml`` (see docs/configuration.md); this file
only converts it to the typed :class:`dograph.config.RunConfig` and hands it over.
Errors a user can fix (bad values, missing data, no network) print one message, no trace.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dograph.config import register_configs, to_run_config
from dograph.errors import DographError

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dograph.runs.app import configure_runtime, run_training

    try:
        configure_runtime()
        run_training(to_run_config(cfg), Path(HydraConfig.get().runtime.output_dir))
    except DographError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
