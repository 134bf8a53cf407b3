"""Every config option composes and validates; bad input fails early with a message naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from helpers import REPO
from hydra.errors import ConfigCompositionException

from dograph.config import to_run_config
from dograph.errors import ConfigError

GROUPS = ["model", "dataset", "mixer", "objective", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group: str, option: str) -> None:
    extra = {("dataset", "jsonl"): ["dataset.path=/data"],
             ("trainer", "regmix_proxy"): ["model=llama_1m"]}.get((group, option), [])  # a proxy's 2048 context
    cfg = to_run_config(compose_config([f"{group}={option}", *extra]))
    assert cfg.m == 11 and cfg.trainer.batch_size > 0


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment: str) -> None:
    to_run_config(compose_config([f"+experiment={experiment}"]))


def test_tokenizer_follows_the_model_unless_overridden() -> None:
    assert to_run_config(compose_config(["model=gpt2_small"])).tokenizer == "gpt2"
    assert to_run_config(compose_config(["model=gpt2_tiny"])).tokenizer == "bpe8k"
    assert to_run_config(compose_config(["model=gpt2_small", "tokenizer=bpe8k"])).tokenizer == "bpe8k"


@pytest.mark.parametrize(("override", "key"), [
    ("trainer.seq_len=0", "trainer.seq_len"),
    ("trainer.batch_size=-4", "trainer.batch_size"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("m=0", "m"),
    ("tokenizer=''", "tokenizer"),
    ("tokenizer=bpe0k", "tokenizer"),
    ("seed=-3", "seed"),
    (f"seed={2**32}", "seed"),
    ("mixer.buffer_size=-5", "mixer.buffer_size"),
    ("mixer.buffer_size=0", "mixer.buffer_size"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("logger.mode=loud", "logger.mode"),
    ("trainer.seq_len=4096", "trainer.seq_len"),
])
def test_bad_values_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key} "):
        to_run_config(compose_config([override]))


@pytest.mark.parametrize(("override", "message"), [
    ("seed=-3", "seed must be in [0, 2**32) (numpy's seed range) (got -3)"),
    ("tokenizer=bpe0k", "tokenizer bpe<N>k needs N >= 1 (a BPE of N*1024 entries, e.g. bpe8k) (got 'bpe0k')"),
    ("mixer.buffer_size=-5", "mixer.buffer_size must be >= 1 (got -5)"),
    ("mixer.buffer_size=8", "m=11 is larger than mixer.buffer_size=8: K-means needs at least m buffered gradients"),
])
def test_bad_input_is_one_line_before_any_work(make_config, tmp_path: Path, override: str, message: str) -> None:
    """Refused when the config is converted, before the corpus (missing here) is read or anything is built."""
    with pytest.raises(ConfigError) as info:
        make_config(override, f"dataset.path={tmp_path / 'no corpus'}")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


WRONG_MIXER_SETTINGS = [("mixer.bufer_size=4", "mixer.bufer_size"), ("mixer.buffer_size=abc", "mixer.buffer_size"),
                        ("objective.floor=x", "objective.floor")]  # a wrong key, a wrong type (tests/test_settings.py)


@pytest.mark.parametrize(("override", "key"), WRONG_MIXER_SETTINGS)
def test_a_wrong_mixer_key_or_type_is_hydras_error_before_any_work(make_config, tmp_path: Path, override: str,
                                                                   key: str) -> None:
    """Refused while Hydra composes (the method's settings class types the node), before the corpus is read."""
    with pytest.raises(ConfigCompositionException) as info:
        make_config(override, f"dataset.path={tmp_path / 'no corpus'}")
    assert key in str(info.value).splitlines()[0] and f"full_key: {key}" in str(info.value.__cause__)


def test_other_tokenizer_names_are_left_to_autotokenizer() -> None:
    for name in ("gpt2", "bpe1k", "bpe16k", "./my_tokenizer", "EleutherAI/pythia-70m", "bpe8"):
        assert to_run_config(compose_config([f"tokenizer={name}"])).tokenizer == name


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.mark.parametrize(("override", "expected"), [
    ("mixer=nonexistent", "Available options in 'mixer'"),
    ("model=gpt5", "Available options in 'model'"),
    ("trainer.max_steps=abc", "full_key: trainer.max_steps"),
    ("trainer.batch_size=0", "trainer.batch_size must be > 0"),
])
def test_cli_errors_are_messages_not_tracebacks(override: str, expected: str, tmp_path: Path) -> None:
    proc = run_cli(override, "trainer.max_steps=1", cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    if "Available options" in expected:
        assert "uniform" in proc.stderr or "gpt2_tiny" in proc.stderr


@pytest.mark.parametrize(("override", "key"), WRONG_MIXER_SETTINGS)
def test_cli_refuses_a_wrong_mixer_key_or_type_before_the_corpus(tmp_path: Path, override: str, key: str) -> None:
    proc = run_cli(override, "dataset=jsonl", f"dataset.path={tmp_path / 'missing'}", "logger=disabled", cwd=tmp_path)
    out = proc.stderr + proc.stdout
    assert proc.returncode == 1 and f"full_key: {key}" in out  # Hydra's message, from the composition
    assert "does not exist" not in out and "Traceback" not in out and not (tmp_path / "outputs").exists()


def test_cli_data_errors_are_messages(tmp_path: Path) -> None:
    proc = run_cli("dataset=jsonl", f"dataset.path={tmp_path / 'missing'}", "logger=disabled", cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("dataset=slimpajama_6b", "logger=disabled", "tokenizer=bpe8k", cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "no network: use dataset=embedded or dataset=jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_multirun_sweeps_m_and_objective(tmp_path: Path) -> None:
    proc = run_cli("-m", "m=7,9,11,13,15", "objective=uncertainty,variance", "trainer.max_steps=0",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("parameters") == 10
    assert (tmp_path / "sweep" / "m=15,objective=variance,trainer.max_steps=0").is_dir()


@pytest.mark.parametrize(("model", "low", "high"), [("gpt2_small", 205e6, 212e6), ("gpt2_medium", 290e6, 298e6)])
def test_paper_model_sizes(model: str, low: float, high: float, tmp_path: Path) -> None:
    proc = run_cli(f"model={model}", "trainer.max_steps=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    count = int(proc.stdout.split(" parameters")[0].rsplit(" ", 1)[-1].replace(",", ""))
    assert low < count < high
