"""Planted-structure corpora (dataset=planted): shares, word salad, duplicates, hidden labels, bad input.

Every test plants into the small local corpus of tests/helpers.py (code, docs, licences; 1000-character
documents), read as a jsonl base, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from helpers import REPO, build_local_corpus
from scipy.stats import chi2

from dograph.config import DataConfig, PlantedConfig, to_run_config
from dograph.data.builder import build_run_data, plan_holdouts
from dograph.data.corpus import build_corpus, planted_directory
from dograph.data.planted import (
    HIDDEN_FIELD,
    fresh_source,
    hidden_split,
    hidden_token_labels,
    load_manifest,
)
from dograph.data.planted import build as planted_build
from dograph.distributed import DistContext
from dograph.errors import ConfigError, DataError
from dograph.runs.pipeline import _dataset_identity, corpus_fingerprint

SEQ_LEN = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_local_corpus(tmp_path_factory.mktemp("base"), doc_chars=1000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("planted_cache")


def planted(base: Path, scenario: str, **settings) -> DataConfig:
    defaults = {"duplicates": {"duplicate_domain": "docs"}, "hidden_split": {"merge_domains": ["code", "licences"]}}
    return DataConfig(source="jsonl", path=str(base), val_fraction=0.1, val_sequences_per_domain=4,
                      planted=PlantedConfig(scenario=scenario, **{**defaults.get(scenario, {}), **settings}))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def base_texts(base: Path, domain: str) -> list[str]:
    return [r["text"] for r in records(base / f"{domain}.jsonl")]


# ---- building and caching ----------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "domains"), [
    ("noise", ["code", "docs", "licences", "noise"]),
    ("duplicates", ["code", "docs-dup", "licences"]),
    ("hidden_split", ["code+licences", "docs"])])
def test_each_scenario_builds_offline_and_is_reused(base: Path, tmp_path: Path, monkeypatch, scenario: str,
                                                    domains: list[str]) -> None:
    cfg = planted(base, scenario)
    start = time.perf_counter()
    corpus = build_corpus(cfg, tmp_path)
    assert time.perf_counter() - start < 60
    assert corpus.domains == domains
    directory = planted_directory(cfg, tmp_path)
    assert directory.parent == tmp_path / "planted" and directory.name.startswith(f"{scenario}-")
    manifest = load_manifest(directory)
    assert manifest["planted"]["scenario"] == scenario and sorted(manifest["domains"]) == domains

    def no_build(*args, **kwargs):
        raise AssertionError("the cached planted corpus should have been reused")

    monkeypatch.setattr(planted_build, "_build", no_build)
    again = build_corpus(cfg, tmp_path)
    assert again.fingerprint == corpus.fingerprint and again.natural_mixture == corpus.natural_mixture


def test_builds_are_deterministic_and_keyed_by_settings(base: Path, tmp_path: Path) -> None:
    def build(cache: Path, **settings) -> tuple[Path, dict]:
        directory = planted_directory(planted(base, "noise", **settings), cache)
        return directory, load_manifest(directory)

    first, manifest = build(tmp_path / "a")
    second, again = build(tmp_path / "b")
    assert first.name == second.name and again["domains"] == manifest["domains"]  # same files, same sha256
    assert build(tmp_path / "a", seed=1)[0].name != first.name
    assert build(tmp_path / "a", share=0.3)[0].name != first.name
    assert planted_directory(planted(base, "duplicates"), tmp_path / "a").name != first.name
    with open(base / "docs.jsonl", "a") as handle:  # the base corpus changed: its fingerprint is in the key
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    try:
        assert build(tmp_path / "a")[0].name != first.name
    finally:
        lines = (base / "docs.jsonl").read_text().splitlines(keepends=True)
        (base / "docs.jsonl").write_text("".join(lines[:-1]))


def test_a_changed_file_is_named(base: Path, tmp_path: Path) -> None:
    cfg = planted(base, "noise")
    directory = planted_directory(cfg, tmp_path)
    with open(directory / "noise.jsonl", "a") as handle:
        handle.write("{}\n")
    with pytest.raises(DataError, match=r"noise\.jsonl is missing or does not match .* delete"):
        build_corpus(cfg, tmp_path)


# ---- shares --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "domain", "share"), [
    ("noise", "noise", None), ("noise", "noise", 0.4), ("duplicates", "docs-dup", None),
    ("duplicates", "docs-dup", 0.1)])
def test_planted_share_is_within_one_percent_and_is_the_natural_mixture(base: Path, cache: Path, scenario: str,
                                                                       domain: str, share: float | None) -> None:
    cfg = planted(base, scenario, share=share)
    target = cfg.planted.target_share
    assert target == (share or {"noise": 0.25, "duplicates": 0.20}[scenario])
    corpus = build_corpus(cfg, cache)
    directory = planted_directory(cfg, cache)
    sizes = {d: sum(len(t.encode()) for t in (r["text"] for r in records(directory / f"{d}.jsonl")))
             for d in corpus.domains}  # text bytes, measured from the files
    measured = sizes[domain] / sum(sizes.values())
    assert abs(measured - target) <= 0.01 * target
    mixture = dict(zip(corpus.domains, corpus.natural_mixture, strict=True))
    assert mixture == pytest.approx({d: s / sum(sizes.values()) for d, s in sizes.items()}, rel=1e-12)


def test_hidden_split_keeps_the_merged_domains_natural_share(base: Path, cache: Path) -> None:
    corpus = build_corpus(planted(base, "hidden_split"), cache)
    sizes = {d: sum(len(t.encode()) for t in base_texts(base, d)) for d in ("code", "docs", "licences")}
    expected = (sizes["code"] + sizes["licences"]) / sum(sizes.values())
    assert corpus.natural_mixture[corpus.domains.index("code+licences")] == pytest.approx(expected, rel=1e-12)


# ---- noise: nothing but unigram statistics -------------------------------------------------------------


def mass_bins(words: list[list[str]], bins: int) -> dict[str, int]:
    """Each word's bin: words by falling frequency cut into ``bins`` runs of about equal mass."""
    counts = Counter(w for doc in words for w in doc)
    total, seen, out = sum(counts.values()), 0, {}
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        out[word] = min(bins - 1, seen * bins // total)
        seen += count
    return out


def independence_p_value(words: list[list[str]], bins: int = 8) -> float:
    """Chi-square test that a word's bin is independent of the previous word's (pairs within documents)."""
    bin_of = mass_bins(words, bins)
    table = np.zeros((bins, bins))
    for doc in words:
        ids = [bin_of[w] for w in doc]
        np.add.at(table, (ids[:-1], ids[1:]), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    keep = expected > 0
    statistic = float((((table - expected) ** 2)[keep] / expected[keep]).sum())
    rows, cols = int((table.sum(1) > 0).sum()), int((table.sum(0) > 0).sum())
    return float(chi2.sf(statistic, (rows - 1) * (cols - 1)))


def test_noise_bigrams_are_the_product_of_its_unigrams(base: Path, cache: Path) -> None:
    directory = planted_directory(planted(base, "noise"), cache)
    noise = [r["text"].split() for r in records(directory / "noise.jsonl")]
    assert sum(map(len, noise)) > 20_000
    assert independence_p_value(noise) > 1e-3  # seeded: the same statistic on every run
    real = [t.split() for d in ("code", "docs", "licences") for t in base_texts(base, d)]
    assert independence_p_value(real) < 1e-12  # the test has the power to see real text's order
    # and the unigrams are the base corpus's: the top words' frequencies agree within 5 standard errors
    ours, theirs = Counter(w for d in noise for w in d), Counter(w for d in real for w in d)
    n, m = sum(ours.values()), sum(theirs.values())
    for word, count in theirs.most_common(10):
        p = count / m
        assert abs(ours[word] / n - p) < 5 * np.sqrt(p * (1 - p) / n), word


# ---- duplicates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [8, 3])
def test_duplicated_domain_has_exactly_the_configured_distinct_documents(base: Path, cache: Path,
                                                                        count: int) -> None:
    cfg = planted(base, "duplicates", duplicate_documents=count)
    directory = planted_directory(cfg, cache)
    copies = [r["text"] for r in records(directory / "docs-dup.jsonl")]
    original = base_texts(base, "docs")
    assert len(set(copies)) == count and set(copies) <= set(original)
    assert len(copies) >= 5 * count  # repeated, not a handful of documents once
    fresh = [text for text in fresh_source(directory).documents()]
    assert set(fresh).isdisjoint(copies) and set(fresh) | set(copies) == {t for t in original if t.strip()}
    corpus = build_corpus(cfg, cache)
    assert "docs" not in corpus.domains  # fresh documents are never trained on


def test_too_few_distinct_documents_is_one_line(base: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_corpus(planted(base, "duplicates", duplicate_documents=100_000), tmp_path)
    assert "has 200 distinct documents, fewer than dataset.planted.duplicate_documents=100000" in str(info.value)
    assert "\n" not in str(info.value)


# ---- hidden_split --------------------------------------------------------------------------------------


def test_hidden_labels_are_for_evaluation_only(base: Path, cache: Path) -> None:
    cfg = planted(base, "hidden_split")
    data = build_run_data(cfg, tokenizer_name="bpe1k", seq_len=SEQ_LEN, cache_dir=cache, seed=0, dist=DistContext())
    # what a mixer sees: two domains, the merged one under one label
    assert data.corpus.domains == ["code+licences", "docs"]
    domains = {int(d) for _ in range(20) for d in data.sampler.next_batch(8).domain}
    assert domains == {0, 1}
    assert [f.name for f in dataclasses.fields(data.sampler.next_batch(2))] == ["input_ids", "targets", "domain"]
    merged = data.corpus.train[0]
    assert all(isinstance(text, str) for text in merged.documents())  # the training source yields text only
    # what evaluation reads: every document's own domain, in the merged domain's document order
    directory = planted_directory(cfg, cache)
    split = hidden_split(directory)
    lines = records(directory / "code+licences.jsonl")
    assert split.domain == "code+licences" and split.labels == ["code", "licences"]
    assert [split.label(i) for i in range(len(lines))] == [r[HIDDEN_FIELD] for r in lines]
    assert np.bincount(split.of_document).tolist() == [len(base_texts(base, "code")), len(base_texts(base, "licences"))]
    assert all(r["text"] in set(base_texts(base, r[HIDDEN_FIELD])) for r in lines[:50])
    assert set(split.of_document[:40].tolist()) == {0, 1}  # interleaved, not one domain after the other
    # and the label of every token of the merged domain's validation windows, packed as the run packs them
    (holdout, _) = plan_holdouts(cfg, data.corpus, data.tokenizer, SEQ_LEN)
    windows, labels = hidden_token_labels(split, merged, holdout.rule, data.tokenizer, SEQ_LEN,
                                          cfg.val_sequences_per_domain)
    assert np.array_equal(windows.numpy(), data.validation[0].numpy()) and labels.shape == windows.shape
    assert set(labels.unique().tolist()) <= {0, 1}
    changes = labels[:, 1:] != labels[:, :-1]  # a label changes only after a document's EOS
    assert (windows[:, :-1][changes] == data.tokenizer.eos_token_id).all()


def test_hidden_labels_only_in_a_hidden_split_corpus(base: Path, cache: Path) -> None:
    with pytest.raises(DataError, match="noise corpus: it has no hidden labels"):
        hidden_split(planted_directory(planted(base, "noise"), cache))


# ---- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.planted.scenario=nois", "dataset.planted.scenario must be one of none, noise, duplicates, "
                                      "hidden_split (got 'nois')"),
    ("dataset.planted.share=1.5", "dataset.planted.share must be in (0, 1) (got 1.5)"),
    ("dataset.planted.share=0", "dataset.planted.share must be in (0, 1) (got 0.0)"),
    ("dataset.planted.duplicate_documents=0", "dataset.planted.duplicate_documents must be >= 1 (got 0)"),
    ("dataset.planted.merge_domains=[code]", "dataset.planted.merge_domains must name at least two different"),
    ("dataset.source=hf", "dataset.source must be embedded or jsonl to plant structure in it"),
])
def test_bad_planted_settings_are_one_line(override: str, message: str) -> None:
    extra = ["dataset.path=x"] if "source" in override else []
    with pytest.raises(ConfigError) as info:
        to_run_config(compose_config(["dataset=planted", override, *extra]))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_share_does_not_apply_to_hidden_split() -> None:
    with pytest.raises(ConfigError, match=r"^dataset\.planted\.share does not apply to scenario hidden_split"):
        to_run_config(compose_config(["dataset=planted", "dataset.planted.scenario=hidden_split",
                                      "dataset.planted.share=0.3"]))


