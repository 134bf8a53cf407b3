"""Evaluate a finished run's ``hf/`` export with lm-eval: ``python -m dograph.eval RUN_DIR [key=value ...]``.

The run's own config (``RUN_DIR/.hydra/config.yaml``, else ``run_info.json``) gives the data
(for the local tasks) and the context length; overrides change ``eval.*`` (and
``paths.*``) only, e.g. ``eval.tasks=[piqa,sciq] eval.limit=20`` or ``eval=local``.
Results go where the end-of-training evaluation writes them (``dograph.eval.downstream``).
Errors a user can fix print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from dograph.config import (
    CONF_DIR,
    EvalConfig,
    RunConfig,
    load_group_option,
    register_configs,
    to_config_object,
    to_run_config,
)
from dograph.errors import ConfigError, DataError, DographError
from dograph.host_allocator import tune_host_allocator

OVERRIDABLE = ("eval.", "paths.")


def _saved_config(run_dir: Path) -> Any:
    """The run's composed config as an OmegaConf node (interpolations resolved later)."""
    from omegaconf import OmegaConf

    hydra_config, run_info = run_dir / ".hydra" / "config.yaml", run_dir / "run_info.json"
    try:
        if hydra_config.is_file():
            return OmegaConf.load(hydra_config)
        if run_info.is_file():
            return OmegaConf.create(json.loads(run_info.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{run_dir}: cannot read the run's config ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # omegaconf/yaml parse errors
        raise DataError(f"{run_dir}: cannot read the run's config ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    raise DataError(f"{run_dir} holds no run config (.hydra/config.yaml or run_info.json): is it a run directory?")


def _apply_overrides(cfg: Any, overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"bad override: {str(exc).splitlines()[0]}") from None
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if key == "eval" and isinstance(value, str):  # a group choice: conf/eval/<value>.yaml
            cfg.eval = OmegaConf.merge(OmegaConf.structured(EvalConfig), load_group_option("eval", "default", CONF_DIR),
                                       load_group_option("eval", value, CONF_DIR))
        elif key.startswith(OVERRIDABLE) and not override.is_delete():
            OmegaConf.update(cfg, key, value, merge=False)
        else:
            raise ConfigError(f"override {override.input_line}: only eval=NAME, eval.* and paths.* can be changed "
                              "here (the rest describes the trained run)")


def _eval_node(cfg: Any) -> Any:
    """A detached copy of ``cfg.eval`` (assigning to ``cfg.eval`` later rewrites the attached node in place)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg.eval)


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> RunConfig:
    """The run's validated config with ``overrides`` applied (a run saved before ``eval`` existed gets its defaults).

    The run is validated as it was trained (its saved ``eval``) and the evaluation settings on
    their own, so that a run trained with ``trainer.parallelism=fsdp``, where lm-eval cannot run
    after training, is evaluated here like any other (``RunConfig.for_evaluation``).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    saved = _saved_config(run_dir)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), saved)
        trained_eval = _eval_node(cfg)
        _apply_overrides(cfg, list(overrides))
        later_eval = _eval_node(cfg)
        cfg.eval = trained_eval
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{run_dir}: {str(exc).splitlines()[0]}") from None
    return to_run_config(cfg).for_evaluation(to_config_object(later_eval))


def _step(run_dir: Path) -> int | None:
    """The run's last step: summary.json, else the last metrics.jsonl record; None if unknown."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if line.strip()]
        return max((s for s in steps if isinstance(s, int)), default=None)
    except (OSError, ValueError):
        return None


def load_export(run_dir: Path, device: str) -> tuple[Any, Any]:
    """Model and tokenizer of ``RUN_DIR/hf`` on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = run_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        raise DataError(f"{hf_dir} holds no model: the run was not exported (trainer.export_hf=false) or did not "
                        "finish")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{hf_dir}: cannot load the model ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0]})") from None
    return model.to(device).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dograph.eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds hf/ and .hydra/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="eval=NAME, eval.KEY=VALUE or paths.KEY=VALUE")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda")
    parser.add_argument("-v", "--verbose", action="store_true", help="show lm-eval's own logs")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from dograph.eval.downstream import evaluate, print_result

    started = time.time()
    try:
        tune_host_allocator()
        run_dir = args.run_dir
        if not run_dir.is_dir():
            raise DataError(f"{run_dir} is not a directory")
        cfg = load_run_config(run_dir, args.overrides)
        if not cfg.eval.task_names:
            raise ConfigError("no tasks: name some (eval.tasks=paper9, eval=local or eval.tasks=[piqa,sciq])")
        print(f"[1/3] loading {run_dir / 'hf'}", file=sys.stderr, flush=True)
        model, tokenizer = load_export(run_dir, args.device)
        print(f"[2/3] evaluating {', '.join(cfg.eval.task_names)} on {model.device} (lm-eval; progress bars follow)",
              file=sys.stderr, flush=True)
        result = evaluate(model, tokenizer, cfg, run_dir, step=_step(run_dir), verbose=args.verbose)
    except DographError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[3/3] done in {time.time() - started:.0f} s; wrote {run_dir / 'eval'}/lm_eval.json, scores.json and a "
          "downstream record in metrics.jsonl", file=sys.stderr)
    print_result(result)
    print(f"\nlm-eval's CLI gives the same numbers with: {result.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
