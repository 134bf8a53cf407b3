"""DoGraph's overheads, measured side by side in one run (docs/design.md section 5).

1. Step time of ``Trainer.train_step`` with mixer=uniform (``PlainStep``) vs DoGraph (the one-backward
   fast path, ``ProjectedStep``) vs DoGraph two-pass, each on its own copy of the model, fed the same
   precomputed device batches. The DoGraph mixer is built from conf/mixer/dograph.yaml (+ the
   conf/model_mixer override of the model, + conf/objective/<objective>.yaml) and is past its warm-up:
   its buffer is filled by real steps first, so assignment, statistics and the objective solve run
   every timed step (and K-means refreshes every ``recluster_every`` steps).
2. Projection alone: the capturing forward+backward (``GradientCapture``, keep_for_update=False) vs the
   reference (``DenseReferenceProjector``: torch.func per-sample gradients, then a dense Gaussian), and
   the memory each needs.
3. K-means (``KMeansClusterer`` with the mixer config's iterations): cold fit, warm refresh (4096 x 1024
   buffer, m = 11) and the assignment of one batch.
4. The objective solve (m = 11) of each of the four conf/objective/*.yaml objectives.

    python -m benchmarks.step_time                 # CPU: gpt2_tiny, batch 16 x 128 (about 2-3 minutes)
    python -m benchmarks.step_time --quick         # about 30-40 s
    python -m benchmarks.step_time --device cuda   # GPU: gpt2_small, batch 48 x 512, bf16 autocast
    python -m benchmarks.step_time --parts kmeans,solves --out k.json   # some sections only

``--parts`` picks sections (steps, projection, kmeans, solves; all by default). ``projection``
without ``steps`` measures a freshly initialised model and the projector of a fresh mixer (with
``steps`` it uses the trained, filled model as before). ``run(args, parts)`` returns the numbers
``--out`` writes; ``benchmarks/gpu_report.py`` calls it section by section.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from baselines.uniform import UniformMixer
from benchmarks.common import (
    CONF,
    RANDOM_DOMAINS,
    RANDOM_MIXTURE,
    BenchData,
    FixedSampler,
    Timing,
    autocast_factory,
    configure_process,
    describe_model,
    fill_shape_defaults,
    fmt_bytes,
    fmt_ms,
    load_model_config,
    load_yaml,
    make_model,
    make_parser,
    make_trainer,
    markdown_table,
    paired_ratio,
    peak_memory,
    precision_name,
    precompute_batches,
    prepare_data,
    print_header,
    print_load_at_end,
    resolve_device,
    sync,
    time_block,
    time_interleaved,
    write_json,
)
from dograph.data.sampler import Batch
from dograph.distributed import DistContext, broadcast
from dograph.method.clustering import KMeansClusterer
from dograph.method.mixer import DoGraphMixer
from dograph.method.objectives import ObjectiveInputs
from dograph.models import count_parameters, per_sample_loss
from dograph.step.capture import GradientCapture
from dograph.step.projection import (
    DenseReferenceProjector,
    KroneckerProjector,
    LossModule,
    exact_per_sample_grads,
    select_layers,
)
from dograph.train.trainer import Trainer

OBJECTIVES = ("uncertainty", "variance", "robust", "alignment")
PARTS = ("steps", "projection", "kmeans", "solves")
STEP_LABELS = {"uniform": "uniform (PlainStep)", "dograph": "DoGraph fast path (one backward)",
               "two_pass": "DoGraph two-pass"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__, "where the precomputed batches come from (the pipeline is never timed)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="uncertainty", help="the mixer's objective")
    parser.add_argument("--m", type=int, default=11, help="number of clusters")
    parser.add_argument("--buffer-size", type=int, default=None,
                        help="mixer buffer N (default: conf/mixer/dograph.yaml + the model's conf/model_mixer)")
    parser.add_argument("--fill", choices=["frozen", "train"], default="frozen",
                        help="frozen: fill the buffer with lr 0 (stationary gradients, clusters by content); "
                             "train: ordinary training steps from initialisation")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per step variant")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (after the buffer fill)")
    parser.add_argument("--proj-repeats", type=int, default=5, help="timed capture / plain passes")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed reference per-sample-gradient passes")
    parser.add_argument("--reference", choices=["auto", "full", "grads"], default="auto",
                        help="full: also run DenseReferenceProjector.project (its P x k Gaussian cached); auto: full "
                             "when P*k <= --max-dense; grads: per-sample grads only")
    parser.add_argument("--max-dense", type=float, default=4e9, help="largest P*k for --reference auto")
    parser.add_argument("--kmeans-points", type=int, default=4096)
    parser.add_argument("--kmeans-dim", type=int, default=1024)
    parser.add_argument("--kmeans-repeats", type=int, default=7, help="cold fits timed (warm: twice as many)")
    parser.add_argument("--solves", type=int, default=200, help="timed solves per objective")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="profile one step of each variant (auto: when DoGraph/uniform > 1.3 or fast >= two-pass)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, a buffer of 4 batches (unless --buffer-size), no dense reference run")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--parts", type=parse_parts, default=PARTS,
                        help=f"comma-separated sections to run, of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup, args.proj_repeats, args.ref_repeats = 3, 1, 1, 3, 1
        args.kmeans_repeats, args.solves = 3, 50
        args.reference = "grads" if args.reference == "auto" else args.reference
    return args


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown} (choose from {','.join(PARTS)})")
    return parts


# ---- 1. step time --------------------------------------------------------------------------------
def option_values(path: Path) -> dict[str, Any]:
    """A conf/<group>/<name>.yaml without its defaults list (the schema it composes onto, not a setting)."""
    return {k: v for k, v in load_yaml(path).items() if k != "defaults"}


def mixer_node(args: argparse.Namespace) -> dict[str, Any]:
    """conf/mixer/dograph.yaml resolved as Hydra would (m, seed, objective, model_mixer override)."""
    root = OmegaConf.create({"m": args.m, "seed": args.seed,
                             "objective": option_values(CONF / "objective" / f"{args.objective}.yaml"),
                             "mixer": option_values(CONF / "mixer" / "dograph.yaml")})
    override = CONF / "model_mixer" / f"{args.model}_dograph.yaml"
    if override.exists():
        root = OmegaConf.merge(root, OmegaConf.create(load_yaml(override)))
    if args.buffer_size is not None:
        root.mixer.buffer_size = args.buffer_size
    return OmegaConf.to_container(root.mixer, resolve=True)


def build_mixer(args: argparse.Namespace, device: torch.device, data: BenchData,
                dist: DistContext | None = None) -> DoGraphMixer:
    """A DoGraphMixer exactly as dograph.runs.app.build_mixer makes it from the config node.

    ``dist``: the process group's context under torchrun (default: one process on ``device``)."""
    domains = list(data.run_data.corpus.domains) if data.run_data else list(RANDOM_DOMAINS)
    mixture = list(data.run_data.corpus.natural_mixture) if data.run_data else list(RANDOM_MIXTURE)
    make = instantiate(mixer_node(args), _partial_=True)
    return make(domains=domains, natural_mixture=mixture, dist=dist or DistContext(device=device), seed=args.seed)


