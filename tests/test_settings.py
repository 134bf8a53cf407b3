"""Typed mixer and objective settings (dograph/settings.py): each option of conf/mixer and conf/objective is
typed by its method's settings class, Hydra refuses a wrong key, type or choice while composing, and what
types cannot say (ranges, relations) is a one-line ConfigError when the config is converted."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_type_hints

import pytest
import yaml
from conftest import compose_config
from helpers import REPO
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from baselines.doge import DoGEProjectionSettings
from baselines.loss_based import STRATEGIES, LossBasedSettings, Strategy
from dograph.config import to_run_config
from dograph.errors import ConfigError
from dograph.method.mixer import KroneckerSettings
from dograph.runs.app import print_mixer_settings
from dograph.settings import Settings, omegaconf_schema, validated_node
from dograph.step.projection import DTYPES

OPTIONS = [(group, p.stem) for group in ("mixer", "objective") for p in sorted((REPO / "conf" / group).glob("*.yaml"))]
RUNTIME = {"num_clusters", "domains", "natural_mixture", "dist", "seed", "stage_results", "sweep"}  # not settings


def option_keys(group: str, option: str) -> list[str]:
    return [k for k in yaml.safe_load((REPO / "conf" / group / f"{option}.yaml").read_text()) if k != "defaults"]


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_sets_every_field_of_its_methods_settings(group: str, option: str) -> None:
    """The yaml composes onto the schema of its _target_'s settings class and sets each field, in its order."""
    node = compose_config([f"{group}={option}"])[group]
    settings = get_class(node._target_).settings_class
    assert OmegaConf.get_type(node).settings_class is settings
    assert option_keys(group, option) == [f.name for f in dataclasses.fields(settings)]


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_setting_is_a_keyword_of_the_constructor(group: str, option: str) -> None:
    """Where the constructor lists its keywords, they are the settings plus the runtime arguments."""
    cls = get_class(compose_config([f"{group}={option}"])[group]._target_)
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # passes what it does not read on to its base (the staged and sweep methods)
    fields = {f.name for f in dataclasses.fields(cls.settings_class)} - {"_target_", "_partial_"}
    required = {n for n, p in parameters.items() if p.default is p.empty and n != "self"}
    assert fields <= set(parameters) and required <= fields | RUNTIME


def test_choices_are_the_implementations() -> None:
    assert get_args(Strategy) == tuple(STRATEGIES)
    for settings in (KroneckerSettings, DoGEProjectionSettings):
        assert set(get_args(get_type_hints(settings)["dtype"])) == set(DTYPES)
    for option in ("uncertainty", "variance", "robust", "alignment"):
        cls = get_class(compose_config([f"objective={option}"]).objective._target_)
        assert get_args(get_type_hints(cls.settings_class)["solver"]) == cls.supported_solvers


