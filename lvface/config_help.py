"""`lvface config show`: the resolved config as YAML, each key under its help text.

    lvface config show                                        # the defaults
    lvface config show --config configs/demo.yaml loss.stages.1.prototype_weight=0.3

The help text of a key is the docstring written under its field in lvface/config.py (one home: the
field's documentation is what this prints), read from the source with `ast`. The output is valid YAML:
saved to a file it is a config that `--config` reads back to the same values.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Any

import yaml

from lvface.config import Config, load_config

WIDTH = 100


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """{field name: the docstring under it, on one line} for a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class statement's body
    helps = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            helps[statement.target.id] = " ".join(following.value.value.split())
    return helps


def _scalar(value: Any) -> str:
    """A value as one line of YAML (flow style for lists)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).splitlines()[0]


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, WIDTH - len(indent) - 2)] if text else []


def _render(obj: Any, indent: str, comments: bool) -> list[str]:
    """The lines of dataclass `obj`'s fields at `indent`, each under its help."""
    helps = field_help(type(obj))
    hints = typing.get_type_hints(type(obj))
    lines = []
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        lines += _comment(helps.get(item.name, ""), indent) if comments else []
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{item.name}:"] + _render(value, indent + "  ", comments)
        elif typing.get_origin(hints[item.name]) is list and value and dataclasses.is_dataclass(value[0]):
            lines.append(f"{indent}{item.name}:")
            for index, element in enumerate(value):  # list items: help once, on the first item
                inner = _render(element, indent + "    ", comments and index == 0)
                first = next(i for i, line in enumerate(inner) if not line.lstrip().startswith("#"))
                inner[first] = f"{indent}  - {inner[first].lstrip()}"
                lines += [f"{indent}  # [{index}]"] + inner if comments else inner
        else:
            lines.append(f"{indent}{item.name}: {_scalar(value)}")
    return lines


def format_config(cfg: Config, comments: bool = True) -> str:
    """`cfg` as YAML, every key under its help text (`comments`)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines += [f"{section.name}:"] + _render(getattr(cfg, section.name), "  ", comments) + [""]
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(format_config(cfg, comments=not args.no_help), end="")
    return 0


def register(subparsers) -> None:
    """`lvface config show`."""
    config = subparsers.add_parser("config", help="print the resolved config with each key's help text")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show", help="the resolved config (defaults < --config file < overrides) as YAML, each key under its help",
        description="Print the config `lvface train` would run with, as YAML, each key under its help text. "
                    "Overrides come last: lvface config show --config F section.key=value ... "
                    "(list items by index: loss.stages.1.prototype_weight=0.3).")
    show.add_argument("--config", default=None, help="lvface YAML config (defaults apply where it is silent)")
    show.add_argument("--no-help", action="store_true", help="values only, no help comments")
    show.add_argument("overrides", nargs=argparse.REMAINDER, help="section.key=value overrides, as for lvface train")
    show.set_defaults(func=_show)
