"""The component registry: every architecture part is registered by (family, name).

Style of timm's model registry: a decorator fills a dict, one function builds by name, names can be
listed with wildcards, and an unknown name gets an error that lists the valid ones and the closest.

A component is any callable (usually an ``nn.Module`` class). Its *context* arguments are the
positional parameters that the model passes (e.g. ``config``); its *options* are its keyword-only
parameters, typed and with defaults, which a spec sets by name::

    @register("mlp", "gelu")
    class GeluMLP(nn.Module):
        '''Two-layer MLP with GELU (GPT-2).'''
        def __init__(self, config, *, hidden: int | None = None): ...

    build("mlp", "gelu", config, hidden=512)

``register`` checks a component against its family's protocol (models/contract.py: the hooks it
must or may provide) and names what is missing.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import hashlib
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from models import contract

# Each family and, in one line, what its members are; the full contract is models/contract.py
FAMILIES: dict[str, str] = {family: inspect.getdoc(proto).splitlines()[0] for family, proto in contract.PROTOCOLS.items()}


class ComponentError(ValueError):
    """A spec names a component, option or combination that does not exist or cannot work."""


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()
"""Marks an option with no default, e.g. ``register(..., defaults={"window": REQUIRED})``."""


@dataclass(frozen=True)
class FamilyRef:
    """Type metadata: this option names a component of another family (a name or a mapping)."""

    family: str


def ref(family: str) -> Any:
    """Annotation for an option that holds a component spec of ``family``."""
    return typing.Annotated[str | dict, FamilyRef(family)]


@dataclass(frozen=True)
class Option:
    name: str
    annotation: Any
    default: Any = REQUIRED

    @property
    def family(self) -> str | None:
        """The family this option refers to, when it names another component."""
        for meta in getattr(self.annotation, "__metadata__", ()):
            if isinstance(meta, FamilyRef):
                return meta.family
        return None

    @property
    def type_name(self) -> str:
        if self.family:
            return f"{self.family} spec"
        text = getattr(self.annotation, "__name__", None) or str(self.annotation)
        return text.replace("typing.", "").replace("NoneType", "None")

    @functools.cached_property
    def _adapter(self) -> pydantic.TypeAdapter:
        return pydantic.TypeAdapter(self.annotation)

    def validate(self, value: Any) -> Any:
        if self.family:
            return resolve(self.family, value)
        try:
            # strict: YAML already gives typed scalars; "2" for an int is a mistake worth reporting
            return _plain(self._adapter.validate_python(value, strict=True))
        except pydantic.ValidationError:
            if isinstance(value, int) and not isinstance(value, bool) and self._accepts_float():
                return float(value)  # 1 for a float option is fine
            raise ComponentError(f"option '{self.name}' expects {self.type_name}, got {value!r}") from None

    def _accepts_float(self) -> bool:
        try:
            self._adapter.validate_python(1.5, strict=True)
            return True
        except pydantic.ValidationError:
            return False


@dataclass(frozen=True)
class Component:
    family: str
    name: str
    factory: Callable[..., Any]
    description: str
    options: dict[str, Option]
    fixed: dict[str, Any] = field(default_factory=dict)
    probe: Callable[[], str | None] | None = None
    note: Callable[[], str | None] | None = None

    def unavailable_reason(self) -> str | None:
        """Why this component cannot run on this machine, or None when it can."""
        return _cached_probe(self.probe) if self.probe else None

    def device_reason(self, options: Mapping[str, Any], device: Any) -> str | None:
        """Why this component cannot run with these options on `device` (not on this machine at all,
        or an optional ``device_limitation`` hook, e.g. an sdpa kernel that needs CUDA), or None."""
        limitation = getattr(self.factory, "device_limitation", None)
        return self.unavailable_reason() or (limitation(options, device) if limitation else None)

    def limitation(self) -> str | None:
        """A caveat that holds on this machine although the component runs (e.g. forward only)."""
        return _cached_probe(self.note) if self.note else None

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check option names and types; return every option with defaults filled in."""
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise ComponentError(
                f"{self.family} '{self.name}' has no option '{unknown[0]}'"
                + _closest(unknown[0], self.options)
                + f"; its options: {', '.join(self.options) or '(none)'}"
            )
        resolved = {}
        for name, opt in self.options.items():
            if name in options:
                try:
                    resolved[name] = opt.validate(options[name])
                except ComponentError as e:
                    raise ComponentError(f"{self.family} '{self.name}': {e}") from None
            elif opt.default is REQUIRED:
                raise ComponentError(
                    f"{self.family} '{self.name}' needs option '{name}' ({opt.type_name})"
                )
            else:  # a default that names a component resolves like a given one: one canonical form
                resolved[name] = resolve(opt.family, opt.default) if opt.family else _plain(opt.default)
        return resolved

    def build(self, *context: Any, **options: Any) -> Any:
        built = self.factory(*context, **self.resolve_options(options), **self.fixed)
        if not inspect.isclass(self.factory):  # a class was checked whole when it registered
            missing = contract.built_violations(self.family, built)
            if missing:
                raise ComponentError(f"{self.family} '{self.name}' built an object that {'; '.join(missing)} "
                                     f"(the {self.family} contract: python -m models {self.family})")
        return built


