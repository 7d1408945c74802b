"""The network-namespace deployment: one namespace per host on a bridge, real address take-over (root only).

Owns turning a topology into hosts: a bridge in the root namespace, and for
each ``[[instance]]`` a namespace (its "host") joined to the bridge by a veth
pair, with the instance's address on its ``eth0``; the processes run there
(``ip netns exec``).  The root namespace gets the bridge address (``.254``
of the subnet), so the CLI and clients on this machine reach every host.

Addresses: every instance address must be in one /24 that is not loopback
(127.0.0.0/8 is local to every namespace), e.g. 10.77.0.0/24.  A store
identity's address (the address of its ``active`` instance) is a floating
address: it is on the host of the instance that owns the identity now
(``run/owners.json``), and nowhere else.  Each store host also has a host
address of its own (``.200 + k`` for the k-th store instance) where a spare
serves its control RPC, so a former owner that comes back as the spare has
an address while the identity's is on its peer.

Take-over (in the spare, :mod:`intermail.apps.mss`): ``ip addr add`` of the
identity address on its ``eth0`` and a gratuitous ARP, so the other hosts'
caches point at it at once; the power switch (the monitor,
:class:`NetnsPowerSwitch`) kills every process of the old owner's host and
removes the identity address from it first.

Invariants: nothing is created outside the names derived from the data
directory (``im<hash>-<instance>`` namespaces, ``im<hash>br`` bridge,
``im<hash>v<k>`` veth ends), so two clusters on one machine never touch
each other's; :func:`teardown` removes all of it.

Logs: nothing (prints go through the CLI).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import signal
import subprocess
from pathlib import Path

from intermail.config import Config, ConfigError

__all__ = ["Netns", "NetnsPowerSwitch", "is_netns", "mark_netns", "raise_address", "HOST_ADDRESS_ENV", "TAKEOVER_IFACE_ENV"]

DEPLOYMENT_FILE = "deployment"
HOST_ADDRESS_ENV = "INTERMAIL_HOST_ADDRESS"  # a store host's own address (its control RPC as a spare)
TAKEOVER_IFACE_ENV = "INTERMAIL_TAKEOVER_IFACE"  # where a spare adds the identity address: "eth0/24"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def is_netns(config: Config) -> bool:
    with contextlib.suppress(OSError):
        return (Path(config.cluster.data_dir) / "run" / DEPLOYMENT_FILE).read_text().strip() == "netns"
    return False


def mark_netns(config: Config) -> None:
    path = Path(config.cluster.data_dir) / "run" / DEPLOYMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("netns\n")


class Netns:
    """The hosts of one cluster (see the module docstring)."""

    def __init__(self, config: Config):
        self.config = config
        tag = hashlib.sha1(str(Path(config.cluster.data_dir).absolute()).encode()).hexdigest()[:4]
        self.prefix = f"im{tag}"
        addresses = [ipaddress.ip_address(i.address) for i in config.instances]
        if not addresses:
            raise ConfigError("no instances")
        self.net = ipaddress.ip_network(f"{addresses[0]}/24", strict=False)
        for inst in config.instances:
            address = ipaddress.ip_address(inst.address)
            if address not in self.net or address.is_loopback:
                raise ConfigError(f"instance[{inst.name}].address: the netns deployment needs every address in"
                                  f" one non-loopback /24 (like {self.net}), got {inst.address}")
        self.gateway = str(self.net.network_address + 254)
        self.bridge = f"{self.prefix}br"
        self.stores = [i.name for i in config.instances_of("mss")]

    # -- names -----------------------------------------------------------------------

    def namespace(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _veth(self, name: str) -> str:
        return f"{self.prefix}v{[i.name for i in self.config.instances].index(name)}"

    def host_address(self, name: str) -> str | None:
        """A store host's own address (None for other kinds)."""
        if name not in self.stores:
            return None
        return str(self.net.network_address + 200 + self.stores.index(name))

    def addresses(self, name: str) -> set[str]:
        """The addresses ``name``'s host should have now (also the compose deployment's containers)."""
        return self._wanted(name)

    def _wanted(self, name: str) -> set[str]:
        """The addresses ``name``'s host should have now: a store identity's only on its owner's."""
        from intermail.monitor import owners as ownership

        inst = self.config.instance(name)
        if inst.kind != "mss":
            return {inst.address}
        identity = inst.identity or inst.name
        owner = next(i for i in self.config.instances_of("mss")
                     if (i.identity or i.name) == identity and i.role in ("active", ""))
        wanted = {self.host_address(name) or inst.address}
        if inst.address != owner.address:
            wanted.add(inst.address)  # a spare's own address
        if ownership.owner_of(self.config, identity) == name:
            wanted.add(owner.address)
        return wanted

    # -- set up and tear down ------------------------------------------------------------

    def setup(self) -> None:
        """Bridge and every host (idempotent)."""
        if _run("ip", "link", "show", self.bridge, check=False).returncode != 0:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for inst in self.config.instances:
            self.setup_host(inst.name)

    def setup_host(self, name: str) -> None:
        ns = self.namespace(name)
        if _run("ip", "netns", "list", check=False).stdout.split().count(ns) == 0:
            _run("ip", "netns", "add", ns)
            veth = self._veth(name)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", self.gateway, check=False)
        self.reconcile(name)

    def reconcile(self, name: str) -> None:
        """Put on the host exactly the addresses it should have now (a store identity's only on its owner)."""
        ns = self.namespace(name)
        wanted = self._wanted(name)
        inst = self.config.instance(name)
        floating = {i.address for i in self.config.instances_of("mss") if i.role in ("active", "")}
        present = set(_run("ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0").stdout.split())
        for address in wanted:
            if f"{address}/24" not in present:
                _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        if inst.kind == "mss":
            for address in floating - wanted:
                if f"{address}/24" in present:
                    _run("ip", "-n", ns, "addr", "del", f"{address}/24", "dev", "eth0", check=False)

    def teardown(self) -> None:
        for inst in self.config.instances:
            ns = self.namespace(inst.name)
            self.kill_host(inst.name)
            _run("ip", "netns", "del", ns, check=False)
            _run("ip", "link", "del", self._veth(inst.name), check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    # -- processes -----------------------------------------------------------------------

    def command(self, name: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command line that runs ``argv`` on ``name``'s host, and the environment to add."""
        env = {}
        host = self.host_address(name)
        if host is not None:
            env[HOST_ADDRESS_ENV] = host
            env[TAKEOVER_IFACE_ENV] = "eth0/24"
        return ["ip", "netns", "exec", self.namespace(name), *argv], env

    def kill_host(self, name: str) -> None:
        """The power switch: SIGKILL every process of the host."""
        pids = _run("ip", "netns", "pids", self.namespace(name), check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


class NetnsPowerSwitch:
    """The monitor's power switch in the netns deployment: the old owner's host loses power and its address."""

    def __init__(self, config: Config):
        self.netns = Netns(config)

    async def fence(self, name: str) -> bool:
        import asyncio

        def cut() -> bool:
            self.netns.kill_host(name)
            inst = self.netns.config.instance(name)
            identity = inst.identity or inst.name
            floating = next(i.address for i in self.netns.config.instances_of("mss")
                            if (i.identity or i.name) == identity and i.role in ("active", ""))
            # the identity's address goes with the owner: off this host before the spare raises it,
            # or this host would go on answering ARP for it
            _run("ip", "-n", self.netns.namespace(name), "addr", "del", f"{floating}/24", "dev", "eth0",
                 check=False)
            return True
        return await asyncio.to_thread(cut)


def raise_address(address: str, spec: str) -> None:
    """In a spare taking an identity over: put ``address`` on the interface ``spec`` (``eth0/24``) and announce it.

    The gratuitous ARP (an ARP request for the address from the address
    itself, broadcast twice) makes every host on the bridge update its cache
    at once instead of sending to the dead owner's MAC until it expires.
    """
    import socket
    import struct

    iface, _, prefix = spec.partition("/")
    done = _run("ip", "addr", "add", f"{address}/{prefix or '24'}", "dev", iface, check=False)
    if done.returncode != 0 and "exists" not in done.stderr:
        raise RuntimeError(f"ip addr add {address}: {done.stderr.strip()}")
    mac = bytes.fromhex(Path(f"/sys/class/net/{iface}/address").read_text().strip().replace(":", ""))
    ip = socket.inet_aton(address)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\x00" * 6, ip)
    frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        for _ in range(2):
            sock.send(frame)
