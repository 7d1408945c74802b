"""The compose deployment (``compose/``), checked without a Docker engine.

- ``compose/compose.yaml`` is valid against the Compose Specification JSON
  schema (``tests/data/compose-spec.json``, vendored from the
  ``docker-compose`` 1.29.2 wheel on PyPI, ``compose/config/compose_spec.json``,
  Apache-2.0), and is exactly what ``intermail compose`` generates from
  ``compose/topology.toml`` (so the two cannot drift);
- ``compose/topology.toml`` is the topology the netns tests run
  (``tests/test_netns.py``: the embedded one with 127.0.n.k moved to
  ``NET.(10n+k)``), DNS on port 53 being the one difference;
- every instance is a service whose command line and environment are those
  ``intermail up --netns`` spawns for it (``up._spawn`` is run with the
  process start captured), on the address the netns deployment gives its
  host, resolving through dnsd, with a ``/health`` check on its metrics port;
- the stores share one volume at one path and have NET_ADMIN; the ``load``
  profile runs ``intermail load mixed --verify``;
- the containers' entrypoint passes ``--init`` on an instance's first start
  only (run here on loopback, as a process).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from intermail import config as config_module
from intermail.admin import compose, up
from intermail.admin.up import EMBEDDED_TOPOLOGY
from intermail.monitor import netns

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"


@pytest.fixture(scope="module")
def config():
    return config_module.load(COMPOSE_DIR / "topology.toml")


@pytest.fixture(scope="module")
def document():
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def test_compose_file_is_valid_against_the_compose_specification(document):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    # "$schema" says draft 2019-09 (by its old http://...# address, which jsonschema does not know)
    assert "2019-09" in schema["$schema"]
    validator_class = jsonschema.Draft201909Validator
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])
    # and the schema does reject a broken file (it is not vacuous)
    broken = json.loads(json.dumps(document))
    broken["services"]["dns1"]["networks"]["intermail"]["ipv4_addres"] = "10.77.0.11"
    broken["services"]["mta1"]["healthcheck"]["retry"] = 3
    assert len(list(validator_class(schema).iter_errors(broken))) >= 2


def test_compose_files_are_generated_from_the_topology(config, document):
    assert (COMPOSE_DIR / "topology.toml").read_text() == compose.compose_topology(), \
        "regenerate: intermail compose --topology > compose/topology.toml"
    assert (COMPOSE_DIR / "compose.yaml").read_text() == compose.compose_file(config), \
        "regenerate: intermail compose --config compose/topology.toml > compose/compose.yaml"
    assert document == compose.compose_document(config)  # our YAML emitter says what the dict says


def test_topology_is_the_netns_tests_topology(config):
    # tests/test_netns.py: 127.0.n.k -> NET.(10n+k) on the embedded topology
    embedded = tomllib.loads(EMBEDDED_TOPOLOGY)
    ours = tomllib.loads((COMPOSE_DIR / "topology.toml").read_text())
    assert ours["cluster"] == embedded["cluster"]
    assert [i["name"] for i in ours["instance"]] == [i["name"] for i in embedded["instance"]]
    for mine, theirs in zip(ours["instance"], embedded["instance"]):
        n, k = map(int, re.fullmatch(r"127\.0\.(\d+)\.(\d+)", theirs["address"]).groups())
        assert mine["address"] == f"{compose.NETWORK}.{10 * n + k}", mine
        expected_ports = dict(theirs["ports"], **({"dns": 53} if "dns" in theirs["ports"] else {}))
        assert mine["ports"] == expected_ports, mine["name"]
        assert {k: v for k, v in mine.items() if k not in ("address", "ports")} == \
               {k: v for k, v in theirs.items() if k not in ("address", "ports")}
    hosts = netns.Netns(config)  # the netns deployment accepts it: one non-loopback /24
    assert str(hosts.net) == f"{compose.NETWORK}.0/24"


def _netns_spawns(config, tmp_path, monkeypatch) -> dict[str, tuple[list[str], dict[str, str]]]:
    """What ``intermail up --netns`` would run for each instance: up._spawn with the process start captured."""
    data = str(tmp_path / "data")
    cfg = config.with_data_dir(data)
    spawned: dict[str, tuple[list[str], dict[str, str]]] = {}

    class Captured:
        pid = 4242

        def __init__(self, argv, **kwargs):
            name = argv[argv.index("--instance") + 1]
            added = {k: v for k, v in kwargs["env"].items() if os.environ.get(k) != v}
            spawned[name] = (list(argv), added)

    monkeypatch.setattr(up.subprocess, "Popen", Captured)
    monkeypatch.setattr(up.netns, "is_netns", lambda c: True)
    monkeypatch.setattr(netns.Netns, "setup_host", lambda self, name: None)
    for name in up._ordered(cfg):
        up._spawn(cfg, name, init=False)
    return {name: _as_container(argv, env, cfg, data) for name, (argv, env) in spawned.items()}


def _as_container(argv, env, cfg, data):
    """The netns argv on a container: no ``ip netns exec NS``, ``python`` for sys.executable, its paths."""
    assert argv[:3] == ["ip", "netns", "exec"], argv
    argv = argv[4:]
    assert argv[0] == sys.executable
    mapping = {str(Path(data) / "cluster.toml"): compose.CONFIG_PATH, data: compose.DATA_PATH}
    return ["python", *[mapping.get(a, a) for a in argv[1:]]], env


def test_every_instance_is_a_service_running_what_netns_runs(config, document, tmp_path, monkeypatch):
    spawns = _netns_spawns(config, tmp_path, monkeypatch)
    services = document["services"]
    assert set(services) == {i.name for i in config.instances} | {"load"}
    # started in `intermail up`'s order, each after the one before is healthy
    order = up._ordered(config)
    for before, after in zip(order, order[1:]):
        assert services[after]["depends_on"] == {before: {"condition": "service_healthy"}}
    hosts = netns.Netns(config)
    dns = next(iter(config.instances_of("dns")))
    for inst in config.instances:
        service = services[inst.name]
        argv, env = spawns[inst.name]
        assert service["command"] == argv, inst.name
        assert service.get("environment", {}) == env, inst.name
        address = hosts.host_address(inst.name) or inst.address
        assert service["networks"] == {"intermail": {"ipv4_address": address}}
        assert service["dns"] == [dns.address] and service["dns_search"] == [config.cluster.zone]
        assert service["configs"] == [{"source": "topology", "target": compose.CONFIG_PATH}]
        health = service["healthcheck"]["test"]
        assert health[:3] == ["CMD", "python", "-c"] and "urllib.request" in health[3]
        assert health[4] == f"http://{address}:{inst.ports['metrics']}/health"
        assert service["image"] == services["dns1"]["image"]
    assert services["dns1"]["sysctls"] == {"net.ipv4.ip_unprivileged_port_start": 0}
    network = document["networks"]["intermail"]
    assert network["ipam"]["config"] == [{"subnet": str(hosts.net), "gateway": hosts.gateway}]
    assert document["configs"]["topology"]["file"] == "./topology.toml"
    assert (COMPOSE_DIR / document["configs"]["topology"]["file"]).is_file()


def test_stores_share_a_volume_and_can_take_the_address_over(config, document):
    services = document["services"]
    stores = [i for i in config.instances_of("mss")]
    assert {i.role for i in stores} == {"active", "spare"} and len({i.identity for i in stores}) == 1
    volumes = {tuple(services[i.name]["volumes"]) for i in stores}
    assert volumes == {(f"{compose.VOLUME}:{compose.DATA_PATH}",)}
    assert compose.VOLUME in document["volumes"]
    from intermail.apps.mss import store_options

    cfg = config.with_data_dir(compose.DATA_PATH)
    assert len({store_options(cfg, i.name).mirrors for i in stores}) == 1  # one store directory, shared
    for inst in stores:
        assert services[inst.name]["cap_add"] == ["NET_ADMIN"]
        assert services[inst.name]["user"] == "root"
        assert services[inst.name]["environment"][netns.TAKEOVER_IFACE_ENV] == "eth0/24"
    for inst in config.instances:
        if inst.kind not in ("mss", "monitor"):
            assert "user" not in services[inst.name] and "cap_add" not in services[inst.name], inst.name
    # the owner's container raises the identity address at start, the spare's does not (netns rule)
    hosts = netns.Netns(cfg)
    active = next(i for i in stores if i.role == "active")
    spare = next(i for i in stores if i.role == "spare")
    assert active.address in hosts.addresses(active.name)
    assert active.address not in hosts.addresses(spare.name)


def test_clients_ports_are_published_and_the_load_profile_exists(config, document):
    services = document["services"]
    published = {p for s in services.values() for p in s.get("ports", [])}
    for kind, port in (("mta", "smtp"), ("mta", "submission"), ("access", "imap"), ("access", "pop3")):
        for inst in config.instances_of(kind):
            assert any(p.endswith(f":{inst.ports[port]}") for p in services[inst.name]["ports"]), (inst.name, port)
    assert len(published) == sum(len(s.get("ports", [])) for s in services.values())  # no host port twice
    load = services["load"]
    assert load["profiles"] == ["load"]
    assert load["command"][:4] == ["intermail", "load", "mixed", "--verify"]
    assert load["command"][load["command"].index("--data") + 1] == compose.DATA_PATH
    assert load["volumes"] == [f"{compose.VOLUME}:{compose.DATA_PATH}"]
    address = load["networks"]["intermail"]["ipv4_address"]
    assert address not in {compose.container_address(config, i.name) for i in config.instances}
    for inst in config.instances:  # every other service runs without a profile
        assert "profiles" not in services[inst.name]


def test_dockerfile(document):
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^USER intermail$", text, re.M)
    assert "HEALTHCHECK" in text and "iproute2" in text
    assert 'ENTRYPOINT ["intermail", "compose-entrypoint", "--"]' in text
    assert document["services"]["dns1"]["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}


def test_the_cli_prints_the_same_files():
    done = subprocess.run([sys.executable, "-m", "intermail", "compose", "--config", str(COMPOSE_DIR / "topology.toml")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (COMPOSE_DIR / "compose.yaml").read_text()
    done = subprocess.run([sys.executable, "-m", "intermail", "compose", "--config", "/nonexistent.toml"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_entrypoint_passes_init_on_the_first_start_only(tmp_path):
    net = f"127.0.{200 + os.getpid() % 50}"
    topology = tmp_path / "cluster.toml"
    topology.write_text(EMBEDDED_TOPOLOGY.replace('"127.0.1.1"', f'"{net}.1"'))
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "intermail", "compose-entrypoint", "--", sys.executable, "-m", "services.dnsd",
            "--config", str(topology), "--instance", "dns1", "--data", str(data)]
    marker = data / "run" / "dns1.initialised"

    def cmdlines(pid: int) -> list[list[str]]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc.name == str(pid) or
                                            (proc / "stat").read_text().split()[3] == str(pid)):
                    found.append((proc / "cmdline").read_bytes().decode().split("\0")[:-1])
            except OSError:
                continue
        return found

    for first in (True, False):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            ready = config_module.load(topology).with_data_dir(str(data)).ready_file("dns1")
            assert _wait(lambda: ready.exists() and (marker.exists() or not first)), "dns1 did not start"
            services = [c for c in cmdlines(proc.pid) if c[1:3] == ["-m", "services.dnsd"]]
            assert services, cmdlines(proc.pid)
            assert ("--init" in services[0]) is first, services
            assert (data / "cluster.toml").read_bytes() == topology.read_bytes()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        assert marker.exists()
        ready.unlink(missing_ok=True)
