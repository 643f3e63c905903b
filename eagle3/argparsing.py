"""One command-line style for run_collect.py, run_train.py and run_eval.py (and their console scripts).

Each tool declares its options as a dataclass and parses it with ``Eagle3ArgumentParser``, an
``HfArgumentParser`` that adds what users of the Hugging Face example scripts expect, plus:

* ``TOOL options.yaml [--flag value ...]``: a YAML/JSON file of options, by field name or by any
  of the field's flags (``lr: 1e-4`` and ``learning_rate: 1e-4`` are one option), overridden by
  the flags that follow it. Unknown keys are refused, never dropped.
* every mistake exits 2 with ``TOOL: error: <flag>: <what is wrong and what to do>`` before any
  work starts: unknown/mistyped flags (with the closest real flag), bad values (the dataclass's
  ``__post_init__`` raises ``ValueError``), unknown config keys. No usage dump, no traceback.
* ``--help`` groups options in sections (a field's ``metadata["section"]``), each with its help
  and default; a dataclass sets ``_default_section`` and may order sections with ``_sections``.
* no abbreviations: a shortened flag is a typo waiting to match the wrong option.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_type_hints

from transformers import HfArgumentParser

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
EXIT_USAGE = 2


def prog_name(default: str) -> str:
    """The name the user typed (``eagle3-train`` or ``run_train.py``); ``default`` when run in-process."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith(("eagle3", "run_")) else default


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action, argparse._StoreFalseAction):  # --no-x: its "default" would only confuse
            return action.help
        return super()._get_help_string(action)


class Eagle3ArgumentParser(HfArgumentParser):
    def __init__(self, dataclass_type: type, prog: str, description: str | None = None) -> None:
        self._sections: dict[str, Any] = {}
        super().__init__(
            dataclass_type,
            prog=prog_name(prog),
            description=description,
            allow_abbrev=False,
            formatter_class=_HelpFormatter,
        )

    # --- building ---
    def _add_dataclass_arguments(self, dtype: type) -> None:
        type_hints = get_type_hints(dtype)
        for title in getattr(dtype, "_sections", ()):
            self._section(title)
        default_section = getattr(dtype, "_default_section", "options")
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            # HfArgumentParser passes metadata to add_argument: take our own key out of a copy.
            plain = copy.copy(field)
            section = field.metadata.get("section") or section_of(dtype, field) or default_section
            plain.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k != "section"})
            plain.type = type_hints[field.name]
            self._parse_dataclass_field(self._section(section), plain)
            last = self._actions[-1]
            if isinstance(last, argparse._StoreFalseAction) and last.dest == field.name:
                last.help = f"Turn --{field.name.replace('_', '-')} off."

    def _section(self, title: str):
        if title not in self._sections:
            self._sections[title] = self.add_argument_group(title)
        return self._sections[title]

    # --- errors: one line naming the flag, exit 2 ---
    def error(self, message: str):  # argparse's hook for every usage error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")

    def _long_options(self) -> list[str]:
        return [opt for action in self._actions for opt in action.option_strings if opt.startswith("--")]

    def _unknown(self, names: Sequence[str], what: str) -> None:
        flags = [name for name in names if name.startswith("-")]
        hints = []
        for name in flags or names:  # the values after a mistyped flag are noise
            close = difflib.get_close_matches(name.split("=")[0], self._long_options(), n=1, cutoff=0.6)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        self.error(f"unrecognized {what}: {', '.join(hints)}")

    # --- config file ---
    def _option_table(self) -> dict[str, Any]:
        """Every accepted spelling of an option (field name, flags without dashes) -> its action."""
        table = {}
        for action in self._actions:
            if action.dest == "help":
                continue
            for opt in action.option_strings:
                if opt.startswith("--"):
                    table.setdefault(opt[2:], action)
                    table.setdefault(opt[2:].replace("-", "_"), action)
        return table

    def _file_defaults(self, path: Path) -> dict[str, Any]:
        import yaml

        try:
            text = path.read_text(encoding="utf-8-sig")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as error:
            self.error(f"config file {path}: cannot read it: {error}")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error(f"config file {path}: expected a mapping of option: value, got {type(data).__name__}")
        table = self._option_table()
        values: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            action = table.get(str(key).lstrip("-")) or table.get(str(key).lstrip("-").replace("-", "_"))
            if action is None:
                unknown.append(str(key))
                continue
            if action.const is False and action.nargs == 0:  # a --no_x key: the opposite of x
                value = not value
            elif action.nargs in ("+", "*") and not isinstance(value, list):
                value = [value]
            elif isinstance(value, list) and action.nargs not in ("+", "*"):
                value = ",".join(str(v) for v in value)  # e.g. layers: [0, 13, 27]
            if action.dest in values and values[action.dest] != value:
                self.error(f"config file {path}: {key} is given twice (under two of its names)")
            values[action.dest] = value
        if unknown:
            self._unknown(unknown, f"keys in config file {path}")
        return values

    # --- parsing ---
    def parse(self, argv: Sequence[str] | None = None):
        """``[CONFIG_FILE] [flags]`` -> the dataclass instance; any mistake exits 2 with a message."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
            path = Path(argv.pop(0))
            if not path.is_file():
                self.error(f"config file {path} does not exist")
            values = self._file_defaults(path)
            for action in self._actions:
                if action.dest in values:
                    action.required = False
            self.set_defaults(**values)
        namespace, remaining = self.parse_known_args(argv)
        if remaining:
            self._unknown(remaining, "arguments")
        (dtype,) = self.dataclass_types
        try:
            return dtype(**vars(namespace))
        except ValueError as error:  # a value check in __post_init__ (ours or transformers')
            self.error(str(error))


def section_of(dtype: type, field: dataclasses.Field) -> str | None:
    """Hook for dataclasses that derive sections from where a field is declared (see run_train)."""
    hook = getattr(dtype, "_section_of", None)
    return hook(field) if hook else None


def parse_dataclass(dtype: type, argv: Sequence[str] | None, prog: str, description: str | None = None):
    return Eagle3ArgumentParser(dtype, prog=prog, description=description).parse(argv)


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