@pytest.mark.parametrize(("overrides", "key"), [
    (["mixer.bufer_size=4"], "mixer.bufer_size"),
    (["mixer.buffer_size=abc"], "mixer.buffer_size"),
    (["mixer.cluster_on=both"], "mixer.cluster_on"),
    (["mixer.sample_weights=mean"], "mixer.sample_weights"),
    (["mixer.projection.dtype=int8"], "mixer.projection.dtype"),
    (["mixer.projection.rnk=4"], "mixer.projection.rnk"),
    (["objective.floor=x"], "objective.floor"),
    (["objective.solver=osqp"], "objective.solver"),
    (["objective=robust", "objective.solver=OSQP"], "objective.solver"),  # no exponential cone
    (["objective=robust", "objective.eps=0.1"], "objective.eps"),  # not a setting of robust
    (["objective=alignment", "objective.iterations=2.5"], "objective.iterations"),
    (["mixer=loss_based", "mixer.strategy=lower"], "mixer.strategy"),
    (["mixer=loss_based", "mixer.burn_in=2.5"], "mixer.burn_in"),
    (["mixer=doge", "mixer.gradients=approx"], "mixer.gradients"),
    (["mixer=doge", "mixer.mixture_from=reference"], "mixer.mixture_from"),
    (["mixer=doremi", "mixer.proxy_mixture=uniform"], "mixer.proxy_mixture"),
    (["mixer=regmix", "mixer.proxies=many"], "mixer.proxies"),
    (["mixer=regmix", "mixer.proxy.lr=0.1"], "mixer.proxy.lr"),  # a stage key it lacks needs Hydra's +
])
def test_hydra_refuses_a_wrong_key_type_or_choice_while_composing(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(overrides)
    assert f"full_key: {key}" in str(info.value.__cause__)


@pytest.mark.parametrize(("overrides", "message"), [
    (["objective.graph_weight=-1"], "objective.graph_weight must be a finite number >= 0 (got -1.0)"),
    (["objective.proximal_weight=nan"], "objective.proximal_weight must be a finite number >= 0 (got nan)"),
    (["objective.floor=1.0"], "objective.floor must be in [0, 1) (got 1.0)"),
    (["objective=variance", "objective.floor=-0.1"], "objective.floor must be in [0, 1) (got -0.1)"),
    (["objective.eps=0"], "objective.eps must be in (0, 1) (got 0.0)"),
    (["objective=robust", "objective.eta=0"], "objective.eta must be a finite number > 0 (got 0.0)"),
    (["objective=alignment", "objective.iterations=0"], "objective.iterations must be >= 1 (got 0)"),
    (["objective=alignment", "objective.tol=-1"], "objective.tol must be a finite number >= 0 (got -1.0)"),
    (["mixer.buffer_size=0"], "mixer.buffer_size must be >= 1 (got 0)"),
    (["m=20", "mixer.buffer_size=16"], "m=20 is larger than mixer.buffer_size=16: K-means needs at least m"),
    (["mixer.ema_beta=1.0"], "mixer.ema_beta must be in [0, 1) (got 1.0)"),
    (["mixer.recluster_every=0"], "mixer.recluster_every must be >= 1 or null (got 0)"),
    (["mixer.max_consecutive_fallbacks=0"], "mixer.max_consecutive_fallbacks must be >= 1 (got 0)"),
    (["mixer.sample_weights=shrink"], "mixer.sample_weights=shrink needs mixer.shrink, the plain mean's share"),
    (["mixer.sample_weights=shrink", "mixer.shrink=1.5"], "mixer.shrink must be in [0, 1] (got 1.5)"),
    (["mixer.shrink=0.5"], "mixer.shrink=0.5 applies only to mixer.sample_weights=shrink (got "),
    (["+mixer.bufer_size=4"], "mixer: unknown key(s) bufer_size (its keys: num_clusters, objective, projection, "),
    (["+mixer.projection.rnk=4"], "mixer.projection: unknown key(s) rnk (its keys: rank, out_dim, "),
    (["+objective.floors=0.2"], "objective: unknown key(s) floors (its keys: graph_weight, "),
    (["mixer=loss_based", "mixer.kl_reg=0"], "mixer.kl_reg must be > 0 (got 0.0)"),
    (["mixer=loss_based", "mixer.burn_in=-1"], "mixer.burn_in must be >= 0 (got -1)"),
    (["mixer=loss_based", "mixer.delta=0"], "mixer.delta must be > 0 (got 0.0)"),
    (["mixer=doge", "mixer.mu=0"], "mixer.mu must be a finite number > 0 (got 0.0)"),
    (["mixer=doge", "mixer.dw_min=2", "mixer.dw_max=1"], "mixer.dw_min=2.0 must be <= mixer.dw_max=1.0"),
    (["mixer=doge", "mixer.eps=1.5"], "mixer.eps must be in [0, 1] (got 1.5)"),
    (["mixer=doge", "mixer.max_grad_norm=inf"], "mixer.max_grad_norm must be a finite number (got inf)"),
    (["mixer=doremi", "mixer.eta=0"], "mixer.eta must be a finite number > 0 (got 0.0)"),
    (["mixer=doremi", "mixer.eps=2"], "mixer.eps must be in [0, 1] (got 2.0)"),
    (["mixer=doremi", "mixer.reference_batch_size=0"], "mixer.reference_batch_size must be >= 1 (got 0)"),
    (["mixer=doremi", "+mixer.etaa=2"], "mixer: unknown key(s) etaa (its keys: mixture_from, eta, "),
    (["mixer=regmix", "mixer.proxies=3", "mixer.min_proxies=3"], "mixer.proxies=3: the regression needs at least 4"),
    (["mixer=regmix", "mixer.top_k=0"], "mixer.top_k=0 must be between 1 and mixer.samples=100000"),
    (["mixer=data_mixing_law", "mixer.proxies=1"], "mixer.proxies must be >= 2 (got 1)"),
    (["mixer=data_mixing_law", "mixer.min_proxies=40"], "mixer.min_proxies must be in [2, mixer.proxies=16] (got 40)"),
])
def test_ranges_are_one_line_errors_when_the_config_is_converted(overrides: list[str], message: str) -> None:
    cfg = compose_config(overrides)  # composes: the types are right
    with pytest.raises(ConfigError) as info:
        to_run_config(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_methods_get_plain_values() -> None:
    """Choices reach the constructors as strings, nested nodes as dicts: the node a method got before typing."""
    cfg = to_run_config(compose_config(["mixer=doge", "mixer.gradients=projected"]))
    assert type(cfg.mixer["gradients"]) is str and type(cfg.mixer["projection"]["dtype"]) is str
    assert cfg.mixer["projection"] == {"rank": 16, "out_dim": 1024, "include": ["*"], "exclude": [],
                                       "dtype": "float32"}
    dograph = to_run_config(compose_config(["objective=robust"]))
    assert dograph.mixer["objective"] == dograph.objective and dograph.objective["solver"] == "CLARABEL"
    plain = {"_target_": "baselines.uniform.UniformMixer"}  # a stage's mixer, a saved run's config
    assert validated_node(plain) == plain


def test_stage_nodes_stay_open_to_any_stage_setting() -> None:
    """mixer.proxy.* takes any trainer field with Hydra's + (and from model_mixer files): the pipeline checks them."""
    cfg = to_run_config(compose_config(["mixer=doremi", "+mixer.proxy.lr=0.001", "+mixer.reference.lr=0.002"]))
    assert cfg.mixer["proxy"]["lr"] == 0.001 and cfg.mixer["reference"]["lr"] == 0.002
    paper = to_run_config(compose_config(["mixer=regmix", "model=gpt2_small"])).mixer
    assert paper["proxies"] == 512 and paper["proxy"]["tokenizer"] == "gpt2"  # conf/model_mixer adds a stage key


def test_literal_choices_are_checked_when_built_in_python() -> None:
    with pytest.raises(ConfigError, match=r"^mixer\.strategy must be one of mid, upper, linupper, extremes "
                                          r"\(got 'lower'\)$"):
        LossBasedSettings(_target_="baselines.loss_based.LossBasedMixer", strategy="lower", kl_reg=1.0, burn_in=0,
                          delta=1.0)


def test_the_schema_types_literals_as_enums_of_the_same_strings() -> None:
    @dataclass
    class Example(Settings):
        key = "example"
        mode: Literal["a", "b"] | None
        inner: KroneckerSettings
        extra: dict[str, Any]

    node = OmegaConf.structured(omegaconf_schema(Example))
    node.mode = "b"
    with pytest.raises(Exception, match=r"Invalid value 'c', expected one of \[a, b\]"):
        node.mode = "c"
    node.mode = None
    assert omegaconf_schema(Example) is omegaconf_schema(Example)  # one Enum per field, made once
    types = {f.name: f.type for f in dataclasses.fields(omegaconf_schema(Example))}
    assert types["inner"] is omegaconf_schema(KroneckerSettings) and types["extra"] == dict[str, Any]


@pytest.mark.parametrize(("overrides", "first", "buffer"), [
    ([], "mixer dograph: num_clusters=11 ", 512),
    (["model=gpt2_small"], "mixer dograph: num_clusters=11 ", 4096),
    (["m=7"], "mixer dograph: num_clusters=7 ", 512),
])
def test_the_effective_settings_are_printed(capsys: pytest.CaptureFixture, overrides: list[str], first: str,
                                            buffer: int) -> None:
    """buffer_size: 4096 in conf/mixer/dograph.yaml, 512 for the tiny model (conf/model_mixer); the print says which."""
    print_mixer_settings(to_run_config(compose_config(overrides)))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(first) and f" buffer_size={buffer} " in lines[0]
    assert lines[1].startswith("  objective (uncertainty): graph_weight=0.1 proximal_weight=0.1 floor=0.1 ")
    assert lines[2] == "  projection: rank=16 out_dim=1024 include=[*] exclude=[lm_head] dtype=float32 seed=0"
