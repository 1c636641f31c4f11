"""The test bed's host address: a private IP on an interface of its own, reachable from pods, never routed elsewhere."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

HOST_INTERFACE = "kubetune0"
HOST_ADDRESS = "10.201.0.1"  # the API server and S3 listen here, the kubelet too; pods reach it via their gateway
POD_CIDR = "10.200.0.0/22"  # the real node's pods; apart from kwok's fake pod IPs (10.244.0.0/16) and the services


@dataclass(frozen=True)
class HostAddress:
    """A /32 address on a port-less bridge: local to this machine (the kernel routes it like any address of its own),
    reachable from pod network namespaces through their gateway, and gone with the interface."""

    interface: str = HOST_INTERFACE
    address: str = HOST_ADDRESS

    def setup_commands(self, shown: str | None) -> list[list[str]]:
        """The `ip` commands that bring the address up, given `ip -o addr show dev IFACE`'s output (None: no such
        interface)."""
        commands: list[list[str]] = []
        if shown is None:
            # A bridge rather than a dummy interface: some kernels (this VM's, built without modules) lack `dummy`.
            commands.append(["ip", "link", "add", self.interface, "type", "bridge"])
        if f" {self.address}/32 " not in (shown or ""):
            commands.append(["ip", "addr", "add", f"{self.address}/32", "dev", self.interface])
        commands.append(["ip", "link", "set", self.interface, "up"])
        return commands

    def ensure(self) -> str:
        """Create the interface and its address if missing (idempotent; needs root); returns the address."""
        if os.geteuid() != 0:
            raise PermissionError(f"the test-bed host address {self.address} on {self.interface} needs root")
        shown = subprocess.run(
            ["ip", "-o", "addr", "show", "dev", self.interface], capture_output=True, text=True, check=False
        )
        for command in self.setup_commands(shown.stdout if shown.returncode == 0 else None):
            subprocess.run(command, check=True, capture_output=True, text=True)
        return self.address


def ensure_host_address() -> str:
    """The default host address, brought up if needed."""
    return HostAddress().ensure()
