"""The spec reference, generated from the models that validate a spec, so it cannot drift from them.

    python -m bench.spec_reference                  # docs/specs.md on stdout
    python -m bench.spec_reference --write          # rewrite docs/specs.md
    python -m bench.spec_reference --check          # exit 1 if docs/specs.md is stale
    python -m bench.spec_reference base.train.lr    # where a key is documented, or why it is not a key

Every key a spec may hold is a field of ``bench.spec.Spec`` or of a model it nests; ``base:``'s
sections are validated per run as ``ModelConfig`` (model), ``DataConfig`` (data, one model per
source) and ``TrainConfig`` (train), and a component field (``model.attention``, ``train.optimizer``)
takes the options its registered members declare. ``lookup`` resolves a dotted key against that
tree, as a spec writes it (``base.train.lr``, ``budget.steps``) or as a variant's override writes it
(``train.lr``, ``model.attention.n_kv_head``); ``yaml_key_problems`` checks every key of a YAML text.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from bench.config import TrainConfig
from bench.data import DataConfig
from bench.spec import Base, Spec
from models.config import COMPONENT_FIELDS, ModelConfig
from models.contract import PROTOCOLS
from models.registry import _REGISTRY, REQUIRED, Component, Option

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "specs.md"

# Descriptions for fields of models that declare none (models/config.py); a field's own description
# wins, so an entry here is dropped once its field has one
NOTES: dict[tuple[type, str], str] = {
    (ModelConfig, "vocab_size"): "token vocabulary (default: the data's)",
    (ModelConfig, "n_layer"): "transformer blocks",
    (ModelConfig, "n_head"): "attention heads (query heads)",
    (ModelConfig, "n_embd"): "model width; a multiple of n_head",
    (ModelConfig, "dropout"): "dropout on attention, residuals and embeddings",
    (ModelConfig, "tie_embeddings"): "the LM head shares the token embedding's weight (GPT-2)",
}


# -- the schema tree ------------------------------------------------------------------------------------


class Node:
    """A place in a spec: which keys may follow it. A leaf takes a value and no keys."""

    def child(self, key: str) -> Node | None:
        return None

    def keys(self) -> list[str]:
        return []


class Open(Node):
    """A mapping of free keys and values (``dict[str, Any]``): anything may follow."""

    def child(self, key: str) -> Node:
        return self


LEAF = Node()


@dataclass(eq=False)
class Names(Node):
    """A mapping of names the spec chooses (variants, a comparison's reference), each holding ``value``."""

    value: Node

    def child(self, key: str) -> Node:
        return self.value


@dataclass(eq=False)
class Fields(Node):
    """Keys the spec fixes, each with its node."""

    fields: dict[str, Node]

    def child(self, key: str) -> Node | None:
        return self.fields.get(key)

    def keys(self) -> list[str]:
        return list(self.fields)


@dataclass(eq=False)
class Model(Node):
    """A pydantic model's fields."""

    cls: type[BaseModel]

    def child(self, key: str) -> Node | None:
        return field_node(self.cls, key) if key in self.cls.model_fields else None

    def keys(self) -> list[str]:
        return list(self.cls.model_fields)


@dataclass(eq=False)
class AnyOf(Node):
    """Any of several shapes: a data source of one kind or another; a spec's own keys or `extends`."""

    members: list[Node]

    def child(self, key: str) -> Node | None:
        return next((c for m in self.members if (c := m.child(key)) is not None), None)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for m in self.members for k in m.keys()))


@dataclass(eq=False)
class ComponentNode(Node):
    """A registered component: ``name`` plus the options any built-in member of the family declares."""

    family: str

    def child(self, key: str) -> Node | None:
        if key == "name":
            return LEAF
        options = [o for c in built_in(self.family) for o in c.options.values() if o.name == key]
        return option_node(options[0]) if options else None

    def keys(self) -> list[str]:
        return ["name", *dict.fromkeys(o for c in built_in(self.family) for o in c.options)]


@dataclass(eq=False)
class ListOf(Node):
    """A list whose items have keys (a ladder's steps); keys are looked up through its items."""

    item: Node

    def child(self, key: str) -> Node | None:
        return self.item.child(key)

    def keys(self) -> list[str]:
        return self.item.keys()


