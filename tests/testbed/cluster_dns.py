"""The cluster's DNS: CoreDNS (built from Go modules) answering for cluster.local from the API server, on the test
bed's host address, where the real node's pods reach it as their nameserver (the kubelet's clusterDNS)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from tests.testbed.controlplane import ControlPlane
from tests.testbed.processes import ManagedProcess, testbed_binary, wait_for

CLUSTER_DOMAIN = "cluster.local"
DNS_PORT = 53


def corefile(address: str, kubeconfig: str) -> str:
    """One server block: cluster.local from the Kubernetes API (Services, and pods by hostname and subdomain, as
    JobSet names them); any other name is refused, since pods here have nowhere else to ask."""
    return (
        f"{CLUSTER_DOMAIN}:{DNS_PORT} {{\n"
        f"    bind {address}\n"
        "    errors\n"
        f"    kubernetes {CLUSTER_DOMAIN} {{\n"
        f"        kubeconfig {kubeconfig}\n"
        "    }\n"
        "}\n"
    )


def dns_query(name: str, query_id: int = 0x6B74) -> bytes:
    """A DNS query for the A record of `name`, recursion desired."""
    header = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.rstrip(".").split("."))
    return header + labels + b"\x00" + struct.pack(">HH", 1, 1)


def answer_count(address: str, name: str, timeout: float = 1.0) -> int | None:
    """How many answers the server at address:53 gives for `name` (None: no reply, or an error code)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(dns_query(name), (address, DNS_PORT))
            reply = sock.recv(512)
        except OSError:
            return None
    if len(reply) < 12 or reply[3] & 0x0F:
        return None
    return int(struct.unpack(">H", reply[6:8])[0])


@dataclass
class ClusterDns:
    """CoreDNS for one control plane, listening on its address (the host address pods reach)."""

    kube: ControlPlane
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return self.kube.address

    def start(self) -> ClusterDns:
        path = Path(self.kube.work_dir) / "Corefile"
        path.write_text(corefile(self.address, self.kube.kubeconfig))
        self.process = ManagedProcess("coredns", [testbed_binary("coredns"), "-conf", str(path)], self.kube.log_dir)
        self.process.start()
        process = self.process
        # The API server's own Service: answered once CoreDNS has synced its informers.
        wait_for(
            lambda: process.alive() and bool(answer_count(self.address, f"kubernetes.default.svc.{CLUSTER_DOMAIN}")),
            60,
            f"CoreDNS on {self.address}:{DNS_PORT} to answer for the kubernetes Service",
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
