"""The Mixer contract: the one abstraction every data-mixing method implements.

The trainer asks a mixer two things and knows nothing else about it:

* ``sampling_mixture()``: probabilities over *human* domains for the data sampler
  (DoReMi, DoGE, RegMix, ... change what is drawn);
* ``weigh(signals)``: per-sample loss weights for the current optimizer step
  (DoGraph, loss-based reweighting change how much each drawn sample counts).

A method that needs earlier runs (a reference or proxy model) declares them with
``plan_stages``; the app runs them first and hands their ``outputs`` to the main mixer.

A mixer declares in ``requires`` which costly signals it reads; the trainer computes
only those (projected per-sample gradients need hooks and a projection, so a mixer
that does not ask for them costs nothing). A mixer whose ``reweights`` is False is
never called in the training step: ``mixer=uniform`` adds no work to the hot path.

Every method's mixer has a registered name (``Mixer.name``, the registry :data:`MIXERS`): the
method's identity in stage directories, stage keys, records and tables, so moving or renaming
a module never renames a method or orphans a cache. ``conf/mixer/*.yaml`` still give Hydra the
class (``_target_``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from pathlib import Path

    from dograph.runs.pipeline import StageSpec
    from dograph.runs.sweep import SweepSpec
    from dograph.step.projection import KroneckerProjector


class Signal(StrEnum):
    """Optional per-step measurements a mixer may ask the trainer for."""

    DOMAIN = "domain"  # [b] int64 human-domain id of each sequence
    GRAD_PROJ = "grad_proj"  # [b, k] projected per-sample gradient (hooks + projection)
    TOKEN_LOSS = "token_loss"  # [b, T] per-token loss (nats), detached
    DOMAIN_GRAM = "domain_gram"  # [D, D] Gram of the per-domain mean-loss gradients of the global batch


@dataclass(frozen=True)
class StepSignals:
    """What the trainer measured on *this rank* for one optimizer step.

    With gradient accumulation the micro-batches of the step are concatenated, so
    ``b`` is the rank's share of the global batch (global batch / world size).
    """

    step: int
    input_ids: Tensor  # [b, T] token ids (lets a mixer run its own frozen model)
    loss: Tensor  # [b] mean token loss of each sequence, detached
    domain: Tensor | None = None  # [b] if Signal.DOMAIN in requires
    grad_proj: Tensor | None = None  # [b, k] if Signal.GRAD_PROJ in requires
    lr: float = 0.0  # the learning rate of this step's update
    targets: Tensor | None = None  # [b, T] next-token targets, with TOKEN_LOSS
    token_loss: Tensor | None = None  # [b, T] if Signal.TOKEN_LOSS in requires
    domain_gram: Tensor | None = None  # [D, D] if Signal.DOMAIN_GRAM in requires (identical on every rank)
    domain_counts: Tensor | None = None  # [D] samples per domain in the global batch, with DOMAIN_GRAM


@dataclass
class MixerOutput:
    """A mixer's answer for one step.

    ``sample_weights``: [b] non-negative weights of this rank's samples; summed over
    the *global* batch (all ranks, all micro-batches) they equal 1, so the update is
    ``sum_i v_i * grad(loss_i)`` (a method that clips per-domain gradients, like DoGE, may
    sum to less). ``None`` means the plain mean (every sample 1/B).
    ``skip_step``: the optimizer step must not be taken (e.g. a non-finite gradient
    signal); the trainer logs it and moves on. ``metrics``: ``"mixer/..."`` scalars or
    small tensors the trainer logs at its log interval (mixers never log themselves).
    """

    sample_weights: Tensor | None = None
    skip_step: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


class Mixer(ABC):
    """Decides what is sampled and how much each sample counts.

    Called by the trainer, on every rank, once per optimizer step (``weigh``) and after
    it (``sampling_mixture``). A mixer never runs forward or backward of the trained
    model; it sees only :class:`StepSignals`. Its whole state goes through
    ``state_dict``/``load_state_dict`` into the checkpoint so a resumed run continues
    exactly.
    """

    # The method's registered name (stage directories and keys, records, tables). A class that sets none
    # (a helper base, a test double) has "" and is not registered; it does not inherit its parent's name.
    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[Signal]] = frozenset()  # a mixer may set it per instance (from its config)
    reweights: ClassVar[bool] = True  # False: weigh() is never called (uniform, static)
    has_sweep: ClassVar[bool] = False  # True: plan_sweep declares proxy runs (the regression methods)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_mixer(cls)

    @property
    def projector(self) -> KroneckerProjector | None:
        """The per-sample-gradient projector, for mixers that require GRAD_PROJ."""
        return None

    def sampling_mixture(self) -> Tensor | None:
        """[D] probabilities over human domains, or None to keep the current mixture.

        Asked before the first step (and after a resume) and after every step.
        """
        return None

    @abstractmethod
    def weigh(self, signals: StepSignals) -> MixerOutput:
        """Per-sample weights for this step (see :class:`MixerOutput`)."""

    def state_dict(self) -> dict[str, Any]:
        """The mixer's whole state (tensors and plain values); with :meth:`load_state_dict`, the ``Stateful``
        protocol of ``torch.distributed.checkpoint``, saved by the checkpointer as ``"mixer"`` from rank 0."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Continue from :meth:`state_dict`'s state (on every rank); refuse one built under other settings."""

    def summary(self) -> dict[str, Any]:
        """Final facts for the closing table of a run (weights, cluster tables, ...)."""
        return {}

    def outputs(self) -> dict[str, Any]:
        """What a run of this mixer produced for later pipeline stages (JSON-ready; e.g. a mixture)."""
        return {}

    @classmethod
    def plan_stages(cls, node: dict[str, Any]) -> list[StageSpec]:
        """Earlier runs this method needs before the main run (DoReMi: reference, proxy).

        ``node`` is the method's mixer config. The app runs the stages (cached by config
        hash, ``dograph.runs.pipeline``) and passes their results to the main mixer as
        ``stage_results``. Default: none.
        """
        return []

    @classmethod
    def plan_sweep(cls, node: dict[str, Any], domains: list[str], natural_mixture: list[float]) -> SweepSpec:
        """The proxy sweep of a regression method (``has_sweep``): one small run per mixture.

        The app trains the proxies (``dograph.runs.sweep``, each a cached stage) and passes the
        gathered results to the main mixer as ``sweep``.
        """
        raise NotImplementedError(f"{cls.__name__} declares no sweep")

    def save_artifacts(self, out_dir: Path) -> None:  # noqa: B027 (optional hook)
        """Write histories (weights, assignments) under ``out_dir``; rank 0 only."""


MIXERS: dict[str, type[Mixer]] = {}  # registered name -> mixer class, filled as the classes are defined


def register_mixer(cls: type[Mixer]) -> None:
    """Register ``cls`` under the ``name`` its own body sets (called for every subclass of :class:`Mixer`).

    A class whose body sets no name gets "" (not registered). Two classes with one name are an
    error; the same class defined again (a module imported anew) replaces its entry.
    """
    name = cls.__dict__.get("name", "")
    if not isinstance(name, str):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__}.name must be a str, not {type(name).__name__}")
    cls.name = name
    if not name:
        return
    other = MIXERS.get(name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"mixer name {name!r} is taken by {other.__module__}.{other.__qualname__}; "
                        f"{cls.__module__}.{cls.__qualname__} needs another")
    MIXERS[name] = cls


def mixer_name(cls: type[Mixer]) -> str:
    """The registered name of a mixer class (a ValueError for a class that has none)."""
    if not cls.name:
        raise ValueError(f"mixer {cls.__module__}.{cls.__qualname__} has no registered name (set name = ... "
                         "on the class)")
    return cls.name
