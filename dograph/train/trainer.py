"""The training loop: sample -> step (runner chosen from the mixer's needs) -> clip -> AdamW -> log/eval/ckpt.

The trainer names no mixer; it only asks the mixer for a sampling mixture after each step
and hands it to the step runner (``dograph.step.runners``). Everything stateful goes through
one checkpointer by name (``dograph.train.checkpointer``), so ``resume=true`` continues exactly as if the
run had never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dograph.config import TrainerConfig
from dograph.data.builder import RunData
from dograph.distributed import DistContext
from dograph.errors import ConfigError
from dograph.mixing import Mixer
from dograph.parallel import checkpoint_blocks, shard_model
from dograph.step.build import build_step_runner
from dograph.step.runners import StepContext
from dograph.train.checkpointer import Checkpointer, RNGState
from dograph.train.metrics import MetricAccumulator, MetricsWriter
from dograph.train.optim import build_optimizer, learning_rate, set_learning_rate
from dograph.train.validation import evaluate
from dograph.train.weight_stats import WeightSummary, global_window, step_weight_stats

log = logging.getLogger(__name__)
WEIGHT_STATS = "_weight_stats"  # accumulator key of the per-step weight statistics (reduced at log time)


@dataclass
class TrainState:
    """The loop's own counters; ``Stateful`` (``state_dict``/``load_state_dict``) for the checkpointer."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # training seconds over all sessions of the run: validation and checkpoints excluded
    eval_time_s: float = 0.0  # validation seconds (periodic and final evaluations)
    ckpt_time_s: float = 0.0  # checkpoint seconds (a checkpoint holds those of the saves before it)
    skipped_steps: int = 0
    weight_summary: WeightSummary = field(default_factory=WeightSummary)  # saved as its state_dict()

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """In place: the trainer and the checkpointer hold this one object."""
        values = {**state_dict, "weight_summary": WeightSummary.from_state(state_dict.get("weight_summary"))}
        restored = TrainState(**values)
        for f in fields(self):
            setattr(self, f.name, getattr(restored, f.name))


@dataclass
class TrainResult:
    state: TrainState
    final_eval: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    weight_summary: WeightSummary = field(default_factory=WeightSummary)
    outputs: dict[str, Any] = field(default_factory=dict)  # the mixer's outputs (pipeline stages)


def timed_part(part: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Count a ``Trainer`` method's seconds in ``state.<part>``: they differ between methods, so they are kept
    out of the training time (``state.elapsed``) and reported beside it."""
    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(self: Trainer, *args: Any, **kwargs: Any) -> Any:
            self.synchronize()  # queued training kernels belong to the training time
            begun = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                self.synchronize()
                setattr(self.state, part, getattr(self.state, part) + time.perf_counter() - begun)
        return timed
    return wrap


class SessionClock:
    """The training seconds of one session: its wall time less the validation and checkpoint seconds it spent."""

    def __init__(self, state: TrainState) -> None:
        self.state, self.started = state, time.perf_counter()
        self.base = (state.elapsed, state.eval_time_s, state.ckpt_time_s)

    def update(self) -> None:
        """Set ``state.elapsed`` to the run's training seconds so far."""
        elapsed, evals, ckpts = self.base
        other = self.state.eval_time_s - evals + self.state.ckpt_time_s - ckpts
        self.state.elapsed = elapsed + time.perf_counter() - self.started - other


def micro_batch_plan(cfg: TrainerConfig, world: int) -> tuple[int, int]:
    """(per-rank micro-batch size, accumulation steps) for the configured global batch."""
    per_rank, remainder = divmod(cfg.batch_size, world)
    if remainder:
        raise ConfigError(f"trainer.batch_size={cfg.batch_size} must be divisible by the world size {world}")
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"trainer.micro_batch_size={micro} must divide the per-rank batch {per_rank} "
                          f"(trainer.batch_size={cfg.batch_size} over {world} ranks)")
    return micro, per_rank // micro


