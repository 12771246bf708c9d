"""Typed settings: every constraint kind, the one message form, JSON round trips, methods built from settings."""

import dataclasses
import json
import math
import re

import pytest

from smoothcert.methods.ancer import ANCER, ANCERSettings
from smoothcert.methods.base import CertifyMethod
from smoothcert.methods.dds import DDS
from smoothcert.methods.firstorder.method import FirstOrder, FirstOrderSettings
from smoothcert.methods.fixed import FixedSettings, FixedSigma
from smoothcert.methods.rancer import RANCER, RANCERBest, RANCERBestSettings, RANCERSettings
from smoothcert.methods.rddrs import RDDRS, RDDRSSettings
from smoothcert.settings import (Choice, Integer, Names, Number, Settings, Switch, Text, choice, integer, names,
                                 number, switch, text, validate)
from smoothcert.training.objectives import OBJECTIVES, Macer, make_objective
from smoothcert.validation import check_alpha, check_count, check_positive


@dataclasses.dataclass(frozen=True)
class Example(Settings):
    count: int = integer(3, low=1, high=10, help="a count")
    steps: int | None = integer(None, low=0, optional=True, help="optional steps")
    rate: float = number(0.5, low=0.0, high=1.0, low_open=True, help="a rate in (0, 1]")
    weight: float = number(2.0, low=0.0, help="a weight")
    mode: str = choice("a", ("a", "b"), help="a mode")
    memory: bool = switch(True, help="turn memory off")
    verbose: bool = switch(False, help="say more")
    spec: str | None = text(None, optional=True, help="a specification")
    parts: tuple[str, ...] = names(("x",), ("x", "y", "z"), help="some parts", flag="--pieces")


MESSAGE = re.compile(r"^(?P<name>\w+) \((?P<flag>--[\w-]+)\) must be (?P<allowed>.+), got (?P<value>.+)$")


@pytest.mark.parametrize("field, value, allowed", [
    ("count", 0, "an integer in [1, 10]"), ("count", 11, "an integer in [1, 10]"),
    ("count", 2.0, "an integer in [1, 10]"),
    ("count", True, "an integer in [1, 10]"), ("steps", -1, "an integer >= 0 or None"),
    ("rate", 0.0, "a finite number in (0, 1]"), ("rate", 1.5, "a finite number in (0, 1]"),
    ("rate", math.nan, "a finite number in (0, 1]"), ("weight", math.inf, "a finite number >= 0"),
    ("weight", -1e-9, "a finite number >= 0"), ("weight", "2", "a finite number >= 0"),
    ("weight", False, "a finite number >= 0"),
    ("mode", "c", "one of a, b"), ("mode", None, "one of a, b"), ("memory", 1, "True or False"),
    ("spec", "  ", "a non-empty string or None"), ("spec", 3, "a non-empty string or None"),
    ("parts", "x,w", "a non-empty list of names among x, y, z (a sequence or comma-separated)"),
    ("parts", "", "a non-empty list of names among x, y, z (a sequence or comma-separated)"),
    ("parts", ["x", 1], "a non-empty list of names among x, y, z (a sequence or comma-separated)"),
])
def test_each_constraint_kind_rejects_with_the_one_message_form(field, value, allowed):
    with pytest.raises(ValueError) as err:
        Example(**{field: value})
    match = MESSAGE.match(str(err.value))
    assert match, str(err.value)
    flag = "--pieces" if field == "parts" else "--no-memory" if field == "memory" else f"--{field}"
    assert match["name"] == field and match["flag"] == flag
    assert match["allowed"] == allowed and match["value"] == repr(value)


