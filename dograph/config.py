"""Typed schemas of the configuration trunk, registered in Hydra's ConfigStore.

Hydra composes ``conf/config.yaml`` on top of :class:`RunConfig`, so a value of the wrong
type fails at composition with a message naming its key (``full_key: trainer.max_steps``);
``__post_init__`` checks values (positivity, choices) when ``run.py`` converts the
config to these dataclasses, before any work starts. Mixer and objective nodes
(``_target_`` + that method's keyword arguments) are typed by the method's own settings
class (``dograph.settings``), registered here from the ``_target_`` of each
``conf/mixer/*.yaml`` and ``conf/objective/*.yaml``, and reach the methods as plain dicts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class

from dograph.errors import ConfigError
from dograph.settings import omegaconf_schema, require, validated_node


def _require_positive(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            require(value > 0, f"{prefix}.{name}", "must be > 0", value)


def _require_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, f"must be one of {', '.join(choices)}", value)


BPE_TOKENIZER = re.compile(r"^bpe(\d+)k$")  # a byte-level BPE of N*1024 entries trained on the corpus
SEED_LIMIT = 2**32  # numpy's seed range: seeds are in [0, 2**32)


def _check_tokenizer(name: str) -> None:
    """``gpt2``, ``bpe<N>k`` with N >= 1, or any other non-empty name (a tokenizer directory or hub id)."""
    require(bool(name.strip()), "tokenizer", "must be gpt2, bpe<N>k, a tokenizer directory or a hub name", name)
    bpe = BPE_TOKENIZER.match(name)
    require(bpe is None or int(bpe.group(1)) >= 1, "tokenizer",
             "bpe<N>k needs N >= 1 (a BPE of N*1024 entries, e.g. bpe8k)", name)


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer, built from scratch with transformers."""

    family: str = "gpt2"  # gpt2 | llama
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # llama grouped-query attention; None = n_head
    d_model: int = 256
    d_ff: int = 1024
    max_position_embeddings: int = 1024
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tokenizer: str = "bpe8k"  # default tokenizer of this shape (root key `tokenizer` reads it)

    def __post_init__(self) -> None:
        _require_choice(self.family, "model.family", ("gpt2", "llama"))
        _require_positive(self, "model", ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                                          "max_position_embeddings"))
        require(self.d_model % self.n_head == 0, "model.d_model",
                 f"must be divisible by model.n_head={self.n_head}", self.d_model)


PLANTED_SCENARIOS = ("none", "noise", "duplicates", "hidden_split")  # none: the corpus as it is
PLANTED_DEFAULT_SHARE = {"noise": 0.25, "duplicates": 0.20}  # our choices (docs/design.md section 4.5)


@dataclass
class PlantedConfig:
    """Structure planted in the base corpus, to see whether a mixer finds it (docs/design.md section 4.5)."""

    scenario: str = "none"  # none | noise | duplicates | hidden_split (dataset=planted sets noise)
    share: float | None = None  # the planted domain's share of the text bytes; None = the scenario's default
    seed: int = 0  # the word salad, the duplicated documents, the merged domain's order (not the run seed)
    duplicate_domain: str = "books"  # duplicates: the base domain replaced by copies of a few of its documents
    duplicate_documents: int = 8  # duplicates: how many distinct documents are repeated
    merge_domains: list[str] = field(default_factory=lambda: ["code", "latex"])  # hidden_split: merged under one label

    def __post_init__(self) -> None:
        _require_choice(self.scenario, "dataset.planted.scenario", PLANTED_SCENARIOS)
        if self.scenario not in PLANTED_DEFAULT_SHARE:
            why = " (the merged domain keeps its natural share)" if self.scenario == "hidden_split" else ""
            require(self.share is None, "dataset.planted.share", f"does not apply to scenario {self.scenario}{why}",
                    self.share)
        else:
            require(self.share is None or 0.0 < self.share < 1.0, "dataset.planted.share", "must be in (0, 1)",
                    self.share)
        require(0 <= self.seed < SEED_LIMIT, "dataset.planted.seed", "must be in [0, 2**32)", self.seed)
        require(self.duplicate_documents >= 1, "dataset.planted.duplicate_documents", "must be >= 1",
                self.duplicate_documents)
        self.merge_domains = list(self.merge_domains)
        require(len(set(self.merge_domains)) >= 2 and len(set(self.merge_domains)) == len(self.merge_domains),
                "dataset.planted.merge_domains", "must name at least two different domains", self.merge_domains)

    @property
    def active(self) -> bool:
        """Whether structure is planted (any scenario but none)."""
        return self.scenario != "none"

    @property
    def target_share(self) -> float | None:
        """The planted domain's share of the text bytes (None for hidden_split: the merged domains' own)."""
        return self.share if self.share is not None else PLANTED_DEFAULT_SHARE.get(self.scenario)

    @property
    def merged_domain(self) -> str:
        """hidden_split: the one label the merged domains carry (``code+latex``)."""
        return "+".join(self.merge_domains)