_REGISTRY: dict[str, dict[str, Component]] = {family: {} for family in FAMILIES}


def register(
    family: str,
    name: str,
    *,
    description: str | None = None,
    fixed: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    probe: Callable[[], str | None] | None = None,
    note: Callable[[], str | None] | None = None,
) -> Callable[[Any], Any]:
    """Register a component under ``(family, name)``; use as a decorator.

    description: one line; defaults to the first line of the docstring.
    fixed: options bound by this name and hidden from users (``mqa`` is attention with one kv head).
    defaults: new defaults for options (``REQUIRED`` removes the default).
    probe: returns why the component cannot run on this machine, or None.
    note: returns a caveat on this machine for a component that runs (e.g. "forward only on CPU").
    """
    _family(family)

    def decorator(factory: Any) -> Any:
        if name in _REGISTRY[family] and _REGISTRY[family][name].factory is not factory:
            raise ComponentError(f"{family} '{name}' is already registered")
        problems = contract.violations(family, factory)
        if problems:
            label = getattr(factory, "__qualname__", repr(factory))
            raise ComponentError(f"{family} '{name}' ({label}) does not follow the {family} contract: it "
                                 + "; ".join(problems) + f" (the contract: python -m models {family})")
        doc = description or (inspect.getdoc(factory) or "").strip().splitlines()
        text = doc if isinstance(doc, str) else (doc[0].rstrip(".") if doc else "")
        options = _options_of(factory, fixed or {}, defaults or {}, family)
        _REGISTRY[family][name] = Component(family, name, factory, text, options, dict(fixed or {}), probe, note)
        return factory

    return decorator


def get(family: str, name: str) -> Component:
    """The registered component, or an error listing the valid names and the closest one."""
    members = _REGISTRY[_family(family)]
    if name not in members:
        raise ComponentError(
            f"unknown {family} '{name}'" + _closest(name, members) + f"; valid: {', '.join(sorted(members))}"
        )
    return members[name]


def build(family: str, name: str, /, *context: Any, **options: Any) -> Any:
    """Build a component by name: ``build("mlp", "swiglu", config, hidden=256)``."""
    return get(family, name).build(*context, **options)


def list_components(family: str, pattern: str = "*") -> list[str]:
    """Registered names in a family matching a shell-style wildcard, sorted."""
    return sorted(n for n in _REGISTRY[_family(family)] if fnmatch.fnmatchcase(n, pattern))


@dataclass(frozen=True)
class Availability:
    family: str
    name: str
    description: str
    options: dict[str, Any]  # option name -> default (REQUIRED when none)
    available: bool
    reason: str | None  # why it cannot run here (None when it can)
    note: str | None  # a caveat on this machine for a component that runs


def available(family: str | None = None, pattern: str = "*") -> list[Availability]:
    """Each member of ``family`` (all families when None): description, options, whether it runs here."""
    families = [_family(family)] if family else list(FAMILIES)
    rows = []
    for fam in families:
        for name in list_components(fam, pattern):
            comp = _REGISTRY[fam][name]
            reason = comp.unavailable_reason()
            defaults = {o.name: _plain(o.default) for o in comp.options.values()}
            note = comp.limitation() if reason is None else None
            rows.append(Availability(fam, name, comp.description, defaults, reason is None, reason, note))
    return rows


def resolve(family: str, spec: Any) -> dict[str, Any]:
    """Normalise a spec (a name, or a mapping with ``name`` plus options) to ``{name, **all options}``.

    Options are type-checked and defaults filled in, so two specs that mean the same model resolve to
    the same dict (and so hash the same).
    """
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        name, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ComponentError(f"a {family} spec is a name or a mapping with 'name', got {spec!r}")
    return {"name": name, **get(family, name).resolve_options(options)}


