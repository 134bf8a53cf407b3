"""Data pipeline: sources, corrupt input, packing, sampling, hold-out, tokenizers, the HF code path."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dograph.config import DataConfig
from dograph.data.builder import build_validation
from dograph.data.corpus import build_corpus
from dograph.data.hub import hf_corpus
from dograph.data.packing import DomainPacker, is_validation_doc
from dograph.data.sampler import MixtureSampler
from dograph.data.tokenizer import gpt2_tokenizer, is_pretrained, load_tokenizer, tokenizer_vocab_size, train_bpe
from dograph.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"document {i} about topic {i % 7} with words alpha beta gamma" for i in range(300)]
    return train_bpe(texts, 400)


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def docs(prefix: str, n: int) -> list[dict]:
    return [{"text": f"{prefix} doc {i} " + "word " * (5 + i % 5)} for i in range(n)]


def test_jsonl_directory_domains_and_mixture(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "alpha.jsonl", docs("a", 30))
    write_jsonl(tmp_path / "beta.jsonl.gz", docs("b", 10), opener=gzip.open)
    corpus = build_corpus(DataConfig(source="jsonl", path=str(tmp_path)), tmp_path)
    assert corpus.domains == ["alpha", "beta"]
    assert corpus.natural_mixture[0] > corpus.natural_mixture[1] > 0
    assert abs(sum(corpus.natural_mixture) - 1) < 1e-12
    assert next(corpus.train[1].documents(start=3)).startswith("b doc 3 ")


def test_single_file_with_domain_field(tmp_path: Path) -> None:
    records = [{"text": f"t{i}", "meta": {"src": "x" if i % 3 else "y"}} for i in range(30)]
    path = write_jsonl(tmp_path / "all.jsonl", records)
    corpus = build_corpus(DataConfig(source="jsonl", path=str(path), domain_field="meta.src"), tmp_path)
    assert corpus.domains == ["x", "y"]
    assert list(corpus.train[1].documents()) == [f"t{i}" for i in range(0, 30, 3)]


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "invalid JSON"), ('{"txt": "x"}', "no string field 'text'"), ("[1, 2]", "line is not a JSON object")])
def test_corrupt_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    write_jsonl(tmp_path / "d.jsonl", [*docs("a", 3), line, *docs("b", 2)])
    corpus = build_corpus(DataConfig(source="jsonl", path=str(tmp_path)), tmp_path)
    with pytest.raises(DataError, match=rf"d\.jsonl:4: {problem}"):
        list(corpus.train[0].documents())
    skipping = build_corpus(DataConfig(source="jsonl", path=str(tmp_path), skip_bad_lines=True), tmp_path)
    assert len(list(skipping.train[0].documents())) == 5
    assert sum(skipping.bad_lines.counts.values()) == 1


def test_missing_directory_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_corpus(DataConfig(source="jsonl", path=str(tmp_path / "nope")), tmp_path)
    with pytest.raises(DataError, match=r"no \*\.jsonl"):
        build_corpus(DataConfig(source="jsonl", path=str(tmp_path)), tmp_path)


class ListSource:
    def __init__(self, name: str, texts: list[str]) -> None:
        self.name, self.texts = name, texts

    def documents(self, start: int = 0):
        return iter(self.texts[start:])


def test_packer_windows_overlap_by_one_and_cycle(tokenizer) -> None:
    source = ListSource("d", [f"document {i} about topic" for i in range(5)])
    packer = DomainPacker(source, tokenizer, seq_len=8)
    stream = np.concatenate([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in source.texts])
    windows = [packer.next_window() for _ in range(6)]
    assert all(len(w) == 9 for w in windows)
    assert all(windows[i][-1] == windows[i + 1][0] for i in range(5))
    flat = np.concatenate([windows[0], *[w[1:] for w in windows[1:]]])
    assert np.array_equal(flat[: len(stream)], stream)  # exactly the token stream, then the next epoch
    assert packer.epoch >= 1


def test_packer_resume_and_rank_shards(tokenizer) -> None:
    texts = [f"document {i} about topic {i}" for i in range(40)]
    a = DomainPacker(ListSource("d", texts), tokenizer, seq_len=6)
    for _ in range(5):
        a.next_window()
    b = DomainPacker(ListSource("d", texts), tokenizer, seq_len=6)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(a.next_window(), b.next_window()) for _ in range(20))
    shards = [DomainPacker(ListSource("d", texts), tokenizer, seq_len=6, rank=r, world=2) for r in (0, 1)]
    for shard in shards:
        shard._read_documents()
    seen = [set(range(s.rank, 40, 2)[: s.docs_this_epoch]) for s in shards]
    assert seen[0].isdisjoint(seen[1]) and all(seen)


def test_holdout_is_fixed_and_excluded_from_training(tokenizer) -> None:
    held = [i for i in range(2000) if is_validation_doc("d", i, 0.05, seed=7)]
    assert 50 < len(held) < 150
    assert held == [i for i in range(2000) if is_validation_doc("d", i, 0.05, seed=7)]
    texts = [f"unique{i} " for i in range(200)]
    packer = DomainPacker(ListSource("d", texts), tokenizer, seq_len=4,
                          holdout=lambda i: is_validation_doc("d", i, 0.2, seed=1))
    consumed = [t for t in texts if not is_validation_doc("d", texts.index(t), 0.2, seed=1)]
    got = packer._read_documents()
    assert got == consumed[: len(got)]


def test_sampler_follows_mixture_and_resumes(tokenizer) -> None:
    def make() -> MixtureSampler:
        packers = [DomainPacker(ListSource(n, [f"{n} text {i}" for i in range(50)]), tokenizer, seq_len=4)
                   for n in ("a", "b", "c")]
        return MixtureSampler(packers, [0.7, 0.2, 0.1], seed=3)

    sampler = make()
    domains = torch.cat([sampler.next_batch(64).domain for _ in range(30)])
    shares = torch.bincount(domains, minlength=3).double() / len(domains)
    assert torch.allclose(shares, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.03)
    sampler.set_mixture(torch.tensor([0.0, 0.0, 1.0]))
    assert (sampler.next_batch(16).domain == 2).all()
    other = make()
    other.load_state_dict(sampler.state_dict())
    x, y = sampler.next_batch(8), other.next_batch(8)
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.domain, y.domain)
    assert torch.equal(x.input_ids[:, 1:], x.targets[:, :-1])


def test_global_batch_slots_split_over_ranks(tokenizer) -> None:
    def sampler(rank: int, world: int) -> MixtureSampler:
        packers = [DomainPacker(ListSource(n, [f"{n} {i}" for i in range(20)]), tokenizer, seq_len=4,
                                rank=rank, world=world) for n in ("a", "b", "c", "d")]
        return MixtureSampler(packers, [0.25] * 4, seed=5, rank=rank, world=world)

    single = sampler(0, 1).next_batch(8).domain
    parts = torch.cat([sampler(r, 2).next_batch(4).domain for r in (0, 1)])
    assert torch.equal(single, parts)


def test_validation_set_is_independent_of_the_mixture(tmp_path: Path, tokenizer) -> None:
    for name in ("a", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", docs(name, 200))
    cfg = DataConfig(source="jsonl", path=str(tmp_path), val_fraction=0.1, val_sequences_per_domain=3)
    one = build_validation(cfg, build_corpus(cfg, tmp_path), tokenizer, seq_len=8)
    cfg2 = DataConfig(source="jsonl", path=str(tmp_path), val_fraction=0.1, val_sequences_per_domain=3,
                      natural_mixture={"a": 0.9, "b": 0.1})
    two = build_validation(cfg2, build_corpus(cfg2, tmp_path), tokenizer, seq_len=8)
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))
    assert [len(v) for v in one] == [3, 3]


def test_hf_loader_on_a_local_directory_with_the_hub_schema(tmp_path: Path) -> None:
    """The SlimPajama code path (load_dataset streaming + meta.redpajama_set_name filter), offline."""
    names = ["RedPajamaArXiv", "RedPajamaGithub"]
    rows = [{"text": f"{names[i % 2]} text {i}", "meta": {"redpajama_set_name": names[i % 2]}} for i in range(40)]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows[:10])
    cfg = DataConfig(source="hf", path=str(tmp_path / "data"), split="train", val_split="validation",
                     domain_field="meta.redpajama_set_name", domains=names,
                     natural_mixture={names[0]: 0.3, names[1]: 0.7})
    corpus = hf_corpus(cfg)
    assert corpus.natural_mixture == pytest.approx([0.3, 0.7])
    assert list(corpus.train[1].documents(start=18)) == [f"RedPajamaGithub text {i}" for i in (37, 39)]
    assert len(list(corpus.validation[0].documents())) == 5


def test_hf_loader_without_network_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(source="hf", path="DKYoon/SlimPajama-6B", domain_field="meta.redpajama_set_name")
    with pytest.raises(DataError, match="no network: use dataset=embedded or dataset=jsonl"):
        hf_corpus(cfg)


def test_gpt2_tokenizer_matches_openai() -> None:
    tok = gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256


def test_bpe_is_trained_once_and_cached(tmp_path: Path) -> None:
    texts = [f"sample text number {i}" for i in range(200)]
    first = load_tokenizer("bpe1k", tmp_path, corpus_fingerprint="abc", training_texts=iter(texts))
    again = load_tokenizer("bpe1k", tmp_path, corpus_fingerprint="abc", training_texts=None)
    assert first("sample text")["input_ids"] == again("sample text")["input_ids"]
    assert again.eos_token == "<|endoftext|>"


def save_wordpiece_tokenizer(directory: Path, *, eos: str | None = "[EOS]") -> Path:
    """A tokenizer none of the project's: WordPiece with its own special tokens, saved as a user would."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"a document about topic {i % 9} with words alpha beta gamma delta {i}" for i in range(300)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=eos).save_pretrained(str(directory))
    return directory