@pytest.mark.parametrize(("scenario", "settings", "message"), [
    ("duplicates", {"duplicate_domain": "books"}, "dataset.planted.duplicate_domain names ['books'], not a domain"),
    ("hidden_split", {"merge_domains": ["code", "latex"]}, "dataset.planted.merge_domains names ['latex'], not a"),
])
def test_a_domain_the_base_lacks_is_one_line(base: Path, tmp_path: Path, scenario: str, settings: dict,
                                             message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_corpus(planted(base, scenario, **settings), tmp_path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_planted_option_composes_with_the_embedded_base() -> None:
    cfg = to_run_config(compose_config(["dataset=planted", "dataset.planted.scenario=duplicates"]))
    assert cfg.dataset.source == "embedded" and cfg.dataset.planted.duplicate_domain == "books"
    assert cfg.dataset.planted.target_share == 0.20 and cfg.dataset.planted.merged_domain == "code+latex"
    assert DataConfig(**dataclasses.asdict(cfg.dataset)).planted == cfg.dataset.planted  # a sweep job's config
    assert to_run_config(compose_config(["dataset=planted"])).dataset.planted.scenario == "noise"
    assert not to_run_config(compose_config([])).dataset.planted.active  # every other option: as it is
    unplanted = to_run_config(compose_config(["dataset=planted", "dataset.planted.scenario=none"]))
    assert not unplanted.dataset.planted.active
    jsonl = to_run_config(compose_config(["dataset=jsonl", "dataset.path=/data", "dataset.planted.scenario=noise"]))
    assert jsonl.dataset.planted.active and jsonl.dataset.planted.target_share == 0.25


def test_stage_keys_of_unplanted_runs_do_not_change(base: Path, cache: Path) -> None:
    assert "planted" not in _dataset_identity(DataConfig()) and not DataConfig().planted.active
    cfg = planted(base, "noise")
    assert _dataset_identity(cfg)["planted"]["scenario"] == "noise"
    fingerprint = corpus_fingerprint(cfg, cache)
    assert fingerprint.startswith("planted:")
    other = dataclasses.replace(cfg.planted, seed=1)
    assert corpus_fingerprint(dataclasses.replace(cfg, planted=other), cache) != fingerprint


# ---- end to end ----------------------------------------------------------------------------------------


def test_run_py_trains_two_steps_on_a_planted_corpus(base: Path, cache: Path, tmp_path: Path) -> None:
    args = ["dataset=planted", "dataset.source=jsonl", f"dataset.path={base}", "dataset.planted.scenario=noise",
            "dataset.val_sequences_per_domain=4", "model=gpt2_tiny", "tokenizer=bpe1k", "mixer=uniform",
            "trainer=debug", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.device=cpu", "logger=disabled",
            f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "planted corpus (noise, domain 'noise')" in proc.stdout
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in evals if e.get("kind") == "eval"][-1]
    assert final["step"] == 2 and np.isfinite(final["val/noise/loss"])


def test_noise_domain_name_must_be_free(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    for name in ("noise", "other"):
        (tmp_path / "base" / f"{name}.jsonl").write_text(json.dumps({"text": f"{name} text"}) + "\n")
    with pytest.raises(ConfigError, match="already has a domain 'noise'"):
        build_corpus(planted(tmp_path / "base", "noise"), tmp_path)