class Trainer:
    def __init__(self, cfg: TrainerConfig, model: nn.Module, data: RunData, mixer: Mixer, *,
                 dist: DistContext, run_dir: Path, writer: MetricsWriter) -> None:
        self.cfg, self.model, self.data, self.mixer = cfg, model, data, mixer
        self.dist, self.run_dir, self.writer = dist, run_dir, writer
        self.micro_batch, self.accumulation = micro_batch_plan(cfg, dist.world_size)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dist.device.type == "cuda")
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)  # before sharding (torch docs: checkpoint, then fully_shard)
        self.sharded = cfg.parallelism == "fsdp" and dist.enabled  # one process: nothing to shard
        if self.sharded:
            shard_model(model, dist, mixed_precision=self.bf16 and dist.device.type == "cuda")
        self.optimizer = build_optimizer(model, cfg)
        context = StepContext(model, mixer, dist, cfg.batch_size, self.autocast,
                              lr_at=lambda step: learning_rate(step, cfg), num_domains=len(data.corpus.domains),
                              sharded=self.sharded)
        self.runner = build_step_runner(context, cfg.weighted_update)
        self.state = TrainState()
        self.accumulator = MetricAccumulator(dist.device)
        self.num_domains = len(data.corpus.domains)
        self.checkpointer = Checkpointer(run_dir, dist, model=model, optimizer=self.optimizer, sharded=self.sharded,
                                         keep=cfg.keep_checkpoints, shared={"trainer": self.state, "mixer": mixer},
                                         per_rank={"data": data.sampler, "rng": RNGState(),
                                                   "metrics": self.accumulator})
        # windows of `prefetch` steps per domain are packed ahead (domains are still drawn at step time)
        data.sampler.set_prefetch(cfg.prefetch * self.micro_batch * self.accumulation)
        self.pin = dist.device.type == "cuda"  # page-locked host batches, copied asynchronously

    def synchronize(self) -> None:
        """Wait for queued CUDA work, so a clock read after it counts that work (nothing on CPU)."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)

    # ---- checkpoints (dograph.train.checkpointer) ------------------------------------------
    @timed_part("ckpt_time_s")
    def save(self) -> None:
        self.checkpointer.save(self.state.step)

    def restore(self) -> bool:
        """Resume from the checkpoint rank 0 chooses; the records written after its step are dropped."""
        if self.checkpointer.restore() is None:
            return False
        self.writer.truncate_after(self.state.step)
        return True

    def full_model_state(self) -> dict[str, Any] | None:
        """The unsharded model state on rank 0 under fsdp (a collective: every rank calls it); None otherwise."""
        return self.checkpointer.full_model_state()

    # ---- the loop ----------------------------------------------------------------------
    def train_step(self) -> None:
        step = self.state.step
        set_learning_rate(self.optimizer, learning_rate(step, self.cfg))
        batches = [self.data.sampler.next_batch(self.micro_batch, pin=self.pin).to(self.dist.device)
                   for _ in range(self.accumulation)]
        result = self.runner.run(step, batches)
        metrics = {"train/loss": result.loss.mean(), **result.metrics}
        if result.weights is not None and not result.skipped:
            domain = torch.cat([b.domain for b in batches])
            metrics[WEIGHT_STATS] = step_weight_stats(result.weights, domain, self.num_domains)
        if result.skipped:
            self.state.skipped_steps += 1
            log.warning("step %d skipped: the mixer reported a non-finite signal", step)
        else:
            if self.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                # a replicated DTensor under fsdp (the global norm of the sharded gradients): as a plain tensor
                metrics["train/grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_mixture()
        self.accumulator.add(metrics)
        self.state.step += 1
        self.state.tokens_seen += self.cfg.batch_size * self.cfg.seq_len

    def update_mixture(self) -> None:
        """Hand the mixer's sampling mixture (if it has one) to the sampler."""
        if (mixture := self.mixer.sampling_mixture()) is not None:
            self.data.sampler.set_mixture(mixture)

    @timed_part("eval_time_s")
    def run_eval(self) -> dict[str, Any]:
        results = evaluate(self.model, self.data.validation, self.data.corpus.domains,
                           self.data.corpus.natural_mixture, batch_size=self.cfg.eval_batch_size,
                           device=self.dist.device, dist=self.dist, autocast=self.autocast,
                           lockstep=self.sharded)
        self.writer.write("eval", self.state.step, {**results, "tokens_seen": self.state.tokens_seen})
        return results

    @timed_part("eval_time_s")
    def evaluate_windows(self, windows: Tensor) -> float:
        """The mean token loss of extra windows, scored as validation scores a domain, nothing logged.

        Evaluation only, after :meth:`fit`: text outside the run's validation set (a planted corpus's fresh
        documents, ``dograph.eval.planted``) measured with the same batching, ranks and precision.
        """
        results = evaluate(self.model, [windows], ["extra"], [1.0], batch_size=self.cfg.eval_batch_size,
                           device=self.dist.device, dist=self.dist, autocast=self.autocast, lockstep=self.sharded)
        return float(results["val/extra/loss"])

    def log_train(self, bar: tqdm, started: float, tokens_at_start: int) -> None:
        """One record per log interval; loss and weight statistics are global (one reduction over ranks)."""
        losses, weight_stats = self.accumulator.pop("train/loss"), self.accumulator.pop(WEIGHT_STATS)
        values = self.accumulator.flush()
        values.update(global_window(self.dist, losses, weight_stats, self.cfg.batch_size,
                                    self.state.weight_summary))
        mixture = getattr(self.data.sampler, "mixture", None)  # the sampling mixture in effect (host)
        if mixture is not None:
            values.update({f"data/mixture/{d}": p for d, p in zip(self.data.corpus.domains, mixture.tolist(),
                                                                   strict=True)})
        wall = time.perf_counter() - started
        values.update({"lr": learning_rate(self.state.step - 1, self.cfg), "tokens_seen": self.state.tokens_seen,
                       "tokens_per_s": (self.state.tokens_seen - tokens_at_start) / max(wall, 1e-9),
                       "skipped_steps": self.state.skipped_steps})
        self.writer.write("train", self.state.step, values)
        if self.state.step < self.cfg.max_steps:  # the last step's record follows the final evaluation
            self.log_time()
        bar.set_postfix(loss=f"{values['train/loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")

    def log_time(self) -> None:
        """A ``time`` record: training, validation and checkpoint seconds so far (W&B: ``time/train_s`` ...)."""
        self.writer.write("time", self.state.step, {"train_s": self.state.elapsed,
                                                    "eval_s": self.state.eval_time_s,
                                                    "ckpt_s": self.state.ckpt_time_s})

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``max_steps`` (or ``stop_after_steps``); the data prefetch thread ends with it, however it ends."""
        try:
            return self._fit(resume)
        finally:
            self.data.sampler.close()

    def _fit(self, resume: bool) -> TrainResult:
        if resume and not self.restore():
            log.warning("resume=true but %s holds no checkpoint: starting from scratch", self.checkpointer.directory)
        cfg, stop = self.cfg, self.cfg.stop_after_steps
        started, start_step, start_tokens = time.perf_counter(), self.state.step, self.state.tokens_seen
        clock = SessionClock(self.state)
        bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and self.dist.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        self.update_mixture()  # a static mixture applies from the first step
        while self.state.step < cfg.max_steps:
            self.train_step()
            bar.update(1)
            step = self.state.step
            clock.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self.log_train(bar, started, start_tokens)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                self.run_eval()
            stopping = stop is not None and step - start_step >= stop and step < cfg.max_steps
            if stopping or (cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps):
                self.save()  # once, also when the checkpoint cadence and the stop fall on the same step
            if stopping:
                bar.close()
                return TrainResult(self.state, stopped_early=True)
        bar.close()
        self.synchronize()
        clock.update()
        final = self.run_eval()
        self.save()
        self.log_time()
        return TrainResult(self.state, final_eval=final, weight_summary=self.state.weight_summary)
