"""One proxy of a sweep as a Hydra job: ``python -m dograph.runs.sweep_job --multirun job.file=F job.index=0,1,...``.

``dograph.runs.sweep`` launches it when ``mixer.launcher`` is not ``basic``, so Hydra's launcher
plugins (joblib, submitit) run the proxies; each job reads the sweep's description
(``sweep.json``: the main run's config, the method, the sweep, the stage environment) and
trains proxy ``job.index`` exactly as the in-process path does (a pipeline stage: reused when
complete, resumed when interrupted, ``failed.json`` on an error, ``paused.json`` when
``stop_after_steps`` pauses it: the launching run then stops the sweep with one line). The
environment is the launching run's, so the job computes the same stage keys and trains on the
device type that run resolved (``trainer.precision=auto`` means the same precision).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@hydra.main(config_path="../../conf", config_name="sweep_job", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dograph.config import run_config_from_dict
    from dograph.distributed import DistContext, resolve_device
    from dograph.runs.app import configure_runtime, train_run
    from dograph.runs.pipeline import StageEnvironment, StageIncomplete
    from dograph.runs.sweep import SweepSpec, train_proxy

    configure_runtime()
    job = json.loads(Path(cfg.job.file).read_text())
    spec = SweepSpec(**{**job["spec"], "launcher_overrides": tuple(job["spec"]["launcher_overrides"])})
    env = StageEnvironment(**job["environment"])
    dist = DistContext(device=resolve_device(env.device_type))
    try:
        outcome = train_proxy(run_config_from_dict(job["main"]), job["method"], spec, int(cfg.job.index), dist,
                              train_run, env)
    except StageIncomplete as exc:  # paused.json is written: the launching run stops the sweep
        log.info("proxy %s paused: %s", cfg.job.index, exc)
        return
    log.info("proxy %d: %s", outcome.index, "done" if outcome.ok else f"failed ({outcome.error})")


if __name__ == "__main__":
    main()
