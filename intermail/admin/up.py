"""``intermail up|status|down|kill|start``: run a whole cluster as local processes, and drill it.

Owns the embedded deployment: the default topology (:data:`EMBEDDED_TOPOLOGY`:
DNS, directory primary + replica, two MTAs, two access servers, ``mss1`` and
its spare, the monitor, each on its own 127.0.n.k address), writing it (or
the operator's ``--config``) to ``<data>/cluster.toml``, starting every
instance as a ``python -m services.<kind>d`` process with its log in
``<data>/run/<name>.log`` and its pid in ``<data>/run/<name>.pid``, and the
drills::

    intermail up [--config FILE] [--data DIR] [--detach] [--netns]
    intermail status [--json]
    intermail down
    intermail kill NAME        # SIGKILL, as a crash
    intermail start NAME [--store-dir DIR]   # a store: serve a restored store under the identity

Addresses and ports (one scheme, root or not): kind n gets 127.0.n.k for
its k-th instance -- dns 1, directory 2, mta 3, access 4, mss 5, monitor 6
-- and every instance uses the same unprivileged ports on its own address:
smtp 2525, submission 2587, lmtp 2424, imap 2143, pop3 2110, rpc 7000, dns
5353, metrics 9100.

Invariants:

- ``--init`` is passed on the first start of a new cluster only; from then
  on an instance whose state is missing refuses to start (an empty store
  must never stand in for a lost one).
- ``down`` stops the monitor first, so stopping the cluster never looks
  like a failure to act on.
- ``status --json`` is the contract of ARCHITECTURE.md: ``state`` is ``up``
  for a live process that published its ports and that the monitor does
  not hold DOWN, ``starting`` for a live one that has not yet, ``down``
  otherwise.  It also carries ``takeovers`` (the last ones) and ``names``
  (the addresses each service name has in the cluster's DNS now).

Exit status: 0 done; 1 an instance did not start (its log tail is printed);
2 usage or configuration errors.

Logs: nothing (prints).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from intermail import config as config_module
from intermail.admin.cluster import CLUSTER_FILE, load_cluster
from intermail.config import Config
from intermail.monitor import netns
from intermail.monitor import owners as ownership

__all__ = ["EMBEDDED_TOPOLOGY", "register", "instance_status"]

EMBEDDED_TOPOLOGY = """\
# The embedded cluster of `intermail up`: every instance a local process on its own
# 127.0.n.k address, the same unprivileged ports on each.
[cluster]
zone = "intermail.test"

[tls]
auth_without_tls = true   # loopback only: plain logins allowed (set cert_file/key_file for STARTTLS)

[[instance]]
name = "dns1"
kind = "dns"
address = "127.0.1.1"
ports = { dns = 5353, metrics = 9100 }

[[instance]]
name = "dir1"
kind = "directory"
role = "primary"
address = "127.0.2.1"
ports = { rpc = 7000, metrics = 9100 }

[[instance]]
name = "dir2"
kind = "directory"
role = "replica"
address = "127.0.2.2"
ports = { rpc = 7000, metrics = 9100 }

[[instance]]
name = "mss1"
kind = "mss"
identity = "mss1"
role = "active"
address = "127.0.5.1"
ports = { lmtp = 2424, rpc = 7000, metrics = 9100 }

[[instance]]
name = "mss1b"
kind = "mss"
identity = "mss1"
role = "spare"
address = "127.0.5.2"
ports = { rpc = 7000, metrics = 9100 }

[[instance]]
name = "mta1"
kind = "mta"
address = "127.0.3.1"
ports = { smtp = 2525, submission = 2587, rpc = 7000, metrics = 9100 }

[[instance]]
name = "mta2"
kind = "mta"
address = "127.0.3.2"
ports = { smtp = 2525, submission = 2587, rpc = 7000, metrics = 9100 }

[[instance]]
name = "access1"
kind = "access"
address = "127.0.4.1"
ports = { imap = 2143, pop3 = 2110, metrics = 9100 }

