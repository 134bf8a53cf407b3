"""Validation hold-out: every small domain gets its windows, fixed by seed, never trained on."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dograph.config import DataConfig
from dograph.data import builder
from dograph.data.builder import build_run_data, build_validation, tokenizer_cache_key
from dograph.data.corpus import build_corpus
from dograph.data.packing import (
    HOLDOUT_CEILING,
    DomainPacker,
    HoldoutRule,
    HoldoutSpec,
    document_u,
    encode_documents,
    is_blank,
    is_validation_doc,
    plan_domain_holdout,
)
from dograph.data.tokenizer import train_bpe
from dograph.distributed import DistContext
from dograph.errors import DataError

MARKER = re.compile(r"m(\d+)x")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"document m{i}x about topic {i % 7} with words alpha beta gamma" for i in range(300)]
    return train_bpe(texts, 400)


class ListSource:
    def __init__(self, name: str, texts: list[str]) -> None:
        self.name, self.texts = name, texts

    def documents(self, start: int = 0):
        return iter(self.texts[start:])


def marked(n: int, words: int = 3) -> list[str]:
    """Short documents, each with the unique marker ``m<i>x``."""
    return [f"m{i}x " + "alpha beta " * words for i in range(n)]


def markers(tokenizer, windows) -> set[int]:
    """Markers in the token stream of consecutive windows (they overlap by one token)."""
    stream = [int(t) for t in windows[0]] + [int(t) for w in windows[1:] for t in w[1:]]
    text = tokenizer.decode(stream)
    return {int(m) for m in MARKER.findall(text)}


def spec(domain: str, count: int = 16, seq_len: int = 16, fraction: float = 0.02, seed: int = 1234) -> HoldoutSpec:
    return HoldoutSpec(domain, fraction, seed, seq_len, count)


def held(rule: HoldoutRule, texts: list[str]) -> set[int]:
    return {i for i, t in enumerate(texts) if rule(i) and not is_blank(t)}


def test_small_domain_extends_the_share_to_the_windows(tokenizer) -> None:
    texts = marked(125)
    share = [i for i in range(125) if is_validation_doc("small", i, 0.02, 1234)]
    plan = plan_domain_holdout(ListSource("small", texts), tokenizer, spec("small"))
    assert len(plan.windows) == 16 and plan.windows.shape[1] == 17
    assert plan.extended and plan.in_share == len(share) and plan.documents == 125
    ids = held(plan.rule, texts)
    assert len(ids) == plan.held_out <= 125 // 2 and set(share) <= ids
    keys = sorted((document_u("small", i, 1234), i) for i in range(125))
    assert {i for _, i in keys[: len(ids)]} == ids  # a prefix of the hash order
    assert all(document_u("small", i, 1234) < HOLDOUT_CEILING for i in ids)
    assert markers(tokenizer, plan.windows) <= ids
    again = plan_domain_holdout(ListSource("small", texts), tokenizer, spec("small"))
    assert again.rule == plan.rule and torch.equal(again.windows, plan.windows)


def test_held_out_documents_never_reach_training(tokenizer) -> None:
    texts = marked(125)
    plan = plan_domain_holdout(ListSource("small", texts), tokenizer, spec("small"))
    ids = held(plan.rule, texts)
    rule = pickle.loads(pickle.dumps(plan.rule))
    seen = []
    for rank in (0, 1):
        packer = DomainPacker(ListSource("small", texts), tokenizer, seq_len=16, holdout=rule, rank=rank, world=2)
        seen.append(markers(tokenizer, [packer.next_window() for _ in range(60)]))
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(125)) - ids
    assert all(i % 2 == 0 for i in seen[0]) and all(i % 2 == 1 for i in seen[1])


def test_at_most_half_is_held_out_and_fewer_windows_are_kept(tokenizer) -> None:
    texts = marked(20)
    plan = plan_domain_holdout(ListSource("d", texts), tokenizer, spec("d", count=64))
    ids = held(plan.rule, texts)
    cap = min(10, sum(document_u("d", i, 1234) < HOLDOUT_CEILING for i in range(20)))
    assert len(ids) == plan.held_out == cap
    assert 1 <= len(plan.windows) < 64


def test_the_share_is_capped_at_half_of_a_small_domain(tokenizer) -> None:
    texts = marked(6, words=40)
    plan = plan_domain_holdout(ListSource("d", texts), tokenizer, spec("d", count=1, fraction=0.9))
    assert plan.in_share > 3 and plan.held_out == len(held(plan.rule, texts)) == 3


def test_blank_documents_are_not_packed_and_not_counted(tokenizer) -> None:
    texts = [t for i, doc in enumerate(marked(30)) for t in (doc, "   ", "\n" if i % 2 else "\t")]
    plan = plan_domain_holdout(ListSource("b", texts), tokenizer, spec("b", count=4, seq_len=12))
    assert plan.documents == 30 and len(plan.windows) == 4
    ids = held(plan.rule, texts)
    assert len(ids) == plan.held_out <= 15
    assert markers(tokenizer, plan.windows) == {int(MARKER.search(texts[i]).group(1)) for i in ids}
    stream = encode_documents(tokenizer, [texts[i] for i in sorted(ids)])  # the held texts, no blank one
    assert np.array_equal(np.concatenate([plan.windows[0], *[w[1:] for w in plan.windows[1:]]]),
                          stream[: 4 * 12 + 1])


@pytest.mark.parametrize("texts", [["hi"], [" ", "\n"], ["m1x alpha", "m2x"]])
def test_a_domain_without_one_window_errors_with_its_size(tokenizer, texts: list[str]) -> None:
    blank = sum(map(is_blank, texts))
    chars = sum(len(t) for t in texts if not is_blank(t))
    with pytest.raises(DataError, match=rf"domain 'tiny' cannot give one validation window of 65 tokens: "
                                        rf"it has {len(texts) - blank} non-blank documents \({chars} characters\)"
                                        r".*shorter trainer\.seq_len"):
        plan_domain_holdout(ListSource("tiny", texts), tokenizer, spec("tiny", seq_len=64))


def test_a_large_domain_holds_out_exactly_its_share_and_stops_reading(tokenizer) -> None:
    class Counting(ListSource):
        read = 0

        def documents(self, start: int = 0):
            for text in super().documents(start):
                Counting.read += 1
                yield text

    texts = marked(5000)
    plan = plan_domain_holdout(Counting("big", texts), tokenizer, spec("big", count=4, fraction=0.05))
    assert plan.documents is None and not plan.extended and len(plan.windows) == 4
    assert plan.rule == HoldoutRule.share("big", 1234, 0.05)
    assert all(plan.rule(i) == is_validation_doc("big", i, 0.05, 1234) for i in range(5000))
    assert Counting.read < 1000


def write_corpus(path: Path, sizes: dict[str, int]) -> Path:
    path.mkdir(exist_ok=True)
    for domain, n in sizes.items():
        with open(path / f"{domain}.jsonl", "w") as handle:
            for text in marked(n, words=4 + n % 3):
                handle.write(json.dumps({"text": f"{domain} {text}"}) + "\n")
    return path


def test_validation_does_not_depend_on_run_seed_or_mixture(tmp_path: Path, caplog) -> None:
    corpus_dir = write_corpus(tmp_path / "corpus", {"small": 125, "big": 1500})
    runs = []
    for seed, mixture in ((1, None), (99, {"small": 0.9, "big": 0.1})):
        cfg = DataConfig(source="jsonl", path=str(corpus_dir), natural_mixture=mixture, val_sequences_per_domain=8)
        with caplog.at_level(logging.INFO, logger="dograph.data.builder"):
            runs.append(build_run_data(cfg, tokenizer_name="bpe1k", seq_len=16, cache_dir=tmp_path / "cache",
                                       seed=seed, dist=DistContext()))
    one, two = runs
    assert [len(v) for v in one.validation] == [8, 8]
    assert all(torch.equal(x, y) for x, y in zip(one.validation, two.validation, strict=True))
    assert [p.holdout for p in one.sampler.packers] == [p.holdout for p in two.sampler.packers]
    assert "domain 'small': 8 validation windows; holds out" in caplog.text
    assert "extended beyond val_fraction=0.02" in caplog.text
    cfg = DataConfig(source="jsonl", path=str(corpus_dir), val_sequences_per_domain=8)
    assert all(torch.equal(x, y) for x, y in zip(one.validation, build_validation(
        cfg, build_corpus(cfg, tmp_path), one.tokenizer, seq_len=16), strict=True))


def test_tokenizer_sample_skips_every_possible_holdout(tmp_path: Path) -> None:
    corpus_dir = write_corpus(tmp_path / "corpus", {"small": 125})
    cfg = DataConfig(source="jsonl", path=str(corpus_dir))
    corpus = build_corpus(cfg, tmp_path)
    sample = list(builder._training_sample(cfg, corpus))
    ids = {int(MARKER.search(t).group(1)) for t in sample}
    assert ids == {i for i in range(125) if document_u("small", i, cfg.val_seed) >= HOLDOUT_CEILING}
    assert tokenizer_cache_key(corpus)[:16] != corpus.fingerprint[:16]
