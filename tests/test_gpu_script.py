"""benchmarks/gpu.sh: the CPU proof of the GPU run (test-sized, no wheel fetched) and its wheel pins."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib

from helpers import REPO

try:
    from packaging.requirements import Requirement
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement

SCRIPT = REPO / "benchmarks" / "gpu.sh"
PARTS = ("environment", "steps", "consistency", "mfu", "pipeline", "fsdp_memory", "projection", "kmeans", "solves",
         "throughput")


def test_cpu_proof_writes_every_section(tmp_path) -> None:
    """`gpu.sh run --device cpu --quick` end to end: every part ran, the consistency check passed."""
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--device", "cpu", "--quick", "--threads", "1",
                           "--budget", "240", "--out-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "no wheel installed" in proc.stdout  # the .venv has everything: nothing fetched or installed
    report = json.loads((out / "gpu_report.json").read_text())
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part)
        assert part["wall_s"] >= 0
    assert report["mode"].startswith("quick")
    assert report["wall_s"] < report["budget_s"]
    env_part = report["parts"]["environment"]["result"]
    assert env_part["device"] == "cpu" and env_part["torch"] and "CLARABEL" in env_part["cvxpy_solvers"]
    steps = report["parts"]["steps"]["result"]["steps"]
    assert set(steps["median_s"]) == {"uniform", "dograph", "two_pass"}
    assert report["parts"]["projection"]["result"]["projection"]["capture_s"] > 0
    assert report["parts"]["kmeans"]["result"]["kmeans"]["backend"].startswith("faiss")
    assert set(report["parts"]["solves"]["result"]["solves"]) == {"uncertainty", "variance", "robust", "alignment"}
    assert report["parts"]["throughput"]["result"]["results"]["trainer"]["tokens_per_s"] > 0
    mfu_rows = report["parts"]["mfu"]["result"]["rows"]
    assert mfu_rows[0]["tokens_per_s"] > 0 and mfu_rows[0]["mfu"] is None  # no peak FLOPs for a CPU
    assert report["summary"]["pipeline_tokens_per_s"] > 0
    assert 0.5 < report["summary"]["fsdp8_param_gib_llama_1b"] < 0.6  # 1.17B fp32 parameters / 8
    consistency = report["parts"]["consistency"]["result"]
    assert consistency["passed"] and consistency["weighted_steps"] > 0
    assert consistency["max_abs_diff"] == 0.0  # CPU against CPU: the same run
    summary = report["summary"]
    assert summary["consistency_passed"] is True
    for key in ("ratio_dograph_uniform", "capture_ms", "kmeans_cold_ms", "solve_uncertainty_ms",
                "tokens_per_s_trainer"):
        assert key in summary, key
    markdown = (out / "gpu_report.md").read_text()
    assert "## Parts" in markdown and "## Figures" in markdown and "PASS" in markdown
    assert "======== part throughput" in (out / "gpu_report.log").read_text()


def carried_pins() -> dict[str, str]:
    text = SCRIPT.read_text()
    block = re.search(r"^WHEELS=\((.*?)^\)", text, re.M | re.S).group(1)
    sdists = re.search(r"^SDISTS=\((.*?)\)", text, re.M).group(1)
    specs = re.findall(r"^\s*([A-Za-z0-9_.-]+==[^\s#]+)", block, re.M) + sdists.split()
    return {name.lower(): version for name, version in (s.split("==") for s in specs)}


def test_carried_wheels_are_pinned_within_pyproject() -> None:
    pins = carried_pins()
    assert {"hydra-core", "omegaconf", "cvxpy", "clarabel", "faiss-cpu", "antlr4-python3-runtime"} <= set(pins)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["cpu"]]
    for spec in map(Requirement, specs):
        if spec.name.lower() in pins:
            assert pins[spec.name.lower()] in spec.specifier, (spec, pins[spec.name.lower()])
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^gpu-wheels:.*## .*\n\tbash benchmarks/gpu.sh fetch$", makefile, re.M)
    assert re.search(r"^bench-gpu:.*## .*\n\tbash benchmarks/gpu.sh run$", makefile, re.M)
    assert ".gpu_wheels/" in (REPO / ".gitignore").read_text().splitlines()


def test_benchmarks_are_a_package_that_edits_no_import_path() -> None:
    """Scripts import their siblings as ``benchmarks.<name>`` (never by bare name through an edited ``sys.path``)."""
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    siblings = {p.stem for p in scripts}
    assert {"__init__", "common", "step_time", "gpu_report"} <= siblings
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not siblings & set(names), (path.name, names)
            assert not (isinstance(node, ast.Attribute) and node.attr == "path"
                        and isinstance(node.value, ast.Name) and node.value.id == "sys"), path.name
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--parts" in done.stdout, done.stderr[-2000:]
