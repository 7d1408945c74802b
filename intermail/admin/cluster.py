"""The cluster found in a data directory: its Config and where its instances listen.

Owns: the layout every admin verb relies on -- ``<data>/cluster.toml`` (the
topology the cluster runs with, written by ``intermail up`` or by an
operator), ``<data>/run/<name>.ready`` (ports each running instance bound)
and ``<data>/<name>/`` (each instance's state) -- and reading it.

Invariants: the Config's ``cluster.data_dir`` is the directory it was found
in, whatever the file says, so every path derived from it points there.

Logs: nothing.
"""

from __future__ import annotations

from pathlib import Path

from intermail import config as config_module
from intermail.config import Config, ConfigError
from intermail.net.runner import read_ready_file

CLUSTER_FILE = "cluster.toml"


def load_cluster(data_dir: str | Path) -> Config:
    """The Config of the cluster in ``data_dir`` (ConfigError when there is none)."""
    path = Path(data_dir) / CLUSTER_FILE
    if not path.is_file():
        raise ConfigError(f"no cluster in {data_dir}: {CLUSTER_FILE} not found (start one with `intermail up`)")
    return config_module.load(path).with_data_dir(str(Path(data_dir)))


def listener(config: Config, name: str, port_name: str) -> tuple[str, int] | None:
    """Where instance ``name`` listens for ``port_name``: the Config's fixed port, else its ready file."""
    inst = config.instance(name)
    port = inst.ports.get(port_name, 0)
    if port:
        return inst.address, port
    try:
        return read_ready_file(config.ready_file(name)).get(port_name)
    except (OSError, ValueError, KeyError):
        return None