def never_read() -> Iterator[str]:
    raise AssertionError("a pretrained tokenizer must not read training text")
    yield ""


def test_pretrained_tokenizer_from_a_directory(tmp_path: Path) -> None:
    directory = save_wordpiece_tokenizer(tmp_path / "my tokenizer")
    tok = load_tokenizer(str(directory), tmp_path / "cache", corpus_fingerprint="abc", training_texts=never_read())
    assert tok.eos_token == "[EOS]" and tok.eos_token_id == tok.convert_tokens_to_ids("[EOS]")
    assert tok.convert_ids_to_tokens(tok("Alpha beta", add_special_tokens=False)["input_ids"]) == ["alpha", "beta"]
    assert tokenizer_vocab_size(str(directory)) == len(tok) < 1024  # sized by the tokenizer itself
    assert is_pretrained(str(directory)) and not is_pretrained("gpt2") and not is_pretrained("bpe8k")
    assert not (tmp_path / "cache").exists()  # nothing trained or cached


@pytest.mark.parametrize(("name", "expected"), [
    ("{tmp}/missing", "is not a directory"),
    ("dograph-tests/no-such-tokenizer", "cannot reach the Hugging Face hub for tokenizer 'dograph-tests/no-such"),
    ("{tmp}/no_eos", "has no EOS token"),
    ("{tmp}", "cannot load it with AutoTokenizer"),
])
def test_pretrained_tokenizer_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                  expected: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: a hub name is read from the HF cache only
    save_wordpiece_tokenizer(tmp_path / "no_eos", eos=None)
    with pytest.raises(DataError) as info:
        load_tokenizer(name.format(tmp=tmp_path), tmp_path / "cache")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_run_trains_and_exports_a_pretrained_tokenizer(make_config, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """tokenizer=DIR: the model's vocabulary is the tokenizer's, and hf/ holds both (lm-eval loads them)."""
    from transformers import AutoConfig, AutoTokenizer

    from dograph.runs.app import run_training

    directory = str(save_wordpiece_tokenizer(tmp_path / "tok"))
    mine = load_tokenizer(directory, tmp_path)
    run_training(make_config(f"tokenizer={directory}", "trainer.max_steps=0"), tmp_path / "dry")
    assert f"vocabulary {len(mine)} ({directory})" in capsys.readouterr().out
    run_training(make_config(f"tokenizer={directory}", "mixer=uniform", "trainer.max_steps=2",
                             "trainer.export_hf=true"), tmp_path / "run")
    config = AutoConfig.from_pretrained(str(tmp_path / "run" / "hf"))
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "hf"))
    assert config.vocab_size == len(mine) == len(exported) and config.eos_token_id == mine.eos_token_id
    text = "Alpha beta gamma, topic 3"
    assert exported(text)["input_ids"] == mine(text)["input_ids"]


