"""intermail.config: defaults, a full topology file, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from intermail import config
from intermail.config import Config, ConfigError, InstanceConfig, StorageConfig

MiB = 1024 * 1024

FULL = """\
[cluster]
zone = "mail.example"
data_dir = "/var/lib/intermail"

[storage]
segment_bytes = 16777216
mirrors = 3
group_commit_max_records = 256
group_commit_max_bytes = 1048576
checkpoint_interval_bytes = 134217728
fsync = false

[log]
level = "DEBUG"
format = "text"

[limits]
message_size = 10485760
line_length = 2000
recipients = 50
connections_per_ip = 5
command_timeout = 60
idle_timeout = 600.5
auth_failures_before_delay = 1

[runner]
loop = "asyncio"
drain_timeout = 2.5

[[instance]]
name = "mta1"
kind = "mta"
address = "127.0.1.1"
ports = { smtp = 2525, submission = 0 }
store_dirs = ["/d1/queue", "/d2/queue"]

[[instance]]
name = "mss1"
kind = "mss"
address = "127.0.4.1"
role = "active"
identity = "mss1"
ports = { lmtp = 2400, rpc = 2401 }
store_dirs = ["/shared/mss1"]
"""


def write(tmp_path, text: str):
    path = tmp_path / "topology.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_no_file_gives_all_defaults():
    cfg = config.load(None)
    assert cfg == Config()
    assert cfg.source is None
    assert cfg.cluster.zone == "intermail.test"
    assert cfg.storage.segment_bytes == 64 * MiB
    assert cfg.storage.mirrors == 2
    assert cfg.storage.group_commit_max_records == 4096
    assert cfg.storage.group_commit_max_bytes == 8 * MiB
    assert cfg.storage.checkpoint_interval_bytes == 256 * MiB
    assert cfg.storage.fsync is True
    assert (cfg.log.level, cfg.log.format) == ("INFO", "json")
    assert cfg.limits.message_size == 32 * MiB
    assert cfg.limits.line_length == 1000
    assert cfg.limits.recipients == 1000
    assert cfg.limits.connections_per_ip == 20
    assert cfg.limits.command_timeout == 300
    assert cfg.limits.idle_timeout == 1800
    assert cfg.limits.auth_failures_before_delay == 3
    assert cfg.instances == ()


def test_empty_file_is_all_defaults(tmp_path):
    assert config.load(write(tmp_path, "")) == Config()


def test_full_file(tmp_path):
    path = write(tmp_path, FULL)
    cfg = config.load(path)
    assert cfg.source == str(path)
    assert cfg.cluster == config.ClusterConfig(zone="mail.example", data_dir="/var/lib/intermail")
    assert cfg.storage == StorageConfig(
        segment_bytes=16 * MiB, mirrors=3, group_commit_max_records=256,
        group_commit_max_bytes=MiB, checkpoint_interval_bytes=128 * MiB, fsync=False,
    )
    assert (cfg.log.level, cfg.log.format, cfg.log.level_number) == ("DEBUG", "text", 10)
    assert cfg.limits.command_timeout == 60.0 and isinstance(cfg.limits.command_timeout, float)
    assert cfg.limits.idle_timeout == 600.5
    assert cfg.limits.recipients == 50
    assert (cfg.runner.loop, cfg.runner.drain_timeout) == ("asyncio", 2.5)
    mta, mss = cfg.instances
    assert mta.name == "mta1" and mta.kind == "mta" and mta.address == "127.0.1.1"
    assert dict(mta.ports) == {"smtp": 2525, "submission": 0}
    assert mta.store_dirs == ("/d1/queue", "/d2/queue")
    assert mta.role == "" and mta.identity == ""
    assert (mss.role, mss.identity) == ("active", "mss1")
    assert cfg.instance("mss1") is mss
    with pytest.raises(KeyError):
        cfg.instance("nope")


def test_config_is_immutable(tmp_path):
    cfg = config.load(write(tmp_path, FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.storage.mirrors = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.instances[0].ports["smtp"] = 1  # type: ignore[index]
    assert isinstance(cfg.instances[0].store_dirs, tuple)


def test_with_data_dir_overrides_only_that():
    cfg = Config()
    moved = cfg.with_data_dir("/srv/im")
    assert moved.cluster.data_dir == "/srv/im"
    assert moved.storage == cfg.storage and cfg.cluster.data_dir == ""


@pytest.mark.parametrize(
    "text, key",
    [
        ("[storage]\nsegmnt_bytes = 1\n", "storage.segmnt_bytes"),
        ("[clusterr]\nzone = 'x'\n", "clusterr"),
        ("zone = 'x'\n", "zone"),
        ("[[instance]]\nname = 'a'\nkind = 'mta'\nport = 25\n", "instance[a].port"),
        ("[[instance]]\nname = 'a'\nkind = 'mta'\nports = { smtpp = 25 }\n", "instance[a].ports.smtpp"),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert "unknown" in message


@pytest.mark.parametrize(
    "text, key, expect",
    [
        ("[storage]\nsegment_bytes = '64M'\n", "storage.segment_bytes", "must be an integer"),
        ("[storage]\nmirrors = true\n", "storage.mirrors", "must be an integer"),
        ("[storage]\nmirrors = 2.0\n", "storage.mirrors", "must be an integer"),
        ("[storage]\nfsync = 1\n", "storage.fsync", "must be a boolean"),
        ("[limits]\ncommand_timeout = 'long'\n", "limits.command_timeout", "must be a number"),
        ("[cluster]\nzone = 5\n", "cluster.zone", "must be a string"),
        ("storage = 5\n", "storage", "must be a table"),
        ("instance = 5\n", "instance", "array of tables"),
        ("[[instance]]\nname = 'a'\nkind = 'mta'\nstore_dirs = 'x'\n", "instance[a].store_dirs", "array of strings"),
        ("[[instance]]\nname = 'a'\nkind = 'mta'\nstore_dirs = ['x', 1]\n", "instance[a].store_dirs[1]", "must be a string"),
        ("[[instance]]\nname = 'a'\nkind = 'mta'\nports = { smtp = '25' }\n", "instance[a].ports.smtp", "must be an integer"),
    ],
)
def test_wrong_type_is_a_clear_error(tmp_path, text, key, expect):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expect in message


@pytest.mark.parametrize(
    "text, key, expect",
    [
        ("[storage]\nmirrors = 0\n", "storage.mirrors", "at least 1"),
        ("[log]\nlevel = 'LOUD'\n", "log.level", "must be one of"),
        ("[runner]\nloop = 'trio'\n", "runner.loop", "must be one of"),
        ("[[instance]]\nkind = 'mta'\n", "instance[0].name", "is required"),
        ("[[instance]]\nname = 'x'\n", "instance[x].kind", "is required"),
        ("[[instance]]\nname = 'x'\nkind = 'mailer'\n", "instance[x].kind", "must be one of"),
        ("[[instance]]\nname = 'x'\nkind = 'mta'\nrole = 'boss'\n", "instance[x].role", "must be one of"),
        ("[[instance]]\nname = 'x'\nkind = 'mta'\nports = { smtp = 70000 }\n", "instance[x].ports.smtp", "0..65535"),
        ("[[instance]]\nname = 'x'\nkind = 'mta'\nidentity = 'mss1'\n", "instance[x].identity", "only an mss"),
        ("[[instance]]\nname = 'x'\nkind = 'mta'\n[[instance]]\nname = 'x'\nkind = 'dns'\n",
         "instance[x].name", "duplicate"),
    ],
)
def test_bad_values_are_rejected(tmp_path, text, key, expect):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert expect in str(info.value)


def test_checks_also_apply_when_built_in_code():
    with pytest.raises(ConfigError, match="storage.mirrors"):
        StorageConfig(mirrors=0)
    with pytest.raises(ConfigError, match="must be an integer"):
        StorageConfig(segment_bytes="big")  # type: ignore[arg-type]
    inst = InstanceConfig(name="a", kind="mta", ports={"smtp": 25}, store_dirs=["q"])
    assert dict(inst.ports) == {"smtp": 25} and inst.store_dirs == ("q",)


def test_bad_toml_and_missing_file(tmp_path):
    path = write(tmp_path, "[storage\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        config.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_config_error_is_in_the_taxonomy():
    from intermail.errors import ErrorKind, MailError

    err = ConfigError("x: y")
    assert isinstance(err, MailError) and err.kind is ErrorKind.INVALID


def _schema_keys() -> set[str]:
    keys = set()
    for section, cls in config.SECTIONS.items():
        keys |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    keys |= {f"instance[].{f.name}" for f in dataclasses.fields(InstanceConfig)}
    return keys


def test_describe_covers_every_field_with_a_doc():
    rows = config.describe()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == _schema_keys()
    for key, _, doc in rows:
        assert doc and "\n" not in doc, key
    # Config's own fields are the sections plus the instance list.
    top = {f.name for f in dataclasses.fields(Config)} - {"source"}
    assert top == set(config.SECTIONS) | {"instances"}


def test_describe_defaults_match_the_dataclasses():
    cfg = Config()
    for key, default, _ in config.describe():
        section, _, name = key.partition(".")
        if section in config.SECTIONS:
            assert getattr(getattr(cfg, section), name) == default, key
    rows = dict((key, default) for key, default, _ in config.describe())
    assert rows["instance[].name"] is None  # required: no default
    assert rows["storage.segment_bytes"] == 64 * MiB