def node_of(annotation: Any) -> Node:
    """The node of a type: models have keys, unions have their members' keys, dicts free names."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return node_of(args[0])
    if annotation is Any:
        return Open()
    if origin in (typing.Union, types.UnionType):
        members = [n for n in (node_of(a) for a in args if a is not type(None)) if n is not LEAF]
        members = [m for n in members for m in (n.members if isinstance(n, AnyOf) else [n])]  # one level
        return members[0] if len(members) == 1 else AnyOf(members) if members else LEAF
    if origin is dict:
        return Names(node_of(args[1])) if args else Open()
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return Model(annotation)
    return LEAF


BASE = Model(Base)
SPEC = AnyOf([Model(Spec), Fields({"extends": LEAF})])  # extends: is read (and removed) before validation
# what a field declared loosely (dict[str, Any]) holds: the models the runner validates it with
SEMANTIC: dict[tuple[type, str], Node] = {
    (Base, "model"): Model(ModelConfig),
    (Base, "data"): node_of(DataConfig),  # one model per source
    (Base, "train"): Model(TrainConfig),
    (Spec, "budget"): Model(TrainConfig),
    (Spec, "variants"): Names(BASE),
    (Spec, "ladder"): ListOf(Names(BASE)),
    (Spec, "sweep"): BASE,
    (Spec, "tune"): AnyOf([BASE, Fields({"tune_seeds": LEAF})]),
    (TrainConfig, "optimizer"): ComponentNode("optimizer"),
    **{(ModelConfig, family): ComponentNode(family) for family in COMPONENT_FIELDS},
}
TYPE_TEXT: dict[tuple[type, str], str] = {
    (Base, "model"): "mapping: [base.model](#basemodel)",
    (Base, "data"): "mapping: [base.data](#basedata)",
    (Base, "train"): "mapping: [base.train](#basetrain)",
    (Spec, "budget"): "mapping: keys of base.train",
    (Spec, "variants"): "name → overrides of base",
    (Spec, "ladder"): "list of {name: overrides of base}",
    (Spec, "sweep"): "key of base → list of values",
    (Spec, "tune"): "key of base → list of values (or variant → list), tune_seeds",
    (TrainConfig, "optimizer"): "name or mapping",
    **{(ModelConfig, f): "name or mapping" for f in COMPONENT_FIELDS},
    (Spec, "base"): "mapping: [base](#base)",
    (Spec, "metric"): "a metric name or mapping",
}


def field_node(cls: type[BaseModel], name: str) -> Node:
    for klass in cls.__mro__:
        if (klass, name) in SEMANTIC:
            return SEMANTIC[(klass, name)]
    return node_of(cls.model_fields[name].annotation)


def option_node(option: Option) -> Node:
    return ComponentNode(option.family) if option.family else node_of(option.annotation)


def built_in(family: str) -> list[Component]:
    """The family's components that ship with archbench (plugins and tests' stand-ins left out), by name."""
    return [c for name, c in sorted(_REGISTRY[family].items())
            if getattr(c.factory, "__module__", "").split(".")[0] == "models"]


class UnknownKey(KeyError):
    """A dotted key that no spec can hold; the message names where it stops and the keys there."""

    def __str__(self) -> str:
        return str(self.args[0])


def lookup(key: str) -> Node:
    """The node of a dotted key as a spec writes it (``base.train.lr``, ``budget.steps``) or as a
    variant's, sweep's or tune's override writes it, relative to base (``train.lr``,
    ``model.attention.n_kv_head``); raises UnknownKey."""
    parts = key.split(".")
    return walk(root_of(parts[0]), parts, "")


def root_of(first: str) -> Node:
    """Where a key starts: the spec's top level, or base for a variant's override (train.lr)."""
    return BASE if first not in SPEC.keys() and first in BASE.keys() else SPEC


def walk(node: Node, parts: list[str], prefix: str) -> Node:
    """The node at node.parts[0].parts[1]...; UnknownKey names the first part that is not a key there."""
    for i, part in enumerate(parts):
        found = node.child(part)
        if found is None:
            where = ".".join([*([prefix] if prefix else []), *parts[:i]]) or "the top level"
            keys = node.keys()
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            listing = f"; keys there: {', '.join(keys)}" if keys else " (it takes a value, not keys)"
            raise UnknownKey(f"'{part}' is not a key under {where}{hint}{listing}")
        node = found
    return node


def yaml_key_problems(text: str) -> list[str]:
    """Each key of a YAML text (a spec or a fragment of one) that no spec can hold, with why. Dotted
    keys count as levels; keys stop being checked where the schema takes free values."""
    problems: list[str] = []

    def visit(node: Node, value: yaml.Node, path: list[str]) -> None:
        if isinstance(value, yaml.SequenceNode) and isinstance(node, ListOf):
            for item in value.value:
                visit(node.item, item, path)
        if not isinstance(value, yaml.MappingNode) or isinstance(node, Open) or node is LEAF:
            return
        for key_node, child in value.value:
            parts = str(key_node.value).split(".")
            start = node if path else root_of(parts[0])  # a fragment may start in base (train: ...)
            try:
                found = walk(start, parts, ".".join(path))
            except UnknownKey as e:
                problems.append(f"line {key_node.start_mark.line + 1}: {e}")
                continue
            visit(found, child, [*path, *parts])

    for document in yaml.compose_all(text, Loader=yaml.SafeLoader):
        if document is not None:
            visit(SPEC, document, [])
    return problems


# -- rendering ------------------------------------------------------------------------------------------


def type_text(annotation: Any) -> str:
    """A type as a reader writes its value: ``int | null``, ``cosine | wsd``, ``list[int]``, ``mapping``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        return " | ".join(yaml_inline(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_text(a) for a in args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]" if args else origin.__name__
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "mapping"  # its keys have a section of their own
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def yaml_inline(value: Any) -> str:
    """A value as YAML writes it inline (``null``, ``[1, 4]``, ``{rounds: 20}``)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.strip().removesuffix("...").strip()  # a bare scalar is dumped as a document ending in ...


def constraints(metadata: list) -> str:
    text = []
    for m in metadata:
        for kind, attribute, symbol in ((Gt, "gt", ">"), (Ge, "ge", "≥"), (Lt, "lt", "<"), (Le, "le", "≤")):
            if isinstance(m, kind):
                text.append(f"{symbol} {yaml_inline(getattr(m, attribute))}")
        if isinstance(m, MinLen):
            text.append(f"at least {m.min_length}")
        if isinstance(m, MaxLen):
            text.append(f"at most {m.max_length}")
        if getattr(m, "pattern", None):
            text.append(f"matches {m.pattern}")
    return f" ({', '.join(text)})" if text else ""


def default_text(info: Any) -> str:
    if info.default_factory is not None:
        return yaml_inline(info.default_factory())
    return "required" if info.default is PydanticUndefined else yaml_inline(info.default)


def source_comments(cls: type) -> dict[str, str]:
    """field -> the comment beside it in the class's source, or in the lines right above it."""
    found: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if issubclass(k, BaseModel) and k is not BaseModel]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            comment = re.fullmatch(r"\s{4}#\s?(.*)", line)
            if comment:
                above.append(comment.group(1))
                continue
            declared = re.match(r"\s{4}(\w+)\s*:[^#]*?(?:#\s?(.*))?$", line)
            if declared and declared.group(1) in cls.model_fields:
                text = declared.group(2) or " ".join(above)
                if text:
                    found[declared.group(1)] = text
            above = []
    return found