def test_pretrained_tokenizer_fails_before_the_corpus_is_read(make_config, tmp_path: Path) -> None:
    from dograph.runs.app import run_training

    for name, expected in ((str(tmp_path / "missing"), "is not a directory"),
                           ("dograph-tests/no-such-tokenizer", "cannot reach the Hugging Face hub")):
        cfg = make_config(f"tokenizer={name}", f"dataset.path={tmp_path / 'no corpus'}")  # read first: DataError
        with pytest.raises(DataError, match=expected):
            run_training(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()  # nothing started


def test_small_domain_gets_its_validation_windows(tmp_path: Path, tokenizer) -> None:
    """A 125-document domain: the 2% hash share alone gives too few windows (or none)."""
    write_jsonl(tmp_path / "big.jsonl", docs("big", 2000))
    write_jsonl(tmp_path / "small.jsonl", docs("small", 125))
    cfg = DataConfig(source="jsonl", path=str(tmp_path), val_sequences_per_domain=16)
    corpus = build_corpus(cfg, tmp_path)
    share = sum(is_validation_doc("small", i, cfg.val_fraction, cfg.val_seed) for i in range(125))
    assert share <= 3  # that share holds at most ~45 tokens, not 16 windows of 16
    windows = build_validation(cfg, corpus, tokenizer, seq_len=16)
    assert [len(w) for w in windows] == [16, 16]


def test_evenly_spaced_takes_both_ends_and_distinct_items_in_order() -> None:
    from dograph.data.packing import evenly_spaced

    items = list(range(1404))
    picked = evenly_spaced(items, 128)
    assert len(picked) == len(set(picked)) == 128 and picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] == 1403 and int(np.diff(picked).max()) <= 12
    assert evenly_spaced(items[:5], 128) == items[:5] and evenly_spaced(items, 1) == [0]