def fill_buffer(trainer: Trainer, mixer: DoGraphMixer, limit: int, frozen: bool) -> int:
    """Real steps until the mixer has clustered and weighed a step; returns the count.

    ``frozen``: the learning rate is 0 while filling (the full step still runs), so the buffer holds
    gradients of one model and K-means groups them by content rather than by training time. Under
    torchrun only rank 0 keeps the history, so its answer is broadcast (every rank takes as many steps).
    """
    saved = trainer.cfg.lr, trainer.cfg.min_lr
    if frozen:
        trainer.cfg.lr = trainer.cfg.min_lr = 0.0
    steps = 0
    try:
        while not weighed(mixer, trainer.dist):
            if steps >= limit:
                raise RuntimeError(f"the DoGraph mixer still weighs uniformly after {steps} steps")
            trainer.train_step()
            steps += 1
    finally:
        trainer.cfg.lr, trainer.cfg.min_lr = saved
    trainer.accumulator.flush()
    return steps


def weighed(mixer: DoGraphMixer, dist: DistContext) -> bool:
    """Whether the mixer has weighed a step (rank 0's history, broadcast to every rank)."""
    flag = torch.tensor([float(bool(mixer.history.steps))], device=dist.device)
    return bool(broadcast(dist, flag).item())


def sync_state(source: Trainer, targets: list[Trainer]) -> None:
    """Give every variant the filled trainer's weights and optimizer state (a fair start)."""
    for target in targets:
        target.model.load_state_dict(source.model.state_dict())
        target.optimizer.load_state_dict(source.optimizer.state_dict())
        target.state.step = source.state.step


def solved_steps(mixer: DoGraphMixer, first: int) -> tuple[int, int]:
    """(steps since history index ``first`` whose weights had more than one active cluster, steps)."""
    weights = mixer.history.weights[first:]
    return sum(1 for w in weights if sum(1 for x in w if x > 0) > 1), len(weights)


class BlockMetrics:
    """The mixer's own timers (projection in hooks, clustering, solve), averaged per timed block."""

    KEYS = ("mixer/time_projection_s", "mixer/time_cluster_s", "mixer/time_solve_s", "mixer/warmup",
            "mixer/fallback")

    def __init__(self, trainers: dict[str, Trainer]) -> None:
        self.trainers = trainers
        self.values: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}

    def __call__(self, name: str) -> None:
        flushed = self.trainers[name].accumulator.flush()
        self.values[name].append({k: flushed[k] for k in self.KEYS if k in flushed})

    def median(self, name: str, key: str) -> float:
        found = [v[key] for v in self.values[name][1:] if key in v]  # [0] is the warm-up flush
        return float(np.median(found)) if found else float("nan")