@dataclass
class DataConfig:
    """Where the text comes from and how validation is held out (docs/design.md section 4)."""

    source: str = "embedded"  # embedded | jsonl | hf
    path: str | None = None  # jsonl: a directory or file; hf: a hub id or a local directory
    hf_config: str | None = None  # the hub dataset's config name, if any
    split: str = "train"
    val_split: str | None = None  # a separate split to validate on; None = hold out documents
    text_field: str = "text"
    domain_field: str | None = None  # dotted path, e.g. meta.redpajama_set_name
    domains: list[str] | None = None  # restrict to (and order) these domains
    natural_mixture: dict[str, float] | None = None  # known proportions; None = measured bytes
    val_fraction: float = 0.02  # share of documents held out for validation (hash-based)
    val_sequences_per_domain: int = 16
    val_seed: int = 1234  # fixes the held-out documents, independent of the run seed
    skip_bad_lines: bool = False
    min_domains: int = 4  # embedded corpus: go on if at least this many sources could be built
    planted: PlantedConfig = field(default_factory=PlantedConfig)  # structure planted in the corpus above

    def __post_init__(self) -> None:
        _require_choice(self.source, "dataset.source", ("embedded", "jsonl", "hf"))
        if isinstance(self.planted, dict):  # from a plain dict (a sweep job's saved config, a yaml read alone)
            self.planted = PlantedConfig(**self.planted)
        require(not self.planted.active or self.source != "hf", "dataset.source",
                f"must be embedded or jsonl to plant structure in it (dataset.planted.scenario="
                f"{self.planted.scenario})", self.source)
        require(0.0 < self.val_fraction < 1.0, "dataset.val_fraction", "must be in (0, 1)",
                 self.val_fraction)
        _require_positive(self, "dataset", ("val_sequences_per_domain", "min_domains"))
        if self.source in ("jsonl", "hf"):
            require(bool(self.path), "dataset.path", f"must be set for dataset.source={self.source}",
                     self.path)
        if self.natural_mixture is not None:
            require(all(v >= 0 for v in self.natural_mixture.values())
                     and sum(self.natural_mixture.values()) > 0,
                     "dataset.natural_mixture", "must be non-negative with a positive sum",
                     self.natural_mixture)


