"""The ``intermail`` command: built-in verbs, --data everywhere, the verb table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import intermail
from intermail import config
from intermail.admin import cli

ROOT = str(Path(__file__).resolve().parents[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "intermail", *args], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
    )


def test_version_subprocess():
    proc = run_cli("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"intermail {intermail.__version__}\n"
    assert proc.stderr == ""


@pytest.mark.skipif(shutil.which("intermail") is None, reason="console script not installed (pip install -e .)")
def test_version_console_script():
    proc = subprocess.run(["intermail", "version", "--data", "/nonexistent"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("intermail ")


def test_data_defaults(monkeypatch):
    monkeypatch.delenv("INTERMAIL_DATA", raising=False)
    assert cli.parse_args(["version"])[1].data == "./intermail-data"
    monkeypatch.setenv("INTERMAIL_DATA", "/srv/cluster")
    assert cli.parse_args(["version"])[1].data == "/srv/cluster"
    assert cli.parse_args(["config", "defaults"])[1].data == "/srv/cluster"
    # An empty variable is as good as unset.
    monkeypatch.setenv("INTERMAIL_DATA", "")
    assert cli.parse_args(["version"])[1].data == "./intermail-data"


def test_data_option_after_the_verb_wins(monkeypatch):
    monkeypatch.setenv("INTERMAIL_DATA", "/from/env")
    assert cli.parse_args(["version", "--data", "/x"])[1].data == "/x"
    assert cli.parse_args(["config", "defaults", "--data", "/y"])[1].data == "/y"
    assert cli.parse_args(["config", "--data", "/z", "defaults"])[1].data == "/z"


def test_data_before_the_verb_is_not_accepted():
    with pytest.raises(SystemExit):
        cli.parse_args(["--data", "/x", "version"])


def test_config_defaults_lists_every_key():
    proc = run_cli("config", "defaults")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    rows = config.describe()
    assert len(out) == len(rows)
    for line, (key, _, doc) in zip(out, rows):
        assert line.startswith(key + " ") and line.endswith("# " + doc)
    assert any(line.startswith("storage.segment_bytes ") and "= 67108864 " in line for line in out)
    assert any(line.startswith("storage.fsync ") and "= true " in line for line in out)
    assert any(line.startswith("instance[].name ") and "(required)" in line for line in out)


def test_config_defaults_json(capsys):
    assert cli.main(["config", "defaults", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["key"] for row in rows] == [key for key, _, _ in config.describe()]
    by_key = {row["key"]: row for row in rows}
    assert by_key["limits.message_size"]["default"] == 32 * 1024 * 1024
    assert by_key["instance[].store_dirs"]["default"] == []


def test_config_check(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('[cluster]\nzone = "x.test"\n[[instance]]\nname = "mta1"\nkind = "mta"\n')
    assert cli.main(["config", "check", str(good)]) == 0
    assert "ok (1 instances, zone x.test)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nrecipient = 5\n")
    assert cli.main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "limits.recipient" in err


def test_no_verb_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: intermail" in capsys.readouterr().err


# -- the verb table ---------------------------------------------------------------------


@pytest.fixture
def fake_modules(monkeypatch):
    def install(name: str, **attrs) -> types.ModuleType:
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    return install


def test_register_style_module(fake_modules, capsys):
    def register(subparsers):
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("who")
        parser.set_defaults(run=lambda args: print(f"hello {args.who} in {args.data}") or 7)

    fake_modules("fake_verbs.hello", register=register)
    _, args = cli.parse_args(["hello", "you", "--data", "/d"], verb_modules=["fake_verbs.hello"])
    assert (args.who, args.data) == ("you", "/d")
    assert args.run(args) == 7
    assert capsys.readouterr().out == "hello you in /d\n"


def test_add_parser_and_run_style_module_with_sub_verbs(fake_modules, monkeypatch):
    """The shape intermail.admin.bench uses: `intermail bench storage --data DIR`."""
    calls = []

    def add_parser(subparsers):
        bench = subparsers.add_parser("bench", help="benchmarks")
        what = bench.add_subparsers(dest="what", required=True)
        storage = what.add_parser("storage")
        storage.add_argument("--json", action="store_true")

    def run(args):
        calls.append((args.what, args.json, args.data))
        return 0

    fake_modules("fake_verbs.bench", add_parser=add_parser, run=run)
    monkeypatch.setattr(cli, "VERB_MODULES", ("fake_verbs.bench",))
    monkeypatch.setenv("INTERMAIL_DATA", "/env")
    assert cli.main(["bench", "storage", "--json", "--data", "/d"]) == 0
    assert cli.main(["bench", "storage"]) == 0
    assert cli.main(["bench", "--data", "/outer", "storage"]) == 0
    assert calls == [("storage", True, "/d"), ("storage", False, "/env"), ("storage", False, "/outer")]


def test_missing_verb_module_is_simply_absent(capsys):
    parser = cli.build_parser(verb_modules=["intermail.admin.no_such_verb_module"])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        parser.parse_args(["no_such_verb_module"])
    # The built-ins are unaffected.
    assert parser.parse_args(["version"]).verb == "version"


def test_broken_verb_module_warns_and_is_skipped(fake_modules, capsys, tmp_path, monkeypatch):
    pkg = tmp_path / "brokenverbs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "oops.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = cli.build_parser(verb_modules=["brokenverbs.oops"])
    err = capsys.readouterr().err
    assert "brokenverbs.oops" in err and "a_dependency_that_is_not_installed" in err
    assert parser.parse_args(["version"]).verb == "version"


def test_bench_is_in_the_table():
    assert "intermail.admin.bench" in cli.VERB_MODULES