def bench_steps(args: argparse.Namespace, device: torch.device, data: BenchData, batches: list[Batch],
                workdir: Path) -> tuple[dict[str, Any], dict[str, Trainer]]:
    """Uniform vs DoGraph (fast) vs DoGraph (two-pass) step time, interleaved."""
    cfg = load_model_config(args.model)
    mixers = {"dograph": build_mixer(args, device, data), "two_pass": build_mixer(args, device, data)}
    trainers: dict[str, Trainer] = {}
    for name, update in (("uniform", "fast"), ("dograph", "fast"), ("two_pass", "two_pass")):
        model = make_model(cfg, data.vocab, device, eos_id=data.eos_id, seed=args.seed)
        mixer = mixers.get(name) or UniformMixer()
        trainers[name] = make_trainer(args, device, model, mixer, FixedSampler(batches), workdir,
                                      weighted_update=update, run_data=data.run_data)
        print(f"{STEP_LABELS[name]}: runner {type(trainers[name].runner).__name__}"
              + (f" (two_pass={trainers[name].runner.two_pass})" if name != "uniform" else ""))
    print(describe_model(args.model, cfg, data.vocab, count_parameters(trainers["uniform"].model)))
    mixer = mixers["dograph"]
    started = time.perf_counter()
    filled = fill_buffer(trainers["dograph"], mixer, math.ceil(mixer.buffer_size / args.batch) + 5,
                         frozen=args.fill == "frozen")
    mixers["two_pass"].load_state_dict(mixer.state_dict())
    sync_state(trainers["dograph"], [trainers["uniform"], trainers["two_pass"]])
    sizes = [sum(row) for row in mixer.history.refreshes[-1]["contingency"]]
    print(f"buffer N={mixer.buffer_size} filled by {filled} real fast-path steps ({args.fill} weights) in "
          f"{time.perf_counter() - started:.1f} s (first K-means fit included); K-means refresh every "
          f"{mixer.recluster_every} steps; objective {args.objective}, m={mixer.m}, k={mixer.projector.out_dim}; "
          f"first fit's cluster sizes {sizes}; all variants start from the filled trainer's weights, optimizer "
          "and mixer state", flush=True)
    refreshes_before = {n: len(mixers[n].history.refreshes) for n in mixers}
    history_before = {n: len(mixers[n].history.weights) for n in mixers}
    metrics = BlockMetrics(trainers)
    timings = time_interleaved({n: t.train_step for n, t in trainers.items()}, warmup=args.warmup,
                               repeats=args.repeats, calls=args.steps, device=device, after_block=metrics)
    numbers = step_numbers(timings, metrics, mixers, refreshes_before)
    numbers["buffer_size"], numbers["recluster_every"] = mixer.buffer_size, mixer.recluster_every
    numbers["first_fit_sizes"] = sizes
    numbers["solved_steps"] = {n: solved_steps(mixers[n], history_before[n]) for n in mixers}
    print_steps(numbers, timings)
    return numbers, trainers


def step_numbers(timings: dict[str, Timing], metrics: BlockMetrics, mixers: dict[str, DoGraphMixer],
                 refreshes_before: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds_per_step": {n: t.samples for n, t in timings.items()},
                           "median_s": {n: t.median for n, t in timings.items()}}
    out["ratio_dograph_uniform"] = paired_ratio(timings["dograph"], timings["uniform"])
    out["ratio_two_pass_uniform"] = paired_ratio(timings["two_pass"], timings["uniform"])
    out["ratio_dograph_two_pass"] = paired_ratio(timings["dograph"], timings["two_pass"])
    for name in mixers:
        out[f"{name}_breakdown_s"] = {k.split("/")[-1]: metrics.median(name, k) for k in BlockMetrics.KEYS}
        new = mixers[name].history.refreshes[refreshes_before[name]:]
        out[f"{name}_refreshes_in_timing"] = [r["seconds"] for r in new]
    return out


