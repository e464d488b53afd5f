"""The config help texts agree with RecEnv's docstring: every equation a help quotes is the
docstring's own, every field's symbol is the one the equations use, and every symbol of the
equations belongs to a config field (or to the state the docstring defines)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from simenv import EnvConfig, RecEnv, RewardConfig, UserModelConfig

# variables of the user's state and of one step that the equations name (not config fields)
STATE = {
    "p", "z_i", "u_j", "u_l", "j", "l", "q_i", "pop_i", "log", "mean", "F", "topic_i", "w",
    "sigmoid", "N", "length_i", "click", "like", "dislike", "minutes", "dt", "b", "s",
    "patience", "activity", "sum_l", "e", "in", "session", "inf", "epsilon", "P", "Gamma",
    "min", "options", "user_id", "u",  # min(...); reset(options={"user_id": u})
}  # fmt: skip


def _norm(text: str) -> str:
    return " ".join(text.split())


def _fragments(text: str) -> list[str]:
    return [_norm(f) for f in re.findall(r"``(.+?)``", _norm(text))]


def _helps(cls) -> dict[str, str]:
    """Field -> help text, from the Google-style ``Attributes:`` section of the class docstring."""
    doc = cls.__doc__.split("Attributes:")[1]
    out: dict[str, str] = {}
    name = None
    for line in doc.splitlines():
        m = re.match(r"^ {8}(\w+): (.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2)
        elif name and line.startswith(" " * 12):
            out[name] += " " + line.strip()
    return out


def _symbol(help_text: str) -> str | None:
    """The symbol a help declares first (``alpha, weight of ...``), if any."""
    m = re.match(r"^([a-z][a-z0-9_]*), ", help_text)
    return m.group(1) if m else None


ENV_DOC = _norm(RecEnv.__doc__)
ENV_FRAGMENTS = " | ".join(_fragments(RecEnv.__doc__))


@pytest.mark.parametrize("cls", [UserModelConfig, RewardConfig])
def test_every_help_quotes_the_docstring_and_names_its_symbol(cls):
    helps = _helps(cls)
    assert set(helps) == {f.name for f in dataclasses.fields(cls)}  # every field documented
    for name, text in helps.items():
        frags = _fragments(text)
        assert frags, f"{cls.__name__}.{name}: the help quotes no equation"
        for frag in frags:
            assert frag in ENV_FRAGMENTS, f"{cls.__name__}.{name}: ``{frag}`` not in RecEnv's doc"
        sym = _symbol(text)
        used = sym if sym and sym not in helps else name
        tokens = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", " ".join(frags)))
        assert used in tokens, f"{cls.__name__}.{name}: its symbol {used!r} is not in {frags}"


def test_every_symbol_of_the_equations_is_a_field_or_state():
    sections = RecEnv.__doc__.split("## Equations")[1].split("## Action Space")[0]
    start = RecEnv.__doc__.split("## Starting State")[1].split("## Episode End")[0]
    names = set()
    for cls in (UserModelConfig, RewardConfig, EnvConfig):
        helps = _helps(cls)
        names |= set(helps)
        names |= {s for s in map(_symbol, helps.values()) if s}
    names |= {"cross_group_epsilon"}  # WorldConfig
    tokens = set()
    for frag in _fragments(sections) + _fragments(start):
        tokens |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", frag))
    unknown = tokens - names - STATE
    assert not unknown, f"symbols of RecEnv's equations that no config field declares: {unknown}"
    # the reward symbols map onto RewardConfig's fields
    for field in ("click", "like", "dislike", "watch"):
        assert f"c_{field}" in tokens


def test_return_reference_help_matches_the_equation():
    # the case that was wrong: at the reference the sigmoid is 1/2, so the return probability
    # is half of (0.5 + 0.5 activity), not half the activity
    text = _helps(UserModelConfig)["return_reference"]
    assert "half its maximum ``(0.5 + 0.5 activity)``" in _norm(text)
    assert "half the activity" not in text
    assert "sigmoid(return_slope (mean s in session - return_reference))" in ENV_DOC