[[instance]]
name = "access2"
kind = "access"
address = "127.0.4.2"
ports = { imap = 2143, pop3 = 2110, metrics = 9100 }

[[instance]]
name = "monitor1"
kind = "monitor"
address = "127.0.6.1"
ports = { metrics = 9100 }
"""

START_ORDER = ("dns", "directory", "mss", "mta", "access", "monitor")
INITIALISED = ".initialised"


# -- processes --------------------------------------------------------------------------


def _run_dir(config: Config) -> Path:
    return Path(config.cluster.data_dir) / "run"


def _pid_file(config: Config, name: str) -> Path:
    return _run_dir(config) / f"{name}.pid"


def _pid(config: Config, name: str) -> int | None:
    """The pid of ``name``'s process if it is alive (and still ours)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(_pid_file(config, name).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if name.encode() in cmdline and b"--instance" in cmdline:
            return pid
    return None


def _ready(config: Config, name: str, pid: int) -> dict[str, tuple[str, int]] | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        content = json.loads(config.ready_file(name).read_text())
        if content.get("pid") == pid:
            return {n: (e["host"], int(e["port"])) for n, e in content["listeners"].items()}
    return None


def _spawn(config: Config, name: str, init: bool, extra: list[str] | None = None) -> subprocess.Popen:
    inst = config.instance(name)
    run = _run_dir(config)
    run.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        config.ready_file(name).unlink()
    module = f"services.{'dir' if inst.kind == 'directory' else inst.kind}d"
    argv = [sys.executable, "-m", module, "--config", str(Path(config.cluster.data_dir) / CLUSTER_FILE),
            "--instance", name, "--data", config.cluster.data_dir, *(["--init"] if init else []), *(extra or [])]
    env = dict(os.environ)
    if netns.is_netns(config):
        hosts = netns.Netns(config)
        hosts.setup_host(name)  # its addresses as they should be now (a store identity's only on its owner)
        argv, extra = hosts.command(name, argv)
        env.update(extra)
    with open(run / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env=env)
    _pid_file(config, name).write_text(f"{proc.pid}\n")
    return proc