def print_steps(numbers: dict[str, Any], timings: dict[str, Timing]) -> None:
    print()
    for name, timing in timings.items():
        print(f"{STEP_LABELS[name]}: median {fmt_ms(timing.median)}/step (blocks {timing.spread()})")
    print(f"DoGraph/uniform: x{numbers['ratio_dograph_uniform']:.3f}   two-pass/uniform: "
          f"x{numbers['ratio_two_pass_uniform']:.3f}   fast/two-pass: x{numbers['ratio_dograph_two_pass']:.3f}  "
          "(medians of per-round ratios)")
    for name in ("dograph", "two_pass"):
        b = numbers[f"{name}_breakdown_s"]
        refreshes = numbers[f"{name}_refreshes_in_timing"]
        print(f"  {STEP_LABELS[name]} mixer timers per step (median of blocks): projection in hooks "
              f"{fmt_ms(b['time_projection_s'])}, assign+statistics+host copy {fmt_ms(b['time_cluster_s'])}, "
              f"solve {fmt_ms(b['time_solve_s'])}; warm-up flag {b['warmup']}, fallback {b['fallback']}; "
              f"K-means refreshes during timing: {len(refreshes)} ({', '.join(fmt_ms(s) for s in refreshes)})")
        solved, total = numbers["solved_steps"][name]
        print(f"    steps with more than one active cluster (the QP solve ran): {solved} of {total} "
              "(warm-up steps included)")
        if solved == 0:
            print("    NOTE: every timed step had one active cluster, so no solve ran and all weights were 1/B")
    if numbers["dograph_breakdown_s"]["warmup"] != 0.0:
        print("  WARNING: the DoGraph mixer was still in warm-up during timing: its numbers do not count")


