"""The composition root: typed config -> objects -> ``Trainer.fit`` -> export and report.

``run.py`` (Hydra) converts the composed config to :class:`RunConfig` and calls
:func:`run_training`. Mixer and objective nodes arrive as plain dicts with ``_target_``
(checked by the method's settings class, ``dograph.settings``) and are built with
``hydra.utils.instantiate``, with runtime objects passed as arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate

from dograph.config import RunConfig
from dograph.data.builder import RunData, build_run_data, load_corpus
from dograph.data.tokenizer import is_pretrained, pretrained_tokenizer, tokenizer_vocab_size
from dograph.distributed import DistContext, barrier, init_distributed, shutdown
from dograph.errors import ConfigError, DographError
from dograph.eval.downstream import check_task_names, evaluate_after_training
from dograph.eval.planted import planted_report
from dograph.host_allocator import tune_host_allocator
from dograph.mixing import Mixer, mixer_name
from dograph.models import build_model, count_parameters, format_count
from dograph.runs.pipeline import (
    StageResult,
    StageSpec,
    git_state,
    run_stages,
    write_stage_summary,
    write_text_atomically,
)
from dograph.runs.summary import print_run_summary
from dograph.runs.sweep import SweepResult, run_sweep
from dograph.train.metrics import MetricsWriter
from dograph.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)
# what a run writes into its directory (launch.json: experiments.runs' wall time; derived: the figures' points)
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "hf", "wandb", "wandb_id", "run_info.json", "mixer", "summary.json",
                 "eval", "launch.json", "derived")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to resume or overwrite."""
    existing = [name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise ConfigError(f"run directory {run_dir} already holds a run ({', '.join(existing)}): pass "
                          "resume=true to continue it, overwrite=true to start over, or set hydra.run.dir")
    if overwrite and is_main:
        for name in existing:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def mixer_class(cfg: RunConfig) -> type[Mixer]:
    """The class ``cfg.mixer._target_`` names (a clear error if it is not a Mixer)."""
    if not isinstance(cfg.mixer, dict) or "_target_" not in cfg.mixer:
        raise ConfigError("mixer must be a config node with a _target_ (choose one with mixer=NAME)")
    try:
        cls = get_class(cfg.mixer["_target_"])
    except Exception as exc:  # hydra wraps import errors of every kind
        raise ConfigError(f"mixer._target_={cfg.mixer['_target_']} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise ConfigError(f"mixer._target_={cfg.mixer['_target_']} is not a dograph.mixing.Mixer")
    return cls


def method_name(cfg: RunConfig) -> str:
    """The method's registered name (``Mixer.name``): its stage directories and stage keys use it."""
    try:
        return mixer_name(mixer_class(cfg))
    except ValueError as exc:
        raise ConfigError(f"mixer._target_={cfg.mixer['_target_']}: {exc}") from None


def plan_stages(cfg: RunConfig) -> list[StageSpec]:
    return mixer_class(cfg).plan_stages(dict(cfg.mixer))


def build_mixer(cfg: RunConfig, data: RunData, dist: DistContext,
                stage_results: dict[str, StageResult] | None = None, sweep: SweepResult | None = None) -> Mixer:
    """Instantiate ``cfg.mixer`` (a ``_target_`` dict) with the run's runtime objects.

    A staged method's mixer also receives the results of its stages (their config nodes,
    ``mixer.<stage>``, are not passed on).
    """
    mixer_class(cfg)
    node = dict(cfg.mixer)
    extra: dict[str, Any] = {}
    if stage_results:
        node = {k: v for k, v in node.items() if k not in {spec.name for spec in plan_stages(cfg)}}
        extra["stage_results"] = stage_results
    if sweep is not None:
        extra["sweep"] = sweep
    try:
        # a partial first: runtime objects passed through instantiate would become DictConfigs
        make = instantiate(node, _partial_=True)
        mixer = make(domains=list(data.corpus.domains), natural_mixture=list(data.corpus.natural_mixture),
                     dist=dist, seed=cfg.seed, **extra)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, DographError):
            raise cause from None
        raise ConfigError(f"cannot build mixer {cfg.mixer.get('_target_')}: {exc}") from exc
    if not isinstance(mixer, Mixer):
        raise ConfigError(f"mixer._target_={cfg.mixer['_target_']} is not a dograph.mixing.Mixer")
    return mixer


# Overrides that say where a run lives or how a command continues it, never what it trains: left out of
# its fingerprint (docs/design.md section 1.4). Hydra's own overrides (hydra.*, hydra/...) are left out too.
FINGERPRINT_IGNORED = ("resume", "overwrite", "tags", "paths.output_root", "paths.cache_dir",
                       "trainer.stop_after_steps", "logger", "trainer.progress", "trainer.log_every")


def canonical_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` as Hydra parses them (``key=value``, normalised), sorted, without :data:`FINGERPRINT_IGNORED`.

    Parsing makes ``'a=[1, 2]'`` and ``a=[1,2]`` one override; sorting makes the order of a
    command line (or of a multirun job's overrides) irrelevant.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = {f"{o.get_key_element()}={o.get_value_element_as_str()}"
            for o in OverridesParser.create().parse_overrides(list(overrides))
            if not o.is_hydra_override() and o.key_or_group not in FINGERPRINT_IGNORED}
    return sorted(kept)


def overrides_fingerprint(overrides: list[str]) -> str:
    """16 hex digits naming what a command line asked for (the results index matches runs by it)."""
    text = json.dumps(canonical_overrides(overrides))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hydra_task_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides of the Hydra job whose directory is ``run_dir`` (None: no such job).

    A stage or sweep proxy trains in another directory under the same job: it gets None.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if Path(hydra_cfg.runtime.output_dir).resolve() != run_dir.resolve():
        return None
    return [str(o) for o in hydra_cfg.overrides.task]


def write_run_info(run_dir: Path, cfg: RunConfig, dist: DistContext, n_params: int) -> None:
    """Provenance next to the metrics: git state, versions, machine, parameter count, and the overrides it ran with.

    ``overrides`` (canonical) and their ``fingerprint`` are what ``experiments/`` matches a run by;
    a run made without Hydra (or a stage) has neither and matches no request.
    """
    packages = {}
    for name in ("torch", "transformers", "datasets", "hydra-core", "faiss-cpu", "faiss-gpu", "cvxpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    overrides = hydra_task_overrides(run_dir)
    info = {"git": git_state(), "packages": packages, "python": sys.version.split()[0],
            "machine": platform.platform(), "device": str(dist.device), "world_size": dist.world_size,
            "parameters": n_params, "command": sys.argv,
            "overrides": None if overrides is None else canonical_overrides(overrides),
            "fingerprint": None if overrides is None else overrides_fingerprint(overrides), "config": asdict(cfg)}
    write_text_atomically(run_dir / "run_info.json", json.dumps(info, indent=2, default=str))  # it decides resumes


def settings_lines(label: str, node: dict[str, Any], indent: str = "") -> list[str]:
    """``label: key=value ...``, then one indented line per nested node (a ``_target_`` node names its class)."""
    leaves = " ".join(f"{k}={_setting_text(v)}" for k, v in node.items()
                      if not isinstance(v, dict) and not k.startswith("_"))
    lines = [f"{indent}{label}: {leaves or '(no settings)'}"]
    for key, value in node.items():
        if isinstance(value, dict):
            target = value.get("_target_")
            name = getattr(get_class(target), "name", "") if target else ""
            lines += settings_lines(f"{key} ({name})" if name else key, value, indent + "  ")
    return lines


def _setting_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_setting_text(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def print_mixer_settings(cfg: RunConfig) -> None:
    """The mixer's effective settings, once at start: what the yaml files, model_mixer and the command made of them."""
    print("\n".join(settings_lines(f"mixer {method_name(cfg)}", dict(cfg.mixer))))


def dry_run(cfg: RunConfig) -> None:
    """``trainer.max_steps=0``: build the model only (on the meta device: no memory) and print its size."""
    print_mixer_settings(cfg)
    vocab = tokenizer_vocab_size(cfg.tokenizer)  # a pretrained tokenizer is loaded for its size
    with torch.device("meta"):
        model = build_model(cfg.model, vocab, seed=cfg.seed)
    n = count_parameters(model)
    print(f"model: {cfg.model.family} {cfg.model.n_layer} layers x {cfg.model.d_model}, "
          f"{cfg.model.n_head} heads, vocabulary {vocab} ({cfg.tokenizer}): "
          f"{n:,} parameters ({format_count(n)})")


def check_before_work(cfg: RunConfig) -> None:
    """What the typed config cannot check and must fail in one line before the corpus is read.

    A pretrained tokenizer (a directory or a hub name) is loaded once here for that: a missing
    directory or no network is known at once, not after the corpus and the stages.
    """
    if is_pretrained(cfg.tokenizer):
        pretrained_tokenizer(cfg.tokenizer)


def export_hf(trainer: Trainer, tokenizer: Any, run_dir: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` of model and tokenizer; ``state_dict``: the full one gathered under fsdp."""
    out = run_dir / "hf"
    trainer.model.save_pretrained(str(out), state_dict=state_dict)
    tokenizer.save_pretrained(str(out))
    return out


def run_training(cfg: RunConfig, run_dir: Path) -> TrainResult | None:
    """Train as configured; returns the result (None for a dry run)."""
    if cfg.trainer.max_steps == 0:
        dry_run(cfg)
        return None
    check_before_work(cfg)
    dist = init_distributed(cfg.trainer.device)
    try:
        cls = mixer_class(cfg)
        if dist.is_main:
            print_mixer_settings(cfg)
        specs = cls.plan_stages(dict(cfg.mixer))
        sweep = None
        if cls.has_sweep:
            corpus = load_corpus(cfg.dataset, cache_dir=Path(cfg.paths.cache_dir), dist=dist)
            plan = cls.plan_sweep(dict(cfg.mixer), list(corpus.domains), list(corpus.natural_mixture))
            sweep = run_sweep(cfg, method_name(cfg), plan, corpus.domains, dist, train_run)
        results = run_stages(cfg, method_name(cfg), specs, dist, train_run) if specs else {}
        if not results and sweep is None:
            return train_run(cfg, run_dir, dist)
        result = train_run(cfg, run_dir, dist, stage_results=results or None, sweep=sweep)
        if dist.is_main:
            earlier = [*(r for r in results.values()), *(o.result for o in (sweep.successful if sweep else []))]
            write_stage_summary(run_dir, earlier)
            print_stage_costs(earlier, sweep)
        return result
    finally:
        shutdown(dist)


def print_stage_costs(results: list[StageResult], sweep: SweepResult | None = None) -> None:
    """What the earlier runs of a method cost (a sweep in one line)."""
    proxies = {id(o.result) for o in sweep.successful} if sweep else set()
    for r in results:
        if id(r) not in proxies:
            how = "reused" if r.reused else "trained"
            print(f"stage {r.method}/{r.name}: {how}, {r.steps} steps, {r.wall_time_s:.0f} s on {r.device} "
                  f"({r.run_dir})")
    if sweep is not None:
        trained = sum(not o.result.reused for o in sweep.successful)
        print(f"sweep {sweep.method}/{sweep.name}: {len(sweep.successful)} of {len(sweep.outcomes)} proxies "
              f"succeeded ({trained} trained now), {sweep.wall_time_s():.0f} s of training in all; table "
              f"{sweep.table}")


def write_run_summary(run_dir: Path, result: TrainResult, domains: list[str], natural_mixture: list[float],
                      planted: dict[str, Any] | None = None) -> None:
    """``summary.json``: the record that a run finished (the experiment index reads it; a crashed run has none).

    Written atomically, after the final evaluation and the export. ``train_time_s`` is training only;
    validation and checkpoint seconds are ``eval_time_s`` and ``ckpt_time_s``; ``completed_at`` (UTC)
    lets the index pick the run completed last when several match one request. ``natural_mixture``
    (per domain) is what ``val/avg_loss`` averages with, kept so a record can average other subsets;
    ``planted`` is a planted corpus's evaluation-only report (``dograph.eval.planted``).
    """
    state = result.state
    completed = datetime.now(UTC).isoformat(timespec="milliseconds")
    summary = {"status": "complete", "completed_at": completed,
               "steps": state.step, "tokens_seen": state.tokens_seen, "train_time_s": state.elapsed,
               "eval_time_s": state.eval_time_s, "ckpt_time_s": state.ckpt_time_s,
               "skipped_steps": state.skipped_steps, "domains": domains,
               "natural_mixture": dict(zip(domains, natural_mixture, strict=True)), "final_eval": result.final_eval}
    if planted is not None:
        summary["planted"] = planted
    weights = result.weight_summary
    if weights.steps:
        sampled, effective = weights.mean_mixtures()
        summary["weights"] = {"reweighted_steps": weights.steps, "mean_ess": weights.mean_ess,
                              "min_ess": weights.ess_min, "sampled_mixture": sampled, "effective_mixture": effective}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(run_dir / "summary.json")


def train_run(cfg: RunConfig, run_dir: Path, dist: DistContext, stage_results: dict[str, StageResult] | None = None,
              sweep: SweepResult | None = None, quiet: bool = False) -> TrainResult:
    """One training run; ``quiet`` (a sweep's proxies) ends with one line instead of the full summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite, is_main=dist.is_main)
    barrier(dist)
    seed_everything(cfg.seed)
    if cfg.eval.task_names:
        check_task_names(cfg)  # an unknown task fails now, not after training
    data = build_run_data(cfg.dataset, tokenizer_name=cfg.tokenizer, seq_len=cfg.trainer.seq_len,
                          cache_dir=Path(cfg.paths.cache_dir), seed=cfg.seed, dist=dist)
    tok = data.tokenizer
    model = build_model(cfg.model, len(tok), bos_id=tok.eos_token_id, eos_id=tok.eos_token_id, seed=cfg.seed)
    model.to(dist.device)
    n_params = count_parameters(model)
    mixer = build_mixer(cfg, data, dist, stage_results, sweep)
    if dist.is_main:
        print(f"model: {n_params:,} parameters ({format_count(n_params)}); data: {data.corpus.description}, "
              f"{len(data.corpus.domains)} domains; device {dist.device} x {dist.world_size}; run dir {run_dir}")
        write_run_info(run_dir, cfg, dist, n_params)
    if cfg.trainer.compile:
        model.compile()  # in place: state_dict keys and the HF export stay unchanged
    writer = MetricsWriter(run_dir, cfg.logger, enabled=dist.is_main, config=asdict(cfg),
                           run_name=run_dir.name or "run", resume=cfg.resume)
    trainer = Trainer(cfg.trainer, model, data, mixer, dist=dist, run_dir=run_dir, writer=writer)
    try:
        result = trainer.fit(resume=cfg.resume)
        result.outputs = mixer.outputs() if dist.is_main else {}
        planted = None
        if not result.stopped_early:  # every rank: the fresh-document loss is a collective like validation
            planted = planted_report(cfg.dataset, Path(cfg.paths.cache_dir), tok, cfg.trainer.seq_len,
                                     trainer.evaluate_windows)
        exporting = cfg.trainer.export_hf and not result.stopped_early
        full_state = trainer.full_model_state() if exporting else None  # a collective under fsdp
        if dist.is_main and not result.stopped_early:
            export = export_hf(trainer, tok, run_dir, full_state) if exporting else None
            write_run_summary(run_dir, result, list(data.corpus.domains), list(data.corpus.natural_mixture), planted)
            if quiet:
                print(f"{run_dir.name}: {result.state.step} steps in {result.state.elapsed:.1f} s, validation loss "
                      f"{result.final_eval.get('val/avg_loss', float('nan')):.4f} (natural-mixture average)")
            else:
                print_run_summary(result, data.corpus, mixer, run_dir, export)
        if cfg.eval.task_names and not result.stopped_early:  # rank 0 evaluates, the others wait
            evaluate_after_training(cfg, trainer.model, tok, run_dir, dist, step=result.state.step, writer=writer,
                                    corpus=data.corpus)
    finally:
        writer.close()
    return result


def configure_runtime() -> None:
    """Quiet tokenizers' fork warning and FAISS's loader; keep freed tensor memory mapped
    (dograph/host_allocator.py; ``DOGRAPH_HOST_ALLOCATOR=system`` leaves malloc alone); honour an
    explicit thread count."""
    tune_host_allocator()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if "DOGRAPH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["DOGRAPH_THREADS"]))