def components_of(family: str, spec: Mapping[str, Any]) -> list[Component]:
    """The component a resolved spec names and those its options name (a backend, an expert MLP)."""
    component = get(family, spec["name"])
    found = [component]
    for option in component.options.values():
        value = spec.get(option.name)
        if option.family and isinstance(value, Mapping):
            found += components_of(option.family, value)
    return found


def build_spec(family: str, spec: Any, /, *context: Any) -> Any:
    """Build from a spec (name or mapping), e.g. ``build_spec("norm", {"name": "layernorm", "bias": False}, 64, cfg)``."""
    resolved = resolve(family, spec)
    return build(family, resolved.pop("name"), *context, **resolved)


def load_plugins(modules: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
    """Import modules that register third-party components (a spec's ``plugins:``); return each
    one's source hash. Given a mapping module -> expected hash (a planned run's), a plugin whose
    source changed since is refused: the run was planned with other code."""
    hashes = {}
    for module in modules:
        try:
            imported = importlib.import_module(module)
        except ImportError as e:
            raise ComponentError(f"plugin '{module}' could not be imported: {e}") from e
        hashes[module] = source_hash(imported)
        expected = modules[module] if isinstance(modules, Mapping) else None
        if expected and expected != hashes[module]:
            raise ComponentError(f"plugin '{module}' changed since this run was planned (source sha256 "
                                 f"{expected[:12]}…, now {hashes[module][:12]}…): plan the study again")
    return hashes


def source_hash(module: Any) -> str:
    """sha256 of a module's source: its file, or every .py file of a package (sorted by path)."""
    digest = hashlib.sha256()
    if getattr(module, "__path__", None):  # a package
        files = sorted(p for root in module.__path__ for p in Path(root).rglob("*.py"))
    else:
        files = [Path(module.__file__)] if getattr(module, "__file__", None) else []
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# -- helpers ------------------------------------------------------------------------------------


def _family(family: str) -> str:
    if family not in FAMILIES:
        raise ComponentError(f"unknown family '{family}'" + _closest(family, FAMILIES) + f"; families: {', '.join(FAMILIES)}")
    return family


def _closest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


# an option with one of these names always refers to that family, whatever its annotation says: a
# plugin's `backend: str = "auto"` is checked (is the kernel available here? can it do what is asked?)
# exactly as the built-in attention's is
IMPLIED_REFS: dict[str, dict[str, str]] = {"attention": {"backend": "attention_backend"}}


def _keyword_options(factory: Any) -> dict[str, tuple[inspect.Parameter, Any]]:
    """A factory's keyword-only parameters with their type hints; a class whose ``__init__`` takes
    ``**options`` also has those of the class it extends (a subclass adds a module, keeps the options)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target, include_extras=True)
    params = inspect.signature(factory).parameters.values()
    found = {p.name: (p, hints.get(p.name, Any)) for p in params if p.kind is p.KEYWORD_ONLY}
    if inspect.isclass(factory) and any(p.kind is p.VAR_KEYWORD for p in params):
        parent = next((c for c in factory.__mro__[1:] if "__init__" in vars(c) and c is not object), None)
        if parent is not None:
            found = {**_keyword_options(parent), **found}
    return found


def _options_of(factory: Any, fixed: Mapping[str, Any], defaults: Mapping[str, Any], family: str = "") -> dict[str, Option]:
    implied = IMPLIED_REFS.get(family, {})
    options = {}
    for name, (p, annotation) in _keyword_options(factory).items():
        if name in fixed:
            continue
        default = defaults.get(name, REQUIRED if p.default is p.empty else p.default)
        options[name] = Option(name, ref(implied[name]) if name in implied else annotation, default)
    for key in [*fixed, *defaults]:
        if key not in options and key not in _keyword_options(factory):
            raise ComponentError(f"{factory.__name__} has no keyword-only option '{key}'")
    return options


def _plain(value: Any) -> Any:
    """An option's value as plain data (a pydantic model option as its dict, defaults filled in), so
    specs hash and serialise the same whichever way they were written."""
    return value.model_dump() if isinstance(value, pydantic.BaseModel) else value


@functools.cache
def _cached_probe(probe: Callable[[], str | None]) -> str | None:
    return probe()