def describe(cls: type[BaseModel], name: str) -> str:
    info = cls.model_fields[name]
    text = (info.description or source_comments(cls).get(name)
            or next((NOTES[(k, name)] for k in cls.__mro__ if (k, name) in NOTES), ""))
    node = field_node(cls, name)
    if isinstance(node, ComponentNode):  # its members and options have a table of their own
        link = f"a registered [{node.family}](#components-{node.family}), with its options"
        text = f"{link}; {text}" if text else link
    models = [m for m in (node.members if isinstance(node, AnyOf) else [node]) if isinstance(m, Model)]
    return text or (own_doc(models[0].cls) if len(models) == 1 else "")  # a section: its docstring


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


@dataclass
class Section:
    """A heading and a table of keys under a prefix."""

    title: str
    intro: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def render(self, level: int = 2) -> str:
        lines = [f"{'#' * level} {self.title}", ""]
        if self.intro:
            lines += [self.intro, ""]
        if self.rows:
            lines += ["| key | type | default | description |", "|---|---|---|---|"]
            lines += [f"| `{k}` | {cell(t)} | {cell(d) if d == 'required' else '`' + cell(d) + '`'} | {cell(s)} |"
                      for k, t, d, s in self.rows]
            lines.append("")
        return "\n".join(lines)