@dataclass
class TrainerConfig:
    """The optimisation loop (paper setting: docs/design.md section 1, their Table 9)."""

    max_steps: int = 200
    batch_size: int = 16  # global sequences per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int | None = None  # sequences per rank per forward; None = batch_size / world
    seq_len: int = 128
    lr: float = 5e-4  # peak learning rate
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 20
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999  # HF Trainer default, as in the loss-based reweighting code
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 50  # steps between validations; 0 = only at the end
    eval_batch_size: int = 32
    log_every: int = 10
    ckpt_every: int = 100  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model (GPU)
    device: str = "auto"  # auto | cpu | cuda
    prefetch: int = 2  # steps of windows packed ahead on a background thread; 0 = on the training thread
    weighted_update: str = "auto"  # fast (one backward) | two_pass | auto: fast, two_pass with activation_checkpointing
    export_hf: bool = True  # save_pretrained of model and tokenizer at the end
    progress: bool = True  # progress bar
    stop_after_steps: int | None = None  # exit (checkpointed) after this many steps: simulates a kill
    parallelism: str = "ddp"  # ddp (replicated model) | fsdp (FSDP2 fully_shard per block; dograph/parallel.py)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward

    def __post_init__(self) -> None:
        require(self.max_steps >= 0, "trainer.max_steps", "must be >= 0", self.max_steps)
        _require_positive(self, "trainer", ("batch_size", "micro_batch_size", "seq_len",
                                            "eval_batch_size", "log_every", "keep_checkpoints"))
        require(self.lr > 0, "trainer.lr", "must be > 0", self.lr)
        require(0 <= self.min_lr <= self.lr, "trainer.min_lr", "must be in [0, trainer.lr]", self.min_lr)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "grad_clip", "weight_decay", "prefetch"):
            require(getattr(self, name) >= 0, f"trainer.{name}", "must be >= 0", getattr(self, name))
        _require_choice(self.precision, "trainer.precision", ("auto", "fp32", "bf16"))
        _require_choice(self.device, "trainer.device", ("auto", "cpu", "cuda"))
        _require_choice(self.weighted_update, "trainer.weighted_update", ("auto", "fast", "two_pass"))
        _require_choice(self.parallelism, "trainer.parallelism", ("ddp", "fsdp"))
        if self.weighted_update == "auto":
            # the one-backward update keeps every layer's inputs and output-grads until the step is weighed,
            # which is the memory activation checkpointing is asked to save (docs/design.md section 2.5)
            self.weighted_update = "two_pass" if self.activation_checkpointing else "fast"
        require(not (self.parallelism == "fsdp" and self.compile), "trainer.compile",
                 "is not supported with trainer.parallelism=fsdp (set trainer.compile=false)", self.compile)


@dataclass
class LoggerConfig:
    """Weights & Biases; metrics.jsonl in the run directory is always written."""

    mode: str = "offline"  # disabled | offline | online (only online touches the network)
    project: str = "dograph"
    entity: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        _require_choice(self.mode, "logger.mode", ("disabled", "offline", "online"))


PAPER_TASKS = ("hellaswag", "piqa", "openbookqa", "copa", "logiqa", "winogrande", "sciq", "arc_easy",
               "lambada_openai")  # the paper's nine lm-eval tasks (eval.tasks=paper9)


@dataclass
class EvalConfig:
    """Downstream evaluation with lm-evaluation-harness after training (``python -m dograph.eval``)."""

    tasks: Any = field(default_factory=list)  # paper9 | a task name | a list of names; [] = no evaluation
    num_fewshot: int = 0  # the paper does not say; 0 is our choice
    limit: int | None = None  # examples per task (for quick checks); None = all
    batch_size: int = 8
    include_path: str | None = None  # a directory of extra lm-eval task YAMLs
    local_items: int = 40  # items per domain of the local dograph_* tasks (dograph.eval.tasks)

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, str):  # one name (paper9 among them) or a list of names
            require(isinstance(self.tasks, list | tuple) and all(isinstance(t, str) and t for t in self.tasks),
                     "eval.tasks", "must be paper9 or a list of lm-eval task names", self.tasks)
            self.tasks = list(self.tasks)
        require(self.tasks != "", "eval.tasks", "must be paper9 or a list of lm-eval task names", self.tasks)
        require(self.num_fewshot >= 0, "eval.num_fewshot", "must be >= 0", self.num_fewshot)
        _require_positive(self, "eval", ("limit", "batch_size", "local_items"))

    @property
    def task_names(self) -> list[str]:
        """``tasks`` with ``paper9`` expanded (and duplicates dropped, order kept)."""
        names = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        expanded = [task for name in names for task in (PAPER_TASKS if name == "paper9" else (name,))]
        return list(dict.fromkeys(expanded))


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    cache_dir: str = ".cache/dograph"  # embedded corpus, tokenizers, offline-stage results


