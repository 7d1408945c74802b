"""The ``intermail`` command: argparse subcommands dispatched from one table.

Owns: the top-level parser, the table of verb modules (:data:`VERB_MODULES`),
the ``--data`` option every verb takes, and the built-in verbs ``version``
and ``config``.

Adding a verb: write ``intermail/admin/<verb>.py`` exposing either

- ``register(subparsers)``, which adds its parser(s) with
  ``subparsers.add_parser(...)`` and sets ``parser.set_defaults(run=fn)``
  where ``fn(args) -> int`` is the exit status; or
- ``add_parser(subparsers)`` and ``run(args) -> int`` (the runner is bound to
  whatever parsers ``add_parser`` added);

then add the module's name to :data:`VERB_MODULES`.  Nothing else changes.

Invariants:

- Every verb, and every sub-verb under it, accepts ``--data DIR`` after the
  verb; ``args.data`` is always set: the option, else ``$INTERMAIL_DATA``,
  else ``./intermail-data``.
- A verb module that is not there (not written yet, or left out of a
  trimmed install) is simply not listed; one that is there but fails to
  import is not listed either, and a warning saying why goes to stderr, so
  one broken verb never takes the whole command down.
- Exit status: the verb's return value; 2 for usage and configuration
  errors; 130 on Ctrl-C.

Logs: nothing (a CLI talks to its user on stdout/stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import intermail
from intermail import config as config_module

# The verb table: one module per verb (or family of verbs), in help order.
# Each is imported when the parser is built; see the module docstring.
VERB_MODULES: tuple[str, ...] = (
    "intermail.admin.backup",
    "intermail.admin.bench",
    "intermail.admin.compose",
    "intermail.admin.directory",
    "intermail.admin.load",
    "intermail.admin.queue",
    "intermail.admin.up",
)

DATA_ENV = "INTERMAIL_DATA"
DEFAULT_DATA_DIR = "./intermail-data"


def default_data_dir(environ: Mapping[str, str] | None = None) -> str:
    """``$INTERMAIL_DATA`` if set and non-empty, else ``./intermail-data``."""
    env = os.environ if environ is None else environ
    return env.get(DATA_ENV) or DEFAULT_DATA_DIR


# -- built-in verbs -----------------------------------------------------------------------


def _run_version(args: argparse.Namespace) -> int:
    print(f"intermail {intermail.__version__}")
    return 0


def _register_version(subparsers: Any) -> None:
    parser = subparsers.add_parser("version", help="print the intermail version")
    parser.set_defaults(run=_run_version)


def _toml_value(value: Any) -> str:
    """A default as it would be written in the topology file."""
    if value is None:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _run_config_defaults(args: argparse.Namespace) -> int:
    rows = config_module.describe()
    if args.json:
        out = [{"key": key, "default": list(d) if isinstance(d, tuple) else d, "doc": doc}
               for key, d, doc in rows]
        print(json.dumps(out, indent=2))
        return 0
    shown = [(key, _toml_value(default), doc) for key, default, doc in rows]
    key_width = max(len(key) for key, _, _ in shown)
    value_width = max(len(value) for _, value, _ in shown)
    for key, value, doc in shown:
        print(f"{key:<{key_width}} = {value:<{value_width}}  # {doc}")
    return 0


def _run_config_check(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.file)  # ConfigError -> exit 2 in main()
    print(f"{args.file}: ok ({len(cfg.instances)} instances, zone {cfg.cluster.zone})")
    return 0


def _register_config(subparsers: Any) -> None:
    parser = subparsers.add_parser("config", help="inspect configuration keys and topology files")
    verbs = parser.add_subparsers(dest="config_verb", metavar="{defaults,check}", required=True)
    defaults = verbs.add_parser("defaults", help="print every configuration key with its default and doc")
    defaults.add_argument("--json", action="store_true", help="print a JSON list of {key, default, doc}")
    defaults.set_defaults(run=_run_config_defaults)
    check = verbs.add_parser("check", help="load a topology file and report the first problem")
    check.add_argument("file", help="topology TOML file")
    check.set_defaults(run=_run_config_check)


BUILTIN_VERBS = (_register_version, _register_config)


# -- the verb table ---------------------------------------------------------------------


def _import_verb_module(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None  # not written yet / not installed: the verb is just absent
        print(f"intermail: verb module {name} not loaded: {exc}", file=sys.stderr)
        return None
    except Exception as exc:  # a broken verb must not break every other verb
        print(f"intermail: verb module {name} not loaded: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _register_module(module: Any, subparsers: argparse._SubParsersAction) -> None:
    if hasattr(module, "register"):
        module.register(subparsers)
    elif hasattr(module, "add_parser") and hasattr(module, "run"):
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        for verb in set(subparsers.choices) - before:
            subparsers.choices[verb].set_defaults(run=module.run)
    else:
        print(f"intermail: verb module {module.__name__} has neither register() nor add_parser()/run()",
              file=sys.stderr)


def _add_data_option(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-verb parser under it a ``--data`` option.

    SUPPRESS as the default keeps an inner parser from overwriting a value
    given at an outer level (``intermail bench --data X storage``); main()
    fills in the environment default afterwards.
    """
    if "--data" not in parser._option_string_actions:
        parser.add_argument(
            "--data", metavar="DIR", default=argparse.SUPPRESS,
            help=f"cluster data directory (default: ${DATA_ENV} or {DEFAULT_DATA_DIR})",
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_data_option(sub)


def build_parser(verb_modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; ``verb_modules`` defaults to :data:`VERB_MODULES` (read at call time)."""
    if verb_modules is None:
        verb_modules = VERB_MODULES
    parser = argparse.ArgumentParser(
        prog="intermail",
        description="intermail: a highly available mail platform.",
    )
    parser.add_argument("--version", action="version", version=f"intermail {intermail.__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for register in BUILTIN_VERBS:
        register(subparsers)
    for name in verb_modules:
        module = _import_verb_module(name)
        if module is not None:
            _register_module(module, subparsers)
    for verb_parser in set(subparsers.choices.values()):
        _add_data_option(verb_parser)
    return parser


def parse_args(argv: Sequence[str] | None = None,
               verb_modules: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser(verb_modules)
    args = parser.parse_args(argv)
    if getattr(args, "data", None) is None:
        args.data = default_data_dir()
    return parser, args


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(run(args) or 0)
    except config_module.ConfigError as exc:
        print(f"intermail: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `intermail config defaults | head`: the reader left; not an error.
        # Point stdout at devnull so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