def model_rows(cls: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        kind = next((TYPE_TEXT[(k, name)] for k in cls.__mro__ if (k, name) in TYPE_TEXT), None)
        kind = kind or type_text(info.annotation) + constraints(info.metadata)
        rows.append((f"{prefix}{name}", kind, default_text(info), describe(cls, name)))
    return rows


def own_doc(cls: type) -> str:
    """The class's own docstring (not one it inherits from BaseModel), on one line."""
    return " ".join(inspect.cleandoc(cls.__dict__.get("__doc__") or "").split())


def model_sections(cls: type[BaseModel], prefix: str, title: str, intro: str = "") -> Iterator[Section]:
    """The model's table, then a section per nested model (depth first)."""
    yield Section(title, intro or own_doc(cls), model_rows(cls, prefix))
    for name, info in cls.model_fields.items():
        if any((k, name) in SEMANTIC for k in cls.__mro__):
            continue
        node = node_of(info.annotation)
        for member in node.members if isinstance(node, AnyOf) else [node]:
            if isinstance(member, Model):
                shape = " as {" + ", ".join(member.keys()) + "}" if isinstance(node, AnyOf) else ""
                yield from model_sections(member.cls, f"{prefix}{name}.", f"`{prefix}{name}`{shape}")


def data_sections() -> Iterator[Section]:
    """One table per data source (and per task), the keys its model takes."""
    node = SEMANTIC[(Base, "data")]
    for member in node.members:
        cls = member.cls
        kinds = [f"{k}: {yaml_inline(cls.model_fields[k].default)}" for k in ("source", "task")
                 if k in cls.model_fields]
        yield Section(f"`base.data` with `{', '.join(kinds)}`", own_doc(cls),
                      model_rows(cls, "base.data.", skip=("source", "task")))


def option_text(option: Option) -> str:
    kind = f"{option.family} spec" if option.family else type_text(option.annotation)
    default = "required" if option.default is REQUIRED else yaml_inline(option.default)
    return f"`{option.name}`: {kind} = {default}" if default != "required" else f"`{option.name}`: {kind} (required)"


def component_section(family: str, where: str) -> Section:
    rows = [f"| `{c.name}` | {cell(c.description)} | {cell('; '.join(map(option_text, c.options.values()))) or '–'} |"
            for c in built_in(family)]
    protocol = " ".join(inspect.getdoc(PROTOCOLS[family]).split("\n\n")[0].split())
    intro = (f"{where}: a name, or a mapping with `name` and options. {protocol}\n\n"
             "| name | description | options |\n|---|---|---|\n" + "\n".join(rows))
    return Section(f"Components: `{family}`", intro)


def render() -> str:
    """docs/specs.md: every key of a spec with its type, default and description."""
    out = [("<!-- Generated by `python -m bench.spec_reference --write` from the models that validate a spec; "
            "do not edit. -->"), "",
           "# Spec reference", "",
           ("Every key a spec may hold, generated from the pydantic models that validate it (`bench.spec.Spec`, "
            "and per run `ModelConfig`, the data configs and `TrainConfig` in `bench.config`) and from the "
            "options of the built-in components (`python -m models` lists them with whether each runs here). "
            "A key written with dots (`model.attention: gqa`) is the same as the nested form. A variant's, "
            "`sweep:`'s and `tune:`'s keys are keys of `base` (`train.lr`, `model.attention`); `budget:` takes "
            "keys of `base.train`; `--set` takes any key (`--set base.train.steps=200`); `extends: other.yaml` "
            "inherits another spec, whose keys this one overrides. How the keys are used: "
            "[verdicts and statistics](verdicts.md)."), ""]
    spec, *nested = model_sections(Spec, "", "The spec", "The top level of a spec file (`ablations/*.yaml`).")
    base = [s for s in nested if s.title == "`base`"]  # base's sections come first, the rest after them
    sections = [spec, *base,
                *model_sections(ModelConfig, "base.model.", "`base.model`"),
                *(component_section(f, f"`base.model.{f}`") for f in COMPONENT_FIELDS),
                component_section("attention_backend", "An attention's `backend` option"),
                Section("`base.data`", "One of the sources below, chosen by `source` (and, for tasks, by `task`). "
                        "Each table lists the keys besides `source` and `task`."),
                *data_sections(),
                *model_sections(TrainConfig, "base.train.", "`base.train`"),
                component_section("optimizer", "`base.train.optimizer`"),
                *(s for s in nested if s not in base)]
    out += [section.render() for section in sections]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spec_reference", description=__doc__.splitlines()[0])
    parser.add_argument("keys", nargs="*", help="dotted keys to look up instead (base.train.lr, train.lr)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {OUTPUT.relative_to(OUTPUT.parents[1])}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the file differs from what is generated")
    args = parser.parse_args(argv)
    if args.keys:
        status = 0
        for key in args.keys:
            try:
                lookup(key)
                print(f"{key}: a key")
            except UnknownKey as e:
                print(f"{key}: {e}")
                status = 1
        return status
    text = render()
    if args.write:
        OUTPUT.parent.mkdir(exist_ok=True)
        OUTPUT.write_text(text)
    elif args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: python -m bench.spec_reference --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
