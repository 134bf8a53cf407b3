"""DoReMi (mixer=doremi): the Group-DRO update, the proxy's loss weights, the three-stage pipeline,
stage reuse across main-run seeds, exact resume (mid-stage and mid-main-run) and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from baselines.doremi import (
    DoReMiMixer,
    DoReMiProxyMixer,
    domain_scores,
    doremi_update,
    loss_domain_weights,
    sample_weights,
)
from dograph.config import ModelConfig, to_run_config
from dograph.errors import ConfigError
from dograph.mixing import StepSignals
from dograph.models import build_model, per_token_loss
from dograph.runs.app import run_training
from dograph.runs.pipeline import StageIncomplete, StageResult, read_marker
from dograph.train.metrics import read_metrics

VOCAB = 97
DOMAINS = ["a", "b", "c"]

# ---- the update and the loss weights on synthetic inputs ------------------------------------------------


def test_update_against_the_formula() -> None:
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    previous = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    excess_sum = torch.tensor([6.0, 0.0, 0.0], dtype=torch.float64)
    tokens = torch.tensor([12.0, 4.0, 0.0], dtype=torch.float64)  # c is absent from the batch
    present = torch.tensor([True, True, False])
    scores = domain_scores(previous, excess_sum, tokens, present)
    assert scores.tolist() == [0.5, 0.0, 3.0]  # mean over tokens; absent keeps its last score
    eta, eps = 0.7, 0.1
    new = doremi_update(w, scores, eta, eps)
    raw = [wi * math.exp(eta * si) for wi, si in zip(w.tolist(), scores.tolist(), strict=True)]
    expected = [(1 - eps) * r / sum(raw) + eps / 3 for r in raw]
    assert new.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(new.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(new.min()) >= eps / 3  # the smoothing floor
    # equal scores leave the (smoothed) weights' shape: softmax(log w + const) = w
    assert doremi_update(w, torch.full((3,), 5.0, dtype=torch.float64), 1.0, 0.0).tolist() == pytest.approx(w.tolist())


def test_proxy_loss_weights_match_the_official_per_token_normaliser() -> None:
    """Hand example: 2 ranks x 2 sequences of T tokens; the official loss (w / p renormalised per token,
    normaliser = global token-weight sum / world, DDP mean over ranks) equals sum_i v_i mean_t l_it."""
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)  # a non-uniform sampling mixture
    c = loss_domain_weights(w, p)
    assert c.tolist() == pytest.approx([2.0 / 3.6, 1.2 / 3.6, 0.4 / 3.6])
    domain = torch.tensor([0, 0, 1, 2])
    counts = torch.bincount(domain, minlength=3).double()
    v = sample_weights(domain, c, counts)
    assert v.tolist() == pytest.approx([2 / 5.6, 2 / 5.6, 1.2 / 5.6, 0.4 / 5.6])  # c_d / sum_j c_d(j)
    assert float(v.sum()) == pytest.approx(1.0)
    T, world = 5, 2
    losses = torch.rand(4, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    token_weights = c[domain].unsqueeze(1).expand(4, T)
    normalizer = token_weights.sum() / world
    ranks = [slice(0, 2), slice(2, 4)]
    official = sum((losses[r] * token_weights[r]).sum() / normalizer for r in ranks) / world  # DDP averages
    ours = (v * losses.mean(dim=1)).sum()
    assert float(ours) == pytest.approx(float(official), rel=1e-12)


# ---- the proxy mixer with a frozen tiny reference --------------------------------------------------------


def tiny_reference(root: Path) -> StageResult:
    """A saved tiny model standing in for the reference stage (its ``hf/`` export)."""
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, max_position_embeddings=32), VOCAB,
                        seed=3)
    model.save_pretrained(str(root / "hf"))
    return StageResult(method="doremi", name="reference", key="test", run_dir=root)


def signals(step: int, domain: list[int], b_tokens: int = 9) -> StepSignals:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (len(domain), b_tokens + 1), generator=g)
    token_loss = 4.0 + 2.0 * torch.rand(len(domain), b_tokens, generator=g)  # the "proxy's" losses
    return StepSignals(step=step, input_ids=tokens[:, :-1], loss=token_loss.mean(1), domain=torch.tensor(domain),
                       targets=tokens[:, 1:], token_loss=token_loss)


def make_proxy(tmp_path: Path, **kwargs) -> DoReMiProxyMixer:
    reference = tiny_reference(tmp_path / "reference")
    return DoReMiProxyMixer(stage_results={"reference": reference}, domains=DOMAINS,
                            natural_mixture=[0.6, 0.3, 0.1], **kwargs)


def test_proxy_step_against_the_formula(tmp_path: Path) -> None:
    """Scores from the clipped excess over the frozen reference, the update, the loss weights, the average."""
    mixer = make_proxy(tmp_path, eta=1.0, eps=1e-3, proxy_mixture="natural", reference_batch_size=2)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    assert mixer.sampling_mixture().tolist() == pytest.approx(p.tolist())  # the proxy samples p ...
    w, scores = p.clone(), torch.full((3,), math.log(VOCAB), dtype=torch.float64)  # ... and starts from it
    history = [w]
    for step, domain in enumerate([[0, 0, 1, 0], [1, 1, 0, 1]]):  # domain c never appears
        s = signals(step, domain)
        with torch.no_grad():
            reference = per_token_loss(mixer.reference, s.input_ids, s.targets)
        excess = (s.token_loss - reference).clamp_min(0).double()
        dom = torch.tensor(domain)
        for d in (0, 1):
            scores[d] = excess[dom == d].mean()
        raw = w * torch.exp(scores)
        w = 0.999 * raw / raw.sum() + 1e-3 / 3
        history.append(w)
        out = mixer.weigh(s)
        assert mixer.scores[2] == math.log(VOCAB)  # absent from every batch: the initial score
        assert mixer.scores.tolist() == pytest.approx(scores.tolist(), rel=1e-6)
        assert mixer.weights.tolist() == pytest.approx(w.tolist(), rel=1e-6)
        c = (w / p) / (w / p).sum()
        expected_v = c[dom] / c[dom].sum()  # the weights *after* this step's update
        assert out.sample_weights.double().tolist() == pytest.approx(expected_v.tolist(), rel=1e-5)
        assert float(out.metrics["mixer/weights/a"]) == pytest.approx(float(w[0]), rel=1e-6)
    average = torch.stack(history).mean(0)  # the initial weights count as one term
    outputs = mixer.outputs()
    assert list(outputs["mixture"].values()) == pytest.approx(average.tolist(), rel=1e-6)
    assert list(outputs["final"].values()) == pytest.approx(w.tolist(), rel=1e-6) and outputs["updates"] == 2
    mixer.save_artifacts(tmp_path / "mixer")
    lines = (tmp_path / "mixer" / "weights.csv").read_text().splitlines()
    assert lines[0] == "step,a,b,c,score:a,score:b,score:c,average:a,average:b,average:c" and len(lines) == 3
    assert json.loads((tmp_path / "mixer" / "mixture.json").read_text())["mixture"] == outputs["mixture"]


def test_proxy_state_round_trip_continues_identically(tmp_path: Path) -> None:
    a = make_proxy(tmp_path)
    for step in range(3):
        a.weigh(signals(step, [0, 1, 2, step % 3]))
    b = DoReMiProxyMixer(stage_results={"reference": StageResult("doremi", "reference", "test", tmp_path /
                                                                 "reference")}, domains=DOMAINS)
    b.load_state_dict(a.state_dict())
    for step in range(3, 6):
        wa, wb = a.weigh(signals(step, [2, 2, 0, 1])), b.weigh(signals(step, [2, 2, 0, 1]))
        assert torch.equal(wa.sample_weights, wb.sample_weights)
    assert torch.equal(a.weights, b.weights) and a.outputs() == b.outputs()
    a.save_artifacts(tmp_path / "a")
    b.save_artifacts(tmp_path / "b")
    assert (tmp_path / "a" / "weights.csv").read_text() == (tmp_path / "b" / "weights.csv").read_text()


def test_tokens_outside_the_reference_vocabulary_are_refused(tmp_path: Path) -> None:
    mixer = make_proxy(tmp_path)
    bad = signals(0, [0, 1])
    bad.input_ids[0, 0] = VOCAB + 5
    with pytest.raises(ConfigError, match=r"vocabulary of 97 but the proxy's data has token id 102"):
        mixer.weigh(bad)


def test_stages_and_their_tokenizers_are_checked_before_any_stage(tmp_path: Path) -> None:
    node = {"_target_": "baselines.doremi.DoReMiMixer", "mixture_from": "proxy", "eta": 1.0, "eps": 1e-3,
            "proxy_mixture": "equal", "reference_batch_size": 16,
            "reference": {"model": "gpt2_tiny", "max_steps": 2}, "proxy": {"model": "gpt2_tiny", "max_steps": 2}}
    reference, proxy = DoReMiMixer.plan_stages(node)
    assert (reference.name, proxy.name, proxy.needs) == ("reference", "proxy", ("reference",))
    assert reference.mixer == {"_target_": "baselines.uniform.UniformMixer"}
    assert proxy.mixer["eta"] == 1.0 and proxy.mixer["precision"] == "auto"
    with pytest.raises(ConfigError, match=r"reference trains with the gpt2 tokenizer and mixer\.proxy with bpe8k"):
        DoReMiMixer.plan_stages({**node, "reference": {"model": "gpt2_small"}})
    DoReMiMixer.plan_stages({**node, "reference": {"model": "gpt2_small", "tokenizer": "bpe8k"}})  # shared: fine


# ---- the pipeline: reference -> proxy -> main run -------------------------------------------------------

STAGES = ("mixer=doremi", "mixer.reference.trainer=debug", "mixer.proxy.trainer=debug",
          "mixer.reference.max_steps=4", "mixer.proxy.max_steps=6", "trainer.max_steps=3")


def doremi_config(local_corpus: Path, cache_dir: Path, output_root: Path, *extra: str):
    return to_run_config(compose_config([
        "model=gpt2_tiny", "dataset=jsonl", f"dataset.path={local_corpus}", "dataset.val_fraction=0.1",
        "dataset.val_sequences_per_domain=4", "trainer=debug", "logger=disabled", f"paths.cache_dir={cache_dir}",
        "trainer.device=cpu", f"paths.output_root={output_root}", *STAGES, *extra]))


def stage_dirs(output_root: Path) -> dict[str, Path]:
    return {p.name.split("-")[0]: p for p in (output_root / "stages" / "doremi").iterdir() if p.is_dir()}


def deterministic_train_records(run_dir: Path) -> list[dict]:
    """Train records without wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}
            for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def pipeline(local_corpus: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted pipeline (reference 4 steps, proxy 6, main 3), shared by the tests below."""
    root = tmp_path_factory.mktemp("doremi")
    started = time.perf_counter()
    result = run_training(doremi_config(local_corpus, cache_dir, root / "out"), root / "main")
    return {"root": root, "out": root / "out", "main": root / "main", "result": result,
            "seconds": time.perf_counter() - started}


def test_pipeline_trains_reference_then_proxy_and_samples_its_mixture(pipeline: dict) -> None:
    dirs = stage_dirs(pipeline["out"])
    assert set(dirs) == {"reference", "proxy"}
    reference, proxy = read_marker(dirs["reference"]), read_marker(dirs["proxy"])
    assert reference["complete"] and proxy["complete"] and (reference["steps"], proxy["steps"]) == (4, 6)
    assert proxy["needs"] == {"reference": reference["key"]}
    assert proxy["config"]["mixer"]["_target_"] == "baselines.doremi.DoReMiProxyMixer"
    weights = (dirs["proxy"] / "mixer" / "weights.csv").read_text().splitlines()
    assert weights[0].startswith("step,code,docs,licences,score:code") and len(weights) == 1 + 6
    saved = json.loads((dirs["proxy"] / "mixer" / "mixture.json").read_text())
    mixture = proxy["outputs"]["mixture"]
    assert saved["mixture"] == mixture and saved["updates"] == 6 and sum(mixture.values()) == pytest.approx(1.0)
    rows = [[float(x) for x in line.split(",")[1:4]] for line in weights[1:]]
    initial = list(saved["initial"].values())
    assert initial == pytest.approx([1 / 3] * 3)  # proxy_mixture=equal
    average = [(initial[d] + sum(r[d] for r in rows)) / 7 for d in range(3)]  # the initial weights: one term
    assert list(mixture.values()) == pytest.approx(average, rel=1e-9)
    logged = [r for r in read_metrics(dirs["proxy"]) if r["kind"] == "train"]
    assert len(logged) == 6 and all(f"mixer/weights/{d}" in r for r in logged for d in ("code", "docs", "licences"))
    assert logged[-1]["mixer/weights/docs"] == pytest.approx(rows[-1][1])
    main = torch.load(pipeline["main"] / "checkpoints" / "step_00000003.pt", weights_only=False)
    assert main["ranks"][0]["data"]["mixture"].tolist() == pytest.approx(list(mixture.values()))
    summary = json.loads((pipeline["main"] / "stages.json").read_text())
    assert [s["stage"] for s in summary] == ["reference", "proxy"] and not any(s["reused"] for s in summary)
    assert (dirs["reference"] / "hf" / "config.json").exists()


def test_another_main_seed_reuses_reference_and_proxy(pipeline: dict, local_corpus: Path, cache_dir: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    dirs = stage_dirs(pipeline["out"])
    before = {name: sorted((p.name, p.stat().st_mtime_ns) for p in (d / "checkpoints").iterdir())
              for name, d in dirs.items()}
    markers = {name: (d / "stage.json").read_text() for name, d in dirs.items()}
    started = time.perf_counter()
    run_training(doremi_config(local_corpus, cache_dir, pipeline["out"], "seed=1"), pipeline["root"] / "main1")
    seconds = time.perf_counter() - started
    summary = json.loads((pipeline["root"] / "main1" / "stages.json").read_text())
    assert all(s["reused"] for s in summary), summary
    assert {name: (d / "stage.json").read_text() for name, d in stage_dirs(pipeline["out"]).items()} == markers
    after = {name: sorted((p.name, p.stat().st_mtime_ns) for p in (d / "checkpoints").iterdir())
             for name, d in stage_dirs(pipeline["out"]).items()}
    assert after == before  # nothing retrained or re-saved
    stage_seconds = sum(s["wall_time_s"] for s in summary)
    with capsys.disabled():
        print(f"\n[doremi] first pipeline {pipeline['seconds']:.1f} s (stages trained in {stage_seconds:.1f} s); "
              f"second main seed {seconds:.1f} s: {pipeline['seconds'] - seconds:.1f} s saved")
    assert seconds < pipeline["seconds"]


def test_interrupted_proxy_resumes_bit_identically(pipeline: dict, local_corpus: Path, cache_dir: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(StageIncomplete, match=r"stage doremi/proxy stopped at step 2 of 6"):
        run_training(doremi_config(local_corpus, cache_dir, out, "+mixer.proxy.stop_after_steps=2"), tmp_path / "m")
    run_training(doremi_config(local_corpus, cache_dir, out), tmp_path / "m")
    straight, resumed = stage_dirs(pipeline["out"]), stage_dirs(out)
    assert resumed["proxy"].name == straight["proxy"].name  # stop_after_steps is not part of the key
    expected = deterministic_train_records(straight["proxy"])
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    assert deterministic_train_records(resumed["proxy"]) == expected
    assert (resumed["proxy"] / "mixer" / "weights.csv").read_text() == \
        (straight["proxy"] / "mixer" / "weights.csv").read_text()
    mixtures = [json.loads((d["proxy"] / "mixer" / "mixture.json").read_text()) for d in (resumed, straight)]
    assert [{k: v for k, v in m.items() if k != "reference"} for m in mixtures] == \
        [{k: v for k, v in mixtures[1].items() if k != "reference"}] * 2  # the reference's path differs
    assert read_marker(resumed["proxy"])["outputs"] == read_marker(straight["proxy"])["outputs"]


def test_interrupted_main_run_resumes_bit_identically(pipeline: dict, local_corpus: Path, cache_dir: Path,
                                                      tmp_path: Path) -> None:
    run_dir = tmp_path / "main"
    first = run_training(doremi_config(local_corpus, cache_dir, pipeline["out"], "trainer.stop_after_steps=1"),
                         run_dir)
    assert first.stopped_early
    run_training(doremi_config(local_corpus, cache_dir, pipeline["out"], "resume=true"), run_dir)
    assert deterministic_train_records(run_dir) == deterministic_train_records(pipeline["main"])
    assert (run_dir / "mixer" / "weights.csv").read_text() == (pipeline["main"] / "mixer" / "weights.csv").read_text()


def test_bad_stage_settings_are_one_line_errors(make_config, tmp_path: Path) -> None:
    out = f"paths.output_root={tmp_path / 'out'}"
    with pytest.raises(ConfigError, match=r"^mixer\.proxy\.max_steps must be a positive integer \(got 0\)$"):
        run_training(make_config("mixer=doremi", out, "mixer.proxy.max_steps=0"), tmp_path / "main")
    with pytest.raises(ConfigError, match=r"^mixer\.proxy: unknown key\(s\) colour for a stage of doremi"):
        run_training(make_config("mixer=doremi", out, "+mixer.proxy.colour=red"), tmp_path / "main")
    with pytest.raises(ConfigError, match=r"^mixer: unknown key\(s\) etaa \(its keys: mixture_from, eta, "):
        run_training(make_config("mixer=doremi", out, "+mixer.etaa=2"), tmp_path / "main")
    assert not (tmp_path / "out" / "stages").exists() or not any((tmp_path / "out" / "stages").rglob("stage.json"))


def test_doremi_config_composes_with_the_documented_defaults() -> None:
    cfg = to_run_config(compose_config(["mixer=doremi"]))
    node = cfg.mixer
    assert (node["eta"], node["eps"], node["proxy_mixture"], node["mixture_from"]) == (1.0, 1e-3, "equal", "proxy")
    assert node["reference"]["model"] == node["proxy"]["model"] == "gpt2_tiny"
    specs = DoReMiMixer.plan_stages(dict(node))
    assert [s.name for s in specs] == ["reference", "proxy"]
    assert dataclasses.asdict(specs[1])["settings"]["max_steps"] == node["proxy"]["max_steps"]
