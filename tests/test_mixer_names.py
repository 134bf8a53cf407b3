"""Every method's mixer has one registered name (``Mixer.name``); stage directories and keys use it."""

from __future__ import annotations

import importlib

import pytest
import yaml
from helpers import REPO

from dograph.mixing import MIXERS, Mixer, MixerOutput, StepSignals, mixer_name

# The names stage directories and stage keys were made with before names were registered (the module
# of the mixer): a staged method's name is part of every stage key, so changing it orphans its cache.
STAGED = {"doremi": "baselines.doremi.DoReMiMixer", "doge": "baselines.doge.DoGEMixer",
          "regmix": "baselines.regmix.RegMixMixer", "data_mixing_law": "baselines.data_mixing_law.DataMixingLawMixer"}


def target_class(target: str) -> type:
    module, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def mixer_configs() -> dict[str, str]:
    return {p.stem: yaml.safe_load(p.read_text())["_target_"] for p in sorted((REPO / "conf" / "mixer").glob("*.yaml"))}


def test_every_mixer_config_names_a_registered_mixer_of_its_own_name() -> None:
    configs = mixer_configs()
    assert set(configs) == {"uniform", "fixed", "loss_based", "doremi", "doge", "regmix", "data_mixing_law", "dograph"}
    names = {}
    for choice, target in configs.items():
        cls = target_class(target)
        assert issubclass(cls, Mixer) and cls.name == choice, (choice, target, cls.name)
        assert MIXERS[cls.name] is cls and mixer_name(cls) == choice
        names[cls.name] = target
    assert len(names) == len(configs)  # unique


def test_staged_methods_keep_the_names_their_stages_were_keyed_with() -> None:
    for old_name, target in STAGED.items():
        assert target.rsplit(".", 2)[-2] == old_name  # how the name was derived before
        assert target_class(target).name == old_name
        assert mixer_configs()[old_name] == target


def test_method_name_of_a_run_config_is_the_registered_name(make_config) -> None:
    from dograph.runs.app import method_name

    for choice in STAGED:
        assert method_name(make_config(f"mixer={choice}")) == choice


def test_a_duplicate_name_is_an_error() -> None:
    importlib.import_module("baselines.uniform")
    before = dict(MIXERS)
    with pytest.raises(TypeError, match=r"mixer name 'uniform' is taken by baselines\.uniform\.UniformMixer"):
        class Impostor(Mixer):
            name = "uniform"

            def weigh(self, signals: StepSignals) -> MixerOutput:
                return MixerOutput()
    assert before == MIXERS


def test_a_subclass_without_a_name_does_not_inherit_one() -> None:
    from baselines.fixed import FixedMixer, StageMixtureMixer

    class Variant(FixedMixer):
        pass

    assert FixedMixer.name == "fixed" and Variant.name == "" and StageMixtureMixer.name == ""
    assert MIXERS["fixed"] is FixedMixer
    with pytest.raises(ValueError, match="has no registered name"):
        mixer_name(Variant)