# ---- profiles ----------------------------------------------------------------------------------------
def profile_steps(trainers: dict[str, Trainer], device: torch.device, top: int = 12) -> None:
    """torch.profiler op table and cProfile (dograph functions) of one step of each variant."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, trainer in trainers.items():
        trainer.train_step()
        sync(device)
        with profile(activities=activities) as prof:
            trainer.train_step()
            sync(device)
        print(f"\n--- torch.profiler, one step of {STEP_LABELS[name]} (top {top} by self time) ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=top))
        if name == "uniform":
            continue
        stats_out = io.StringIO()
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.train_step()
        sync(device)
        profiler.disable()
        pstats.Stats(profiler, stream=stats_out).sort_stats("cumulative").print_stats(r"dograph/|torch/autograd", top)
        print(f"--- cProfile, one step of {STEP_LABELS[name]} (cumulative, dograph and autograd functions) ---")
        print("\n".join(line for line in stats_out.getvalue().splitlines()[6:] if line.strip()))
        trainer.accumulator.flush()


# ---- 2. projection alone --------------------------------------------------------------------------
def capture_pass(capture: GradientCapture, model: torch.nn.Module, batch: Batch,
                 autocast: Callable[[], Any]) -> torch.Tensor:
    """The capturing forward+backward of one micro-batch: [B, k] projected per-sample gradients."""
    with capture.capturing():
        capture.start_micro_batch(len(batch))
        with autocast():
            loss = per_sample_loss(model, batch.input_ids, batch.targets)
        loss.sum().backward()
        return capture.end_micro_batch()


def plain_pass(model: torch.nn.Module, batch: Batch, autocast: Callable[[], Any]) -> None:
    """An ordinary forward+backward with weight gradients (context for the capture's cost)."""
    with autocast():
        loss = per_sample_loss(model, batch.input_ids, batch.targets)
    (loss.sum() / len(batch)).backward()
    model.zero_grad(set_to_none=True)


def kept_bytes(capture: GradientCapture) -> int:
    """Bytes of the distinct tensor storages the fast path keeps for the weighted update (A, Delta, kwargs)."""
    storages: dict[int, int] = {}
    for micro in capture.micro:
        for calls in micro:
            for call in calls:
                tensors = [*call.args, *call.kwargs.values(), call.output_grad]
                for t in tensors:
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def bench_capture(args: argparse.Namespace, device: torch.device, model: torch.nn.Module,
                  projector: KroneckerProjector, batch: Batch) -> dict[str, Any]:
    """Capture (keep_for_update=False) vs a plain forward+backward, interleaved; memory of each."""
    autocast = autocast_factory(device, args.precision)
    bound = projector.bind(model)
    capture = GradientCapture(model, bound, keep_for_update=False)
    timers: list[Any] = []

    def run_capture() -> None:
        capture_pass(capture, model, batch, autocast)
        timers.append(capture.timer)

    timings = time_interleaved({"capture": run_capture, "plain": lambda: plain_pass(model, batch, autocast)},
                               warmup=1, repeats=args.proj_repeats, calls=1, device=device)
    hooks_s = float(np.median([float(t) for t in timers[1:]]))
    with peak_memory(device) as plain_mem:
        plain_pass(model, batch, autocast)
    with peak_memory(device) as capture_mem:
        capture_pass(capture, model, batch, autocast)
    capture.remove()
    keeper = GradientCapture(model, bound, keep_for_update=True)
    capture_pass(keeper, model, batch, autocast)
    fast_kept = kept_bytes(keeper)
    keeper.micro = []
    keeper.remove()
    b, k = len(batch), bound.dim
    return {"capture_s": timings["capture"].median, "capture_samples": timings["capture"].samples,
            "plain_fwd_bwd_s": timings["plain"].median, "hooks_projection_s": hooks_s,
            "capture_over_plain": paired_ratio(timings["capture"], timings["plain"]),
            "capture_peak_bytes": capture_mem["bytes"], "plain_peak_bytes": plain_mem["bytes"],
            "peak_label": capture_mem["label"], "projected_bytes": b * k * 4,
            "blocks_bytes": b * bound.blocks_dim * 4, "fast_path_kept_bytes": fast_kept,
            "layers": len(bound.layers), "rank": projector.rank, "k": k, "blocks_dim": bound.blocks_dim}


def reference_grads(model: torch.nn.Module, names: list[str], batch: Batch, autocast: Callable[[], Any]) -> None:
    with autocast():
        grads = exact_per_sample_grads(LossModule(model), batch.input_ids, batch.targets, names)
    del grads


def slice_batch(batch: Batch, size: int) -> Batch:
    return Batch(batch.input_ids[:size], batch.targets[:size], batch.domain[:size])


def bench_reference_grads(args: argparse.Namespace, device: torch.device, model: torch.nn.Module,
                          names: list[str], batch: Batch) -> dict[str, Any]:
    """torch.func per-sample gradients of the projected layers; halves the batch on CUDA OOM (extrapolated)."""
    autocast = autocast_factory(device, args.precision)
    size = len(batch)
    reference_grads(model, names, slice_batch(batch, min(2, size)), autocast)  # warm-up (untimed)
    while True:
        sub = slice_batch(batch, size)
        try:
            with peak_memory(device) as mem:
                first = time_block(lambda sub=sub: reference_grads(model, names, sub, autocast), 1, device)
            samples = [first] + [time_block(lambda sub=sub: reference_grads(model, names, sub, autocast), 1, device)
                                 for _ in range(args.ref_repeats - 1)]
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if size <= 1:
                raise
            size //= 2
            print(f"  reference per-sample gradients ran out of GPU memory: retrying on {size} samples")
    scale = len(batch) / size
    return {"grads_s": float(np.median(samples)) * scale, "grads_samples": samples, "grads_batch": size,
            "grads_extrapolated": scale != 1.0, "grads_peak_bytes": mem["bytes"], "peak_label": mem["label"]}


def gaussian_rate(k: int, device: torch.device, rows: int = 65536, repeats: int = 3) -> float:
    """Normals per second drawn on ``device`` in the reference's chunks (65536 rows x k)."""
    generator = torch.Generator(device=device).manual_seed(0)
    torch.randn(rows // 8, k, generator=generator, device=device)
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        block = torch.randn(rows, k, generator=generator, device=device)
        sync(device)
        samples.append(time.perf_counter() - start)
        del block
    return rows * k / float(np.median(samples))


def bench_reference_full(args: argparse.Namespace, device: torch.device, model: torch.nn.Module,
                         layers: list[tuple[str, torch.nn.Module]], batch: Batch, k: int, seed: int,
                         params: int) -> dict[str, Any]:
    """``DenseReferenceProjector.project`` (its Gaussian cached by a first call), or an estimate when P x k is
    too large to hold: then the Gaussian is drawn on every call, at the measured device rate."""
    rate = gaussian_rate(k, device)
    out: dict[str, Any] = {"gaussian_entries": params * k, "gaussian_rate_per_s": rate,
                           "gaussian_estimate_s": params * k / rate}
    run = args.reference == "full" or (args.reference == "auto" and params * k <= args.max_dense)
    if not run:
        out["full_s"] = None
        return out
    autocast = autocast_factory(device, args.precision)
    reference = DenseReferenceProjector(out_dim=k, seed=seed, cache_bytes=int(args.max_dense) * 4)
    with autocast():
        reference.project(model, layers, batch.input_ids, batch.targets)  # draws and caches the Gaussian
        out["full_s"] = time_block(lambda: reference.project(model, layers, batch.input_ids, batch.targets), 1, device)
    return out


def bench_projection(args: argparse.Namespace, device: torch.device, model: torch.nn.Module,
                     projector: KroneckerProjector, batch: Batch) -> dict[str, Any]:
    """Section 2: the capture vs the reference projector on the same batch and layers."""
    print(f"\n## Projection alone (batch {len(batch)} x {batch.input_ids.shape[1]})", flush=True)
    out = bench_capture(args, device, model, projector, batch)
    layers = select_layers(model, projector.include, projector.exclude)
    names = [f"model.{n}.weight" for n, _ in layers]
    params = sum(m.weight.numel() for _, m in layers)
    out.update(params=params, per_sample_grad_bytes=len(batch) * params * 4)
    try:
        out.update(bench_reference_grads(args, device, model, names, batch))
        out.update(bench_reference_full(args, device, model, layers, batch, out["k"], projector.seed, params))
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # report, do not lose the other sections
        print(f"  reference projector failed: {type(exc).__name__}: {exc}")
        out.update(grads_s=float("nan"), full_s=None, reference_error=str(exc))
    print_projection(out, len(batch))
    return out


def reference_time(out: dict[str, Any]) -> tuple[float, str]:
    """The reference's time for the ratio and how it was obtained."""
    if out.get("full_s") is not None:
        return out["full_s"], "measured (DenseReferenceProjector.project, Gaussian cached)"
    if "gaussian_estimate_s" in out:
        return (out["grads_s"] + out["gaussian_estimate_s"],
                "estimated: per-sample grads measured + drawing the P x k Gaussian on the device at the measured rate "
                "(too large to cache)")
    return float("nan"), "failed"


def print_projection(out: dict[str, Any], batch: int) -> None:
    print(f"layers projected: {out['layers']} (P = {out['params']:,} weights), r = {out['rank']}, "
          f"L r^2 = {out['blocks_dim']}, k = {out['k']}")
    print(f"plain forward+backward (weight grads): {fmt_ms(out['plain_fwd_bwd_s'])}")
    print(f"capture forward+backward (no weight grads, projection in hooks): {fmt_ms(out['capture_s'])} "
          f"(x{out['capture_over_plain']:.2f} of plain; projection math in hooks {fmt_ms(out['hooks_projection_s'])})")
    if out.get("reference_error"):
        return
    extrapolated = f" (measured on {out['grads_batch']} samples, scaled x{batch / out['grads_batch']:.0f})" \
        if out["grads_extrapolated"] else ""
    print(f"reference per-sample gradients only (torch.func, chunks of 8): {fmt_ms(out['grads_s'])}{extrapolated} "
          f"-> x{out['grads_s'] / out['capture_s']:.1f} the capture")
    print(f"reference dense Gaussian: {out['gaussian_entries']:.3g} normals, drawn at "
          f"{out['gaussian_rate_per_s']:.3g}/s = {out['gaussian_estimate_s']:.1f} s when it cannot be cached")
    ref_s, how = reference_time(out)
    print(f"reference total: {fmt_ms(ref_s)} [{how}] -> reference/projection x{ref_s / out['capture_s']:.1f}")
    print(f"memory: projection output B x k x 4 = {fmt_bytes(out['projected_bytes'])}, transient blocks B x L r^2 x 4 "
          f"= {fmt_bytes(out['blocks_bytes'])}; the fast path also keeps inputs and output-grads for the weighted "
          f"update: {fmt_bytes(out['fast_path_kept_bytes'])}; reference per-sample grads B x P x 4 = "
          f"{fmt_bytes(out['per_sample_grad_bytes'])} (its torch.cat makes a second copy)")
    print(f"measured ({out['peak_label']}): plain fwd+bwd {fmt_bytes(out['plain_peak_bytes'])}, capture "
          f"{fmt_bytes(out['capture_peak_bytes'])}, reference per-sample grads {fmt_bytes(out['grads_peak_bytes'])}"
          + (f" on {out['grads_batch']} samples" if out["grads_extrapolated"] else ""))


# ---- 3. K-means -----------------------------------------------------------------------------------
def clustered_buffer(n: int, dim: int, seed: int, device: torch.device, sources: int = 7) -> torch.Tensor:
    """Synthetic projected gradients: 7 Gaussian sources of unequal sizes (fixed centres, fresh points)."""
    centres = torch.randn(sources, dim, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.arange(1.0, sources + 1), n, replacement=True, generator=generator)
    return (centres[labels] + 0.8 * torch.randn(n, dim, generator=generator)).to(device)


def bench_kmeans(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Cold fit, warm refresh and batch assignment with the mixer config's K-means settings."""
    node = load_yaml(CONF / "mixer" / "dograph.yaml")
    settings = {"niter": node["kmeans_iterations"], "niter_warm": node["kmeans_warm_iterations"],
                "nredo_first": node["kmeans_restarts"]}
    n, dim, m = args.kmeans_points, args.kmeans_dim, args.m
    print(f"\n## K-means ({n} x {dim} synthetic clustered buffer on {device}, m = {m}, {settings})", flush=True)
    buffers = [clustered_buffer(n, dim, seed, device) for seed in range(1, 4)]
    cold, warm = Timing(), Timing()
    KMeansClusterer(m, seed=args.seed, **settings).fit(buffers[0])  # warm-up (FAISS, OpenMP pool)
    for r in range(args.kmeans_repeats):
        cold.samples.append(time_block(lambda r=r: KMeansClusterer(m, seed=args.seed + r, **settings)
                                       .fit(buffers[r % 3]), 1, device))
    clusterer = KMeansClusterer(m, seed=args.seed, **settings)
    clusterer.fit(buffers[0])
    clusterer.fit(buffers[1])  # warm-up of the warm path
    for r in range(2 * args.kmeans_repeats):
        warm.samples.append(time_block(lambda r=r: clusterer.fit(buffers[r % 3]), 1, device))
    batch = buffers[2][:args.batch].contiguous()
    assign = Timing([time_block(lambda: clusterer.assign(batch), 50, device) for _ in range(20)])
    print(f"cold fit: median {fmt_ms(cold.median)} (repeats {cold.spread()}); warm refresh: median "
          f"{fmt_ms(warm.median)} ({warm.spread()}); assign {args.batch} points: {fmt_ms(assign.median)} "
          f"({clusterer.backend})")
    return {"cold_s": cold.median, "cold_samples": cold.samples, "warm_s": warm.median, "warm_samples": warm.samples,
            "assign_s": assign.median, "backend": clusterer.backend, "settings": settings}


# ---- 4. objective solves ----------------------------------------------------------------------------
def objective_inputs(m: int, dim: int, rng: np.random.Generator) -> ObjectiveInputs:
    """Plausible EMA statistics: means sharing a common direction, unequal counts, variances and losses."""
    common = rng.normal(size=dim)
    means = 0.5 * common + rng.normal(size=(m, dim))
    counts = rng.uniform(0.5, 3.0, size=m)
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    adjacency = np.maximum(unit @ unit.T, 0.0)
    np.fill_diagonal(adjacency, 0.0)
    return ObjectiveInputs(counts=counts, means=means, variances=rng.uniform(0.5, 2.0, size=m) * dim,
                           losses=rng.uniform(5.0, 8.0, size=m), adjacency=adjacency,
                           mean_grad=counts @ means / counts.sum(), active=np.ones(m, dtype=bool))


def bench_objective(name: str, m: int, solves: int, seed: int) -> dict[str, Any]:
    """First solve (CVXPY compiles the DPP problem) and the median of ``solves`` later ones."""
    objective = instantiate(option_values(CONF / "objective" / f"{name}.yaml"))(num_clusters=m)
    rng = np.random.default_rng(seed)
    inputs = [objective_inputs(m, 1024, rng) for _ in range(10)]
    w_prev = np.full(m, 1.0 / m)
    start = time.perf_counter()
    result = objective.solve(inputs[0], w_prev)
    first = time.perf_counter() - start
    samples, fallbacks = [], int(result.fallback)
    for i in range(5 + solves):
        start = time.perf_counter()
        result = objective.solve(inputs[i % len(inputs)], w_prev)
        if i >= 5:
            samples.append(time.perf_counter() - start)
        w_prev, fallbacks = result.weights, fallbacks + int(result.fallback)
    timing = Timing(samples)
    return {"first_s": first, "median_s": timing.median, "p90_s": timing.quantile(0.9), "fallbacks": fallbacks,
            "solver": objective.solver}


def bench_solves(args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n## Objective solves (m = {args.m}, {args.solves} timed solves after 5 untimed, synthetic statistics "
          "cycling over 10 draws, w_prev fed back as in the mixer)", flush=True)
    out = {}
    for name in OBJECTIVES:
        out[name] = bench_objective(name, args.m, args.solves, args.seed)
        r = out[name]
        print(f"{name}: median {fmt_ms(r['median_s'])}, p90 {fmt_ms(r['p90_s'])}, first solve (compile) "
              f"{fmt_ms(r['first_s'])}, solver {r['solver']}, fallbacks {r['fallbacks']}")
    return out


# ---- summary ------------------------------------------------------------------------------------------
def summary_rows(args: argparse.Namespace, steps: dict[str, Any], proj: dict[str, Any], km: dict[str, Any],
                 solves: dict[str, Any]) -> list[list[str]]:
    gpu_note = "GPU, gpt2_small"
    med = steps["median_s"]
    rows = [["step time, uniform", fmt_ms(med["uniform"]), "-"],
            ["step time, DoGraph fast path", fmt_ms(med["dograph"]), "-"],
            ["step time, DoGraph two-pass", fmt_ms(med["two_pass"]), "-"],
            ["DoGraph / uniform", f"x{steps['ratio_dograph_uniform']:.3f}", f"<= 1.10 ({gpu_note})"],
            ["two-pass / uniform", f"x{steps['ratio_two_pass_uniform']:.3f}", "- (CPU prototype 1.3-1.4)"],
            ["capture fwd+bwd (projection)", fmt_ms(proj["capture_s"]), "-"]]
    if not proj.get("reference_error"):
        ref_s, _ = reference_time(proj)
        kind = "measured" if proj.get("full_s") is not None else "estimated"
        rows += [["reference per-sample grads only", fmt_ms(proj["grads_s"]), "-"],
                 [f"reference total ({kind})", fmt_ms(ref_s), "-"],
                 ["reference / projection", f"x{ref_s / proj['capture_s']:.1f}",
                  f">= 10 ({gpu_note}); 1.5-2 tiny CPU"],
                 ["reference (grads only) / projection", f"x{proj['grads_s'] / proj['capture_s']:.1f}", "-"],
                 ["memory: per-sample grads B x P x 4 (reference)", fmt_bytes(proj["per_sample_grad_bytes"]), "-"]]
    rows += [["memory: projections B x k x 4 (+ blocks B x L r^2 x 4)",
              f"{fmt_bytes(proj['projected_bytes'])} (+ {fmt_bytes(proj['blocks_bytes'])})", "O(B k)"],
             ["memory: fast path keeps A and Delta", fmt_bytes(proj["fast_path_kept_bytes"]), "-"],
             [f"K-means cold fit ({args.kmeans_points} x {args.kmeans_dim}, m={args.m})", fmt_ms(km["cold_s"]),
              "<= 50 ms (CPU)"],
             ["K-means warm refresh", fmt_ms(km["warm_s"]), "<= 10 ms (CPU)"],
             [f"K-means assign ({args.batch} points)", fmt_ms(km["assign_s"]), "< 0.5 ms"]]
    rows += [[f"solve, {name} (median)", fmt_ms(r["median_s"]), "< 2 ms (docs/design.md section 5), < 5 ms"]
             for name, r in solves.items()]
    return rows


def should_profile(args: argparse.Namespace, steps: dict[str, Any]) -> bool:
    if args.profile != "auto":
        return args.profile == "always"
    return steps["ratio_dograph_uniform"] > 1.3 or steps["ratio_dograph_two_pass"] >= 1.0


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, device, the device's default shape and the tokenizer; returns the device."""
    configure_process(args)
    device = resolve_device(args.device)
    fill_shape_defaults(args, device)
    if args.quick and args.buffer_size is None:
        args.buffer_size = 4 * args.batch  # a few fill steps instead of N / B
    args.device_used = str(device)
    args.tokenizer = args.tokenizer or load_model_config(args.model).tokenizer
    return device


def fresh_projection_inputs(args: argparse.Namespace, device: torch.device,
                            data: BenchData) -> tuple[torch.nn.Module, KroneckerProjector]:
    """A freshly initialised model and a fresh mixer's projector (``projection`` without ``steps``)."""
    cfg = load_model_config(args.model)
    model = make_model(cfg, data.vocab, device, eos_id=data.eos_id, seed=args.seed)
    print(describe_model(args.model, cfg, data.vocab, count_parameters(model)))
    return model, build_mixer(args, device, data).projector


def run(args: argparse.Namespace, parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the sections ``parts`` (default ``args.parts``) and return the numbers ``--out`` writes."""
    parts = tuple(parts if parts is not None else args.parts)
    device = setup(args)
    print_header("DoGraph step time, projection, K-means and solve overheads", device, args)
    out: dict[str, Any] = {"benchmark": "step_time", "args": vars(args), "parts": list(parts)}
    if "steps" in parts or "projection" in parts:
        with tempfile.TemporaryDirectory(prefix="dograph-bench-") as tmp:
            data = prepare_data(args.data, args.tokenizer, args.seq, args.seed, Path(tmp), args.cache_dir)
            print(f"data: {data.description}; precision {precision_name(device, args.precision)}")
            batches = precompute_batches(data, 8, args.batch, args.seq, device, seed=args.seed)
            if "steps" in parts:
                print(f"\n## Step time ({args.model}, batch {args.batch} x {args.seq}; {args.warmup} warm-up steps, "
                      f"then {args.repeats} interleaved rounds of {args.steps} steps per variant)", flush=True)
                out["steps"], trainers = bench_steps(args, device, data, batches, Path(tmp))
                if should_profile(args, out["steps"]):
                    profile_steps(trainers, device)
                projector = trainers["dograph"].mixer.projector
                model = trainers["uniform"].model
                trainers.clear()  # free the models and optimizer states (the projector and one model stay)
            else:
                model, projector = fresh_projection_inputs(args, device, data)
            gc.collect()  # trainers and hooked models hold reference cycles
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if "projection" in parts:
                out["projection"] = bench_projection(args, device, model, projector, batches[0])
            del model, projector, batches
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "kmeans" in parts:
        out["kmeans"] = bench_kmeans(args, device)
    if "solves" in parts:
        out["solves"] = bench_solves(args)
    if all(name in parts for name in PARTS):
        print(f"\n### DoGraph overheads: {args.model}, batch {args.batch} x {args.seq}, device {device}, "
              f"{precision_name(device, args.precision)}\n")
        print(markdown_table(["quantity", "measured", "target"],
                             summary_rows(args, out["steps"], out["projection"], out["kmeans"], out["solves"])))
    print_load_at_end()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_json(args.out, run(args))


if __name__ == "__main__":
    main()