def test_accepted_values_and_their_canonical_forms():
    s = Example(count=10, steps=None, rate=1, weight=0, mode="b", memory=False, verbose=True, spec="coords:0",
                parts=" z , x ")
    assert s.count == 10 and s.steps is None and s.rate == 1.0 and isinstance(s.rate, float)
    assert isinstance(s.weight, float) and s.parts == ("z", "x") and s.memory is False
    assert Example(parts=["y"]).parts == ("y",)
    # settings stay valid: replace() validates again, and frozen fields cannot be set
    with pytest.raises(ValueError, match=r"^count \(--count\) must be"):
        dataclasses.replace(s, count=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.count = 0
    assert validate(s) is s


@pytest.mark.parametrize("constraint, good, bad", [
    (Integer(low=2), [2, 10**12], [1, 2.5, True, None]),
    (Integer(high=0, optional=True), [0, -3, None], [1]),
    (Number(low=0.0, high=1.0, low_open=True, high_open=True), [1e-12, 0.5, 1 - 1e-12], [0, 1, math.nan]),
    (Number(high=2.0), [-1e300, 2], [2.0000001, math.inf, -math.inf]),
    (Choice(("l2", "l1")), ["l1"], ["L1", None, 2]),
    (Switch(), [True, False], [0, "yes"]),
    (Text(), ["a"], ["", None]),
    (Names(("a", "b")), ["a,b", ("b",), ["a"]], ["", ",", "a,c", []]),
])
def test_constraints_accept_exactly_their_values(constraint, good, bad):
    for value in good:
        constraint.check("v", value)
    for value in bad:
        with pytest.raises(ValueError, match=r"^v must be .+, got "):
            constraint.check("v", value)


def test_boundary_checks_share_the_message_form():
    for call, text in ((lambda: check_alpha(1.0), "alpha must be a finite number in (0, 1), got 1.0"),
                       (lambda: check_positive("sigma", 0), "sigma must be a finite number > 0, got 0"),
                       (lambda: check_count("n", 0), "n must be an integer >= 1, got 0")):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == text
    assert check_alpha(0.001) == 0.001 and check_positive("s", 1) == 1.0 and check_count("n", 5) == 5


SETTINGS_TYPES = [Example, FixedSettings, ANCERSettings, RANCERSettings, RANCERBestSettings, RDDRSSettings,
                  FirstOrderSettings, *(cls.settings_type for cls in OBJECTIVES.values())]


@pytest.mark.parametrize("settings_type", SETTINGS_TYPES, ids=lambda t: t.__name__)
def test_json_round_trip(settings_type):
    required = {f.name: 0.3 for f in dataclasses.fields(settings_type) if f.default is dataclasses.MISSING}
    s = settings_type(**required)
    data = json.loads(json.dumps(s.to_dict()))
    assert settings_type.from_dict(data) == s
    assert list(data) == [f.name for f in dataclasses.fields(settings_type)]
    with pytest.raises(ValueError, match="has no setting bogus"):
        settings_type.from_dict({**data, "bogus": 1})
    if required:
        with pytest.raises(ValueError, match="needs the setting sigma"):
            settings_type.from_dict({})


def test_example_round_trip_keeps_every_kind():
    s = Example(count=4, steps=7, rate=0.25, mode="b", memory=False, spec="s", parts="y,z")
    data = json.loads(json.dumps(s.to_dict()))
    assert data["parts"] == ["y", "z"] and data["steps"] == 7 and data["memory"] is False
    assert Example.from_dict(data) == s
    with pytest.raises(ValueError, match="mapping"):
        Example.from_dict([("count", 4)])


def test_methods_are_built_from_their_settings_or_the_old_keywords():
    assert ANCER(0.25, steps=10).settings == ANCERSettings(0.25, ancer_steps=10)
    assert ANCER(ANCERSettings(0.25, kappa=1.0)).settings.kappa == 1.0
    assert RDDRS(0.3, steps=2, lr=0.5, kappa=1e-3, samples=8).settings == RDDRSSettings(
        0.3, rddrs_steps=2, rddrs_lr=0.5, rddrs_kappa=1e-3, opt_samples=8)
    assert RANCER(0.2, lambda1=0.1, hessian="double").settings == RANCERSettings(0.2, rancer_lambda1=0.1,
                                                                                  hessian="double")
    assert RANCERBest(0.2, select_samples=5).settings.select_samples == 5
    assert DDS(0.1, max_batch=64, gap="top2", memory=False).settings.opt_batch_size == 64
    assert FixedSigma(0.5).settings == FixedSettings(0.5)
    assert FixedSigma(sigma=0.5).settings == FixedSettings(0.5) == FixedSigma(FixedSettings(0.5)).settings
    assert FirstOrder(sigma=0.5, norms="linf").settings.norms == ("l2", "linf")
    first = FirstOrder(0.5, "l1", "coords:0-3", 0.6)
    assert first.settings == FirstOrderSettings(0.5, ("l2", "l1"), "coords:0-3", 0.6)  # canonical norms
    for cls in {*CertifyMethod.registry.values()}:
        method = cls(cls.settings_type(0.25))
        assert method.config() == {"name": cls.name, **cls.settings_type(0.25).to_dict()}
    with pytest.raises(TypeError, match="built from ANCERSettings"):
        ANCER(RANCERSettings(0.25))
    with pytest.raises(TypeError, match="takes no setting bogus"):
        DDS(0.25, bogus=1)
    with pytest.raises(ValueError, match=r"^norm \(--norm\) must be one of l2, got 'l1'$"):
        RANCER(0.25, norm="l1")
    with pytest.raises(ValueError, match=r"rancer_lambda1 \(--rancer-lambda1\) must be a finite number in \[0, 1\)"):
        RANCER(0.25, lambda1=1.0)


def test_objectives_are_built_from_their_settings():
    macer = Macer(Macer.settings_type(k=4, warmup=2))
    assert macer.num_noise == 4 and macer.config() == {"objective": "macer", "k": 4, "lbd": 12.0, "gamma": 8.0,
                                                       "beta": 16.0, "warmup": 2}
    assert make_objective("macer", k=4, warmup=2).config() == macer.config()
    with pytest.raises(ValueError, match=r"^beta \(--beta\) must be a finite number > 0, got 0.0$"):
        make_objective("macer", beta=0.0)
    with pytest.raises(TypeError, match="built from MacerSettings"):
        Macer(OBJECTIVES["gaussian"].settings_type())
