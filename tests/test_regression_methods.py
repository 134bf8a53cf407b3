"""RegMix and Data Mixing Laws end to end: a proxy sweep, the fit, its report, the main run's mixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.regmix import RegMixMixer
from dograph.errors import ConfigError, DataError
from dograph.runs.app import run_training
from dograph.runs.pipeline import StageResult
from dograph.runs.sweep import ProxyOutcome, SweepResult

SMALL_SWEEP = ("mixer.proxy.trainer=debug", "mixer.proxy.max_steps=2", "trainer.max_steps=2")
METHODS = {
    "regmix": ("mixer=regmix", "mixer.proxies=6", "mixer.min_proxies=4", "mixer.samples=2000", "mixer.top_k=16"),
    "data_mixing_law": ("mixer=data_mixing_law", "mixer.proxies=8", "mixer.min_proxies=6", "mixer.starts=2",
                        "mixer.scan_starts=2"),
}


def sweep_dir(root: Path, method: str) -> Path:
    return next((root / "stages" / method).glob("proxy-sweep-*"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sweep_fit_and_main_run(make_config, tmp_path: Path, method: str, capsys) -> None:
    out = tmp_path / "out"
    cfg = make_config(*METHODS[method], *SMALL_SWEEP, f"paths.output_root={out}")
    run_training(cfg, tmp_path / "main")
    report = json.loads((tmp_path / "main" / "mixer" / "fit.json").read_text())
    assert report["succeeded"] == report["proxies"] == len(json.loads((tmp_path / "main" / "stages.json").read_text()))
    chosen = list(report["mixture"].values())
    assert min(chosen) >= 0 and sum(chosen) == pytest.approx(1.0) and np.isfinite(report["predicted_loss"])
    state = torch.load(tmp_path / "main" / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert state["ranks"][0]["data"]["mixture"].tolist() == pytest.approx(chosen)
    assert (tmp_path / "main" / "mixer" / "predicted_vs_measured.png").stat().st_size > 1000
    directory = sweep_dir(out, method)
    assert len(list(directory.glob("fit-*.json"))) == 1 and len(list(directory.glob("predicted_vs_measured-*.png")))
    table = (directory / "mixtures.csv").read_text().splitlines()
    assert len(table) == 1 + report["proxies"] and table[0].startswith("index,status,w:code")
    printed = capsys.readouterr().out
    assert "mixture (" in printed and "proxies succeeded" in printed
    run_training(make_config(*METHODS[method], *SMALL_SWEEP, f"paths.output_root={out}", "seed=5"),
                 tmp_path / "again")
    assert all(s["reused"] for s in json.loads((tmp_path / "again" / "stages.json").read_text()))


def test_unknown_target_domain_is_refused_before_any_proxy(make_config, tmp_path: Path) -> None:
    cfg = make_config(*METHODS["regmix"], *SMALL_SWEEP, f"paths.output_root={tmp_path}", "mixer.target=poetry")
    with pytest.raises(ConfigError, match=r"mixer\.target='poetry' is not a domain of the dataset: choose average or "
                                          r"one of code, docs, licences"):
        run_training(cfg, tmp_path / "main")
    assert not (tmp_path / "stages").exists()


def test_a_mixture_table_with_nan_losses_is_a_one_line_error(tmp_path: Path) -> None:
    domains = ["a", "b", "c"]
    mixtures = np.random.default_rng(0).dirichlet(np.ones(3), size=6)
    outcomes = []
    for i, row in enumerate(mixtures):
        evals = {f"val/{d}/loss": (float("nan") if (i, d) == (3, "b") else 5.0 + row[0]) for d in domains}
        result = StageResult("regmix", "proxy", f"k{i}", tmp_path / f"p{i}", final_eval=evals)
        outcomes.append(ProxyOutcome(i, row.tolist(), tmp_path / f"p{i}", result=result))
    sweep = SweepResult("regmix", "proxy", domains, tmp_path, outcomes)
    with pytest.raises(DataError, match=r"^mixture table row 3 has NaN losses \(b\)"):
        RegMixMixer(sweep=sweep, domains=domains, natural_mixture=[0.5, 0.3, 0.2], samples=100, top_k=4)
