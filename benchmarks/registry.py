"""The experiment registry and the typed experiment configs.

An experiment is one module under ``benchmarks/`` with a config and a run function::

    from dataclasses import dataclass, replace

    from benchmarks.registry import ExperimentConfig, experiment, param
    from benchmarks.runner import RunContext
    from benchmarks.stats import ratio_effect


    @dataclass(frozen=True)
    class PerfEnvConfig(ExperimentConfig):
        \"\"\"Environment throughput.\"\"\"

        n_users: int = param(10_000, "users stepped at once")
        n_steps: int = param(200, "steps per measurement")

        def __post_init__(self) -> None:
            if self.n_users < 1:
                raise ValueError(f"n_users must be >= 1, got {self.n_users}")

        @classmethod
        def quick(cls) -> "PerfEnvConfig":
            return replace(cls(), n_users=1_000)


    @experiment("perf_env", "Steps per second of BatchedRecEnv.", PerfEnvConfig)
    def run(cfg: PerfEnvConfig, ctx: RunContext) -> None:
        batched, stepwise = [], []  # user steps per second per seed, timed side by side
        for seed in ctx.seeds:
            rng = ctx.rng(seed, "world")
            ...
        ctx.report.finding(
            "the batched env steps users at least 10x faster than one env per user",
            ratio_effect(batched, stepwise, bar=10.0, unit="seeds"),
            metric="user steps per second",
            direction=">",
        )

and its module name appended to :data:`EXPERIMENT_MODULES`. ``python -m benchmarks list``
shows every field's help; ``--set n_users=500`` overrides a field with a value parsed from
the field's annotated type (the config's ``__post_init__`` then validates it).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import re
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "EXPERIMENT_MODULES",
    "FULL_MINUTES",
    "RESERVED_NAMES",
    "ExperimentConfig",
    "param",
    "FieldInfo",
    "config_fields",
    "parse_value",
    "make_config",
    "Experiment",
    "Registry",
    "REGISTRY",
    "experiment",
    "UnknownExperimentError",
]

# Modules imported (in this order) to register the shipped experiments; `all` runs them in
# registration order. Append a module's dotted name here when adding an experiment.
EXPERIMENT_MODULES: list[str] = [
    "benchmarks.perf_env",
    "benchmarks.losses",
    "benchmarks.ranker",
    "benchmarks.consistency",
    "benchmarks.loop",
    "benchmarks.folding",
    "benchmarks.similarity",
    "benchmarks.dimension",
    "benchmarks.item_towers",
    "benchmarks.user_towers",
    "benchmarks.baselines",
    "benchmarks.perf",
    "benchmarks.ann",
    "benchmarks.movielens",
    "benchmarks.scale",
    "benchmarks.rl",
    "benchmarks.ope",
]

#: Minutes of each experiment's full profile with 3 seeds and one thread, measured in the
#: published run of 9f34c57 (two experiments at a time on a 2-core machine). Only the parallel
#: backends read it: they submit the longest experiments first (with these numbers the two
#: workers' loads come out within a minute of each other). An experiment missing here counts
#: as 1 minute.
FULL_MINUTES: dict[str, float] = {
    "ranker": 46.0,
    "consistency": 44.2,
    "movielens": 32.6,
    "loop": 20.2,
    "user-towers": 13.0,
    "losses": 12.2,
    "rl": 11.6,
    "ope": 11.3,
    "folding": 7.1,
    "item-towers": 6.9,
    "similarity": 4.7,
    "perf": 3.9,
    "dimension": 3.2,
    "baselines": 1.3,
    "perf-env": 0.7,
}

RESERVED_NAMES = frozenset({"all", "list"})
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")

C = TypeVar("C", bound="ExperimentConfig")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ExperimentConfig:
    """Base of every experiment config: a frozen dataclass with two profiles.

    Subclasses declare fields with :func:`param` (default + help text), validate them in
    ``__post_init__`` and override :meth:`quick` (the ``--quick`` profile: small world,
    minutes on two cores) and, if the defaults are not the full profile, :meth:`full`.
    """

    @classmethod
    def full(cls: type[C]) -> C:
        """The full profile (published tables); by default the field defaults."""
        return cls()

    @classmethod
    def quick(cls: type[C]) -> C:
        """The ``--quick`` profile; by default the field defaults (override to shrink)."""
        return cls()


def param(default: Any, help: str) -> Any:
    """A config field with a default and a help text (shown by ``python -m benchmarks list``).

    Args:
        default: an immutable default (numbers, strings, tuples, enums, None).
        help: one-line description of the field, with its unit and meaning.

    Returns:
        A ``dataclasses.field`` carrying ``metadata={"help": help}``.

    Raises:
        ValueError: for a mutable default (list, dict, set) or an empty help.
    """
    if isinstance(default, (list, dict, set)):
        raise ValueError(
            f"default must be immutable in a frozen config (use a tuple), got {default!r}"
        )
    if not str(help).strip():
        raise ValueError("help must describe the field, got an empty string")
    return dataclasses.field(default=default, metadata={"help": str(help).strip()})


@dataclass(frozen=True)
class FieldInfo:
    """Introspected description of one config field.

    Attributes:
        name: field name.
        type: the resolved annotation (a type or typing construct).
        type_name: readable form of ``type``.
        default: the default value (``dataclasses.MISSING`` if none).
        help: the help text from ``param``.
    """

    name: str
    type: Any
    type_name: str
    default: Any
    help: str


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def config_fields(config_cls: type) -> list[FieldInfo]:
    """Describe every field of a config dataclass, with resolved types and help texts.

    Args:
        config_cls: a dataclass type.

    Returns:
        One :class:`FieldInfo` per field, in declaration order.

    Raises:
        ValueError: if ``config_cls`` is not a dataclass type.
    """
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise ValueError(f"config_cls must be a dataclass type, got {config_cls!r}")
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        tp = hints.get(f.name, Any)
        out.append(FieldInfo(f.name, tp, _type_name(tp), f.default, f.metadata.get("help", "")))
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(text: str, tp: Any, name: str = "value") -> Any:
    """Parse a ``--set`` value from text according to a field's annotated type.

    Supported: ``bool`` (true/false/yes/no/on/off/1/0), ``int``, ``float``, ``str``,
    enums (by member name), ``Literal[...]``, ``X | None`` (``none`` gives None) and
    ``tuple[X, ...]`` / ``tuple[X, Y]`` (comma-separated, empty text gives ``()``).

    Args:
        text: the text after ``=``.
        tp: the field's type.
        name: the field's name, for error messages.

    Returns:
        The parsed value.

    Raises:
        ValueError: naming the field, the text and what was expected.
    """
    text = str(text).strip()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and text.lower() in {"none", "null"}:
            return None
        errors = []
        for a in non_none:
            try:
                return parse_value(text, a, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{name}={text!r} matches none of {_type_name(tp)}: {'; '.join(errors)}")
    if origin is typing.Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ValueError(f"{name}={text!r} must be one of {[str(a) for a in args]}")
    if origin is tuple:
        parts = [p for p in (s.strip() for s in text.split(",")) if p] if text else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(p, args[0], name) for p in parts)
        if args and len(parts) != len(args):
            raise ValueError(f"{name}={text!r} needs {len(args)} comma-separated values")
        return tuple(parse_value(p, a, name) for p, a in zip(parts, args, strict=True))
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{name}={text!r} must be a bool (true/false, yes/no, on/off, 1/0)")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"{name}={text!r} must be an int") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} must be a float") from None
    if tp is str:
        return text
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {m.name.lower(): m for m in tp}
        if text.lower() in members:
            return members[text.lower()]
        raise ValueError(f"{name}={text!r} must be one of {[m.name for m in tp]}")
    raise ValueError(f"{name}: fields of type {_type_name(tp)} cannot be set from the command line")


def make_config(config_cls: type[C], quick: bool, overrides: Mapping[str, str] | None = None) -> C:
    """Build an experiment's config: its profile, then the ``--set`` overrides.

    Args:
        config_cls: the experiment's config class.
        quick: take the ``quick()`` profile instead of ``full()``.
        overrides: field name to text, parsed with the field's type.

    Returns:
        The validated config (``__post_init__`` runs on the final value).

    Raises:
        ValueError: for an unknown field, an unparsable value, or a value the config rejects.
    """
    base = config_cls.quick() if quick else config_cls.full()
    if not overrides:
        return base
    fields = {f.name: f for f in config_fields(config_cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config field(s) {unknown} for {config_cls.__name__}; "
            f"fields: {', '.join(fields) or 'none'}"
        )
    values = {k: parse_value(v, fields[k].type, k) for k, v in overrides.items()}
    return dataclasses.replace(base, **values)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Experiment:
    """A registered experiment.

    Attributes:
        name: CLI name and report folder name.
        description: one-paragraph description (first sentence shown by ``list``).
        config_cls: its :class:`ExperimentConfig` subclass.
        run: ``run(cfg, ctx) -> None``.
        module: the module that registered it.
    """

    name: str
    description: str
    config_cls: type
    run: Callable[..., None]
    module: str


class UnknownExperimentError(ValueError):
    """Raised for an experiment name that is not registered."""


class Registry:
    """An ordered set of experiments, filled by the :meth:`experiment` decorator."""

    def __init__(self) -> None:
        self._experiments: dict[str, Experiment] = {}
        self.import_errors: dict[str, str] = {}

    def register(
        self, name: str, description: str, config_cls: type, run: Callable[..., None]
    ) -> Experiment:
        """Register ``run`` under ``name`` (see :meth:`experiment`)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"experiment name must match {_NAME_RE.pattern}, got {name!r}")
        if name in RESERVED_NAMES:
            raise ValueError(f"experiment name {name!r} is reserved ({sorted(RESERVED_NAMES)})")
        if not str(description).strip():
            raise ValueError(f"experiment {name!r}: description must not be empty")
        if not (isinstance(config_cls, type) and issubclass(config_cls, ExperimentConfig)):
            raise ValueError(
                f"experiment {name!r}: config_cls must subclass ExperimentConfig, "
                f"got {config_cls!r}"
            )
        params = getattr(config_cls, "__dataclass_params__", None)
        if params is None or not params.frozen or "__dataclass_fields__" not in vars(config_cls):
            raise ValueError(
                f"experiment {name!r}: {config_cls.__name__} must be a @dataclass(frozen=True)"
            )
        no_help = [f.name for f in config_fields(config_cls) if not f.help]
        if no_help:
            raise ValueError(
                f"experiment {name!r}: fields {no_help} of {config_cls.__name__} lack a help "
                "text; declare them with param(default, help)"
            )
        module = getattr(run, "__module__", "?")
        old = self._experiments.get(name)
        if old is not None and (old.module, old.run.__qualname__) != (module, run.__qualname__):
            raise ValueError(f"experiment {name!r} is already registered by {old.module}")
        exp = Experiment(name, " ".join(str(description).split()), config_cls, run, module)
        self._experiments[name] = exp
        return exp

    def experiment(
        self, name: str, description: str, config_cls: type
    ) -> Callable[[Callable[..., None]], Callable[..., None]]:
        """Decorator registering ``run(cfg, ctx) -> None`` as experiment ``name``.

        Args:
            name: lowercase name (``[a-z][a-z0-9_-]*``, e.g. ``perf-env``), not ``all`` or ``list``.
            description: what the experiment measures and why.
            config_cls: a frozen :class:`ExperimentConfig` subclass whose every field has
                a help text.

        Returns:
            The decorator; it returns the function unchanged.
        """

        def deco(run: Callable[..., None]) -> Callable[..., None]:
            self.register(name, description, config_cls, run)
            return run

        return deco

    def load(self, modules: Sequence[str]) -> dict[str, str]:
        """Import experiment modules; a module that fails to import is recorded, not fatal.

        Args:
            modules: dotted module names.

        Returns:
            Module name to formatted traceback for each module that failed (also kept in
            :attr:`import_errors`).
        """
        failed = {}
        for mod in modules:
            try:
                importlib.import_module(mod)
            except Exception:  # reported by the CLI, other experiments still run
                failed[mod] = traceback.format_exc()
        self.import_errors.update(failed)
        return failed

    def get(self, name: str) -> Experiment:
        """The experiment called ``name``.

        Raises:
            UnknownExperimentError: naming the registered experiments.
        """
        try:
            return self._experiments[name]
        except KeyError:
            known = ", ".join(self._experiments) or "none registered"
            raise UnknownExperimentError(
                f"unknown experiment {name!r}; registered: {known}"
            ) from None

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._experiments)

    def __iter__(self) -> Iterator[Experiment]:
        return iter(list(self._experiments.values()))

    def __len__(self) -> int:
        return len(self._experiments)

    def __contains__(self, name: object) -> bool:
        return name in self._experiments


REGISTRY = Registry()
"""The process-wide registry the shipped experiments register into."""


def experiment(
    name: str, description: str, config_cls: type
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register an experiment in :data:`REGISTRY` (see :meth:`Registry.experiment`)."""
    return REGISTRY.experiment(name, description, config_cls)