def _wait_ready(config: Config, name: str, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready(config, name, proc.pid) is not None:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _log_tail(config: Config, name: str, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join((_run_dir(config) / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    return ""


def _ordered(config: Config) -> list[str]:
    rank = {kind: i for i, kind in enumerate(START_ORDER)}
    instances = sorted(config.instances, key=lambda i: (rank.get(i.kind, 99), i.role != "primary",
                                                        i.role == "spare", i.name))
    return [i.name for i in instances]


def start_instance(config: Config, name: str, *, init: bool = False, extra: list[str] | None = None) -> int:
    """Start ``name`` (if not running) and wait for it; 0 or 1 (its log tail printed)."""
    if _pid(config, name) is not None:
        print(f"{name}: already running")
        return 0
    proc = _spawn(config, name, init, extra)
    if not _wait_ready(config, name, proc):
        print(f"{name}: did not start; the end of {_run_dir(config) / (name + '.log')}:\n"
              f"{_log_tail(config, name)}", file=sys.stderr)
        return 1
    return 0


def stop_instances(config: Config, names: list[str], timeout: float = 20.0) -> None:
    pids = {name: pid for name in names if (pid := _pid(config, name)) is not None}
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid(config, n) for n in pids):
        time.sleep(0.05)
    for name in pids:
        pid = _pid(config, name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- status -----------------------------------------------------------------------------


def _role(config: Config, inst: Any) -> str:
    if inst.kind == "mss":
        with contextlib.suppress(KeyError):
            return "active" if ownership.owner_of(config, inst.identity or inst.name) == inst.name else "spare"
    return inst.role


def instance_status(config: Config) -> dict[str, Any]:
    """The ``status --json`` object (ARCHITECTURE.md, operator interface)."""
    monitor: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        monitor = json.loads((_run_dir(config) / "monitor.json").read_text()).get("instances", {})
    out = []
    for inst in config.instances:
        pid = _pid(config, inst.name)
        listeners = _ready(config, inst.name, pid) if pid else None
        if pid is None:
            state = "down"
        elif listeners is None:
            state = "starting"
        else:
            state = "down" if monitor.get(inst.name, {}).get("state") == "down" else "up"
        ports = {p: v for p, v in inst.ports.items() if v}
        for port_name, (_, port) in (listeners or {}).items():
            if port_name in config_module.PORT_NAMES:
                ports.setdefault(port_name, port)
        entry: dict[str, Any] = {"name": inst.name, "kind": inst.kind, "address": inst.address, "ports": ports,
                                 "state": state, "pid": pid, "role": _role(config, inst)}
        if inst.kind == "mss":
            entry["identity"] = inst.identity or inst.name
        out.append(entry)
    dns = next(iter(config.instances_of("dns")), None)
    record = ownership.read(config)
    return {"zone": config.cluster.zone,
            "dns": {"address": dns.address, "port": dns.ports.get("dns", 53)} if dns else None,
            "instances": out, "takeovers": record["takeovers"][-10:],
            "names": _dns_names(config, dns) if dns else {}}


def _dns_names(config: Config, dns_instance: Any) -> dict[str, list[str] | None]:
    """The addresses each service name has in the cluster's DNS now (None: no answer)."""
    import asyncio

    from intermail.dns.update import addresses
    from intermail.errors import MailError

    server = (dns_instance.address, dns_instance.ports.get("dns", 53))
    names = ("mta", "imap", "pop", "dir", *sorted({i.identity or i.name for i in config.instances_of("mss")}))

    async def ask(name: str) -> list[str] | None:
        try:
            return sorted(await addresses(server, config.cluster.zone, name, timeout=1.0))
        except MailError:
            return None

    async def ask_all() -> list[list[str] | None]:
        return list(await asyncio.gather(*(ask(name) for name in names)))
    return dict(zip(names, asyncio.run(ask_all()), strict=True))


def _print_status(status: dict[str, Any]) -> None:
    print(f"zone {status['zone']}" + (f", DNS at {status['dns']['address']}:{status['dns']['port']}"
                                      if status["dns"] else ""))
    for e in status["instances"]:
        ports = " ".join(f"{k}={v}" for k, v in sorted(e["ports"].items()))
        role = e["role"] + (f" of {e['identity']}" if e.get("identity") else "")
        print(f"  {e['name']:<10} {e['kind']:<10} {e['state']:<9} {role:<16} {e['address']:<12} {ports}")
    for name, addresses in status.get("names", {}).items():
        print(f"  {name}.{status['zone']:<20} " + ("(no answer)" if addresses is None else " ".join(addresses) or "-"))
    for t in status["takeovers"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["at"]))
        print(f"  take-over {when}: {t['identity']} from {t['from']} to {t['by']} in {t['seconds']:.2f} s")


# -- verbs ------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> tuple[Config, bool]:
    data = Path(args.data).absolute()
    data.mkdir(parents=True, exist_ok=True)
    target = data / CLUSTER_FILE
    if args.config:
        config_module.load(args.config)  # refuse a bad file before anything changes
        if not target.exists() or Path(args.config).read_bytes() != target.read_bytes():
            shutil.copyfile(args.config, target)
    elif not target.exists():
        target.write_text(EMBEDDED_TOPOLOGY)
    config = load_cluster(data)
    fresh = not (data / "run" / INITIALISED).exists()
    return config, fresh


def _endpoints(config: Config) -> None:
    def first(kind: str, port: str) -> str:
        for inst in config.instances_of(kind):
            if inst.ports.get(port):
                return f"{inst.address}:{inst.ports[port]}"
        return "-"
    print(f"cluster up in {config.cluster.data_dir} (zone {config.cluster.zone})")
    print(f"  SMTP {first('mta', 'smtp')}  submission {first('mta', 'submission')}  "
          f"IMAP {first('access', 'imap')}  POP3 {first('access', 'pop3')}  DNS {first('dns', 'dns')}")
    print("  add a user:  intermail domain add example.org && "
          "intermail user add alice@example.org --password secret")
    print("  see it:      intermail status;  stop it: intermail down (or Ctrl-C)")


def _run_up(args: argparse.Namespace) -> int:
    config, fresh = _prepare(args)
    if args.netns:
        if os.geteuid() != 0:
            print("intermail up --netns: network namespaces need root", file=sys.stderr)
            return 2
        netns.mark_netns(config)
        netns.Netns(config).setup()
    for name in _ordered(config):
        if start_instance(config, name, init=fresh) != 0:
            stop_instances(config, [n for n in reversed(_ordered(config))])
            return 1
    (Path(config.cluster.data_dir) / "run" / INITIALISED).write_text("")
    _endpoints(config)
    if args.detach:
        return 0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    # a second Ctrl-C (or a SIGTERM) must not cut the stop short and leave processes behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("stopping the cluster ...", flush=True)
    _down(config)
    print("cluster stopped", flush=True)
    return 0


def _down(config: Config) -> None:
    order = _ordered(config)
    stop_instances(config, [n for n in order if config.instance(n).kind == "monitor"])
    stop_instances(config, [n for n in reversed(order) if config.instance(n).kind != "monitor"])
    if netns.is_netns(config):
        netns.Netns(config).teardown()
        with contextlib.suppress(FileNotFoundError):
            (Path(config.cluster.data_dir) / "run" / netns.DEPLOYMENT_FILE).unlink()


def _run_down(args: argparse.Namespace) -> int:
    config = load_cluster(args.data)
    _down(config)
    print("cluster stopped")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    status = instance_status(load_cluster(args.data))
    if args.json:
        json.dump(status, sys.stdout)
        print()
    else:
        _print_status(status)
    return 0


def _run_kill(args: argparse.Namespace) -> int:
    config = load_cluster(args.data)
    config.instance(args.name)
    pid = _pid(config, args.name)
    if pid is None:
        print(f"{args.name}: not running")
        return 1
    os.kill(pid, signal.SIGKILL)
    print(f"{args.name}: killed (pid {pid})")
    return 0


def _run_start(args: argparse.Namespace) -> int:
    config = load_cluster(args.data)
    inst = config.instance(args.name)
    extra = []
    for directory in args.store_dir:
        if inst.kind != "mss":
            print(f"--store-dir: {args.name} is not a store", file=sys.stderr)
            return 2
        extra += ["--store-dir", str(Path(directory).absolute())]
    return start_instance(config, args.name, extra=extra)


def register(subparsers: Any) -> None:
    up = subparsers.add_parser("up", help="start a cluster (the embedded default, or --config) as local processes")
    up.add_argument("--config", default=None, help="topology TOML (default: the embedded cluster)")
    up.add_argument("--detach", action="store_true", help="return once every instance is up")
    up.add_argument("--netns", action="store_true",
                    help="one network namespace per instance on a bridge (root; addresses in one non-loopback /24)")
    up.set_defaults(run=_run_up)
    status = subparsers.add_parser("status", help="every instance: state, role, addresses and ports")
    status.add_argument("--json", action="store_true", help="one JSON object (the operator contract)")
    status.set_defaults(run=_run_status)
    down = subparsers.add_parser("down", help="stop every instance of the cluster")
    down.set_defaults(run=_run_down)
    kill = subparsers.add_parser("kill", help="SIGKILL one instance (a crash drill)")
    kill.add_argument("name")
    kill.set_defaults(run=_run_kill)
    start = subparsers.add_parser("start", help="start one instance")
    start.add_argument("name")
    start.add_argument("--store-dir", action="append", default=[],
                       help="a store serves this directory (a restored store) instead of its configured one;"
                            " until its next start without the option")
    start.set_defaults(run=_run_start)