@dataclass
class RunConfig:
    """The root of the configuration (``conf/config.yaml`` composes onto it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mixer: Any = None  # _target_ + kwargs (conf/mixer/*, typed by the method's settings class)
    objective: Any = None  # _target_ + kwargs (conf/objective/*), read by mixers that optimise one
    tokenizer: str = "bpe8k"  # gpt2 | bpe<N>k (a BPE of N*1024 entries trained locally) | a directory | a hub name
    m: int = 11  # number of model-centric domains (DoGraph clusters)
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoint in the run directory
    overwrite: bool = False  # start over in a run directory that already holds a run
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.m >= 1, "m", "must be >= 1", self.m)
        require(0 <= self.seed < SEED_LIMIT, "seed", "must be in [0, 2**32) (numpy's seed range)", self.seed)
        _check_tokenizer(self.tokenizer)
        self.objective = validated_node(self.objective)  # a composed node: checked, then a plain dict
        self.mixer = validated_node(self.mixer)
        require(not (self.resume and self.overwrite), "resume", "cannot be combined with overwrite=true",
                 self.resume)
        # rank 0 alone runs lm-eval after training; a sharded model needs every rank in its forward
        require(not (self.trainer.parallelism == "fsdp" and self.eval.task_names), "eval.tasks",
                 "cannot run after training with trainer.parallelism=fsdp: evaluate the exported model later "
                 "with python -m dograph.eval RUN_DIR", self.eval.tasks)
        require(self.trainer.seq_len <= self.model.max_position_embeddings, "trainer.seq_len",
                 f"must be <= model.max_position_embeddings={self.model.max_position_embeddings}",
                 self.trainer.seq_len)

    def for_evaluation(self, settings: EvalConfig) -> RunConfig:
        """This trained run's config with the settings of a later evaluation of its ``hf/`` export.

        Not validated again as a training config: the fsdp check above is about lm-eval in the
        training processes, and the export of any run evaluates alone (``python -m dograph.eval``).
        """
        later = copy.copy(self)
        later.eval = settings
        return later


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_group_option(group: str, name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The plain values of ``conf/<group>/<name>.yaml`` (for pipeline stages that name a model or preset)."""
    from omegaconf import OmegaConf

    path = conf_dir / group / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        raise ConfigError(f"unknown {group} {name!r}: choose one of {', '.join(choices)}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {k: v for k, v in (values or {}).items() if k != "defaults"}


def run_config_from_dict(values: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from ``dataclasses.asdict`` of one (a sweep job reads its config from a file)."""
    parts = {"model": ModelConfig, "dataset": DataConfig, "trainer": TrainerConfig, "logger": LoggerConfig,
             "paths": PathsConfig, "eval": EvalConfig}
    return RunConfig(**{k: parts[k](**v) if k in parts else v for k, v in values.items()})


SETTINGS_GROUPS = ("mixer", "objective")  # config groups whose options are typed by the method's settings class


def register_configs(conf_dir: Path = CONF_DIR) -> None:
    """The trunk's schema as ``schema``; each method's settings as ``schema/<group>/<name>``.

    ``<name>`` is the registered name of the class a ``conf/<group>/*.yaml`` names as ``_target_``
    (``Mixer.name``, ``Objective.name``); the class declares its settings as ``settings_class``.
    The classes are imported by name, as ``instantiate`` does later: the library never imports
    a baseline module itself.
    """
    store = ConfigStore.instance()
    store.store(name="schema", node=RunConfig)
    for group in SETTINGS_GROUPS:
        for target in sorted(group_targets(group, conf_dir)):
            cls = get_class(target)
            settings = cls.__dict__.get("settings_class")
            if settings is None or not cls.__dict__.get("name"):
                raise ConfigError(f"{target} (conf/{group}) must set its own name and settings_class")
            store.store(group=f"schema/{group}", name=cls.name, node=omegaconf_schema(settings))


def group_targets(group: str, conf_dir: Path = CONF_DIR) -> set[str]:
    """The ``_target_`` classes the options of ``conf/<group>/`` name."""
    from omegaconf import OmegaConf

    nodes = (OmegaConf.load(path) for path in sorted((conf_dir / group).glob("*.yaml")))
    return {str(node["_target_"]) for node in nodes if "_target_" in node}


def to_config_object(node: Any) -> Any:
    """A structured OmegaConf node as its validated dataclass (ConfigError names the bad key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise ConfigError(str(exc)) from exc


def to_run_config(cfg: Any) -> RunConfig:
    """The composed Hydra config as a validated :class:`RunConfig` (ConfigError names the bad key)."""
    run_cfg = to_config_object(cfg)
    if not isinstance(run_cfg, RunConfig):
        raise ConfigError("the root config must be composed onto the `schema` (conf/config.yaml defaults)")
    return run_cfg
