"""The real node's pure parts: containerd, CNI, kubelet and kube-proxy configs, cleanup plans, hand-written images."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tomllib
from pathlib import Path

import pytest

from tests.testbed.cluster_dns import corefile, dns_query
from tests.testbed.controlplane import certificate_subject, kubeconfig_document
from tests.testbed.hostnet import HostAddress
from tests.testbed.node import (
    cni_config,
    containerd_config,
    footprint_left,
    gpu_capacity_patch,
    kube_iptables_cleanup,
    kube_proxy_config,
    kubelet_config,
    lock_holder_pid,
    mounts_under,
    pause_image_name,
    registry_hosts_toml,
    shim_socket,
    toml_text,
)
from tests.testbed.registry import REGISTRY_NAME, ImageFile, registry_config, write_oci_layout

pytestmark = pytest.mark.unit


def test_toml_text_round_trips_nested_tables_through_tomllib() -> None:
    document = {
        "version": 2,
        "root": "/var/lib/x",
        "plugins": {
            "io.containerd.grpc.v1.cri": {
                "flag": True,
                "off": False,
                "list": ["a", 'quote"d'],
                "nested": {"deeper": {"value": 1}},
            },
            "empty": {},
        },
    }
    assert tomllib.loads(toml_text(document)) == document


def test_containerd_config_has_the_settings_runc_needs_in_this_vm() -> None:
    config = tomllib.loads(
        toml_text(
            containerd_config(
                Path("/cache/containerd"), Path("/run/n/state"), Path("/run/n/c.sock"),
                Path("/run/n/cni"), Path("/run/n/certs.d"), "registry.kubetune.test/pause:1",
            )
        )
    )  # fmt: skip
    assert (config["version"], config["root"], config["state"]) == (2, "/cache/containerd", "/run/n/state")
    assert config["grpc"]["address"] == "/run/n/c.sock"
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["enable_unprivileged_ports"] is False
    assert cri["enable_unprivileged_icmp"] is False
    assert cri["netns_mounts_under_state_dir"] is True
    assert cri["sandbox_image"] == "registry.kubetune.test/pause:1"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cri["cni"]["conf_dir"] == "/run/n/cni"
    assert cri["registry"]["config_path"] == "/run/n/certs.d"


def test_registry_hosts_send_pulls_to_the_local_registry_over_http() -> None:
    hosts = tomllib.loads(toml_text(registry_hosts_toml("127.0.0.1:5000")))
    assert hosts == {
        "server": "http://127.0.0.1:5000",
        "host": {"http://127.0.0.1:5000": {"capabilities": ["pull", "resolve"]}},
    }


def test_cni_config_is_a_bridge_gateway_without_nat_and_per_run_ipam() -> None:
    config = cni_config("kubetune-pods", "10.200.0.0/22", Path("/run/n/ipam"))
    [bridge] = config["plugins"]
    assert (bridge["type"], bridge["bridge"], bridge["isGateway"], bridge["ipMasq"]) == (
        "bridge", "kubetune-pods", True, False,
    )  # fmt: skip
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.200.0.0/22"}]]
    assert bridge["ipam"]["dataDir"] == "/run/n/ipam"
    assert len(bridge["bridge"]) <= 15  # Linux interface names


def test_kubelet_config_uses_cgroupfs_allows_cgroup_v1_and_trusts_the_client_ca() -> None:
    config = kubelet_config("10.201.0.1", 10250, 10248, Path("/run/n/c.sock"), Path("/pki/ca.crt"), Path("/logs"))
    assert (config["cgroupDriver"], config["failCgroupV1"], config["failSwapOn"]) == ("cgroupfs", False, False)
    assert config["containerRuntimeEndpoint"] == "unix:///run/n/c.sock"
    assert config["authentication"]["x509"]["clientCAFile"] == "/pki/ca.crt"
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert (config["address"], config["port"], config["readOnlyPort"]) == ("10.201.0.1", 10250, 0)
    assert config["imageGCHighThresholdPercent"] == 100  # the persistent image store is never collected


def test_pods_resolve_cluster_names_at_the_cluster_dns_and_nothing_else() -> None:
    paths = (Path("/run/n/c.sock"), Path("/pki/ca.crt"), Path("/logs"))
    without = kubelet_config("10.201.0.1", 10250, 10248, *paths)
    with_dns = kubelet_config("10.201.0.1", 10250, 10248, *paths, cluster_dns="10.201.0.1")

    assert "clusterDNS" not in without and without["resolvConf"] == ""
    assert (with_dns["clusterDNS"], with_dns["clusterDomain"]) == (["10.201.0.1"], "cluster.local")
    assert with_dns["resolvConf"] == "", "no upstream: the machine's resolver is not reachable from pods"


def test_coredns_answers_cluster_local_from_the_api_on_the_host_address_only() -> None:
    text = corefile("10.201.0.1", "/cp/admin.kubeconfig")

    assert text.startswith("cluster.local:53 {")
    assert "    bind 10.201.0.1\n" in text
    assert "    kubernetes cluster.local {\n        kubeconfig /cp/admin.kubeconfig\n" in text


def test_a_dns_query_names_the_record_label_by_label() -> None:
    query = dns_query("a-trainer-node-0-0.a-trainer.team.svc.cluster.local", query_id=7)

    assert query[:12] == bytes([0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])  # id 7, recursion desired, one question
    assert query[12:31] == b"\x12a-trainer-node-0-0"
    assert query.endswith(b"\x05local\x00\x00\x01\x00\x01")  # the root label, type A, class IN


def test_kube_proxy_config_is_iptables_mode_for_the_pod_cidr() -> None:
    config = kube_proxy_config("node-0", "/k.kubeconfig", "10.200.0.0/22", "10.201.0.1", 1234, 5678)
    assert (config["mode"], config["clusterCIDR"], config["hostnameOverride"]) == (
        "iptables", "10.200.0.0/22", "node-0",
    )  # fmt: skip
    assert config["clientConnection"]["kubeconfig"] == "/k.kubeconfig"
    assert config["healthzBindAddress"] == "127.0.0.1:1234"
    assert config["metricsBindAddress"] == "127.0.0.1:5678"
    assert config["conntrack"]["maxPerCore"] == 0  # machine-wide conntrack tables are left alone


def test_gpu_capacity_patch_escapes_the_resource_name() -> None:
    assert gpu_capacity_patch(8) == [
        {"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "8"},
        {"op": "add", "path": "/status/allocatable/nvidia.com~1gpu", "value": "8"},
    ]


def test_iptables_cleanup_unhooks_then_flushes_then_deletes_only_kube_chains() -> None:
    rules = "\n".join(
        [
            "-P INPUT ACCEPT",
            "-N KUBE-FIREWALL",
            "-N KUBE-SERVICES",
            "-N CNI-FORWARD",
            '-A INPUT -m comment --comment "kubernetes firewall" -j KUBE-FIREWALL',
            "-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES",
            "-A FORWARD -j CNI-FORWARD",
            "-A KUBE-SERVICES -j KUBE-FIREWALL",
        ]
    )
    assert kube_iptables_cleanup(rules) == [
        ["-D", "INPUT", "-m", "comment", "--comment", "kubernetes firewall", "-j", "KUBE-FIREWALL"],
        ["-D", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES"],
        ["-F", "KUBE-FIREWALL"],
        ["-F", "KUBE-SERVICES"],
        ["-X", "KUBE-FIREWALL"],
        ["-X", "KUBE-SERVICES"],
    ]
    assert kube_iptables_cleanup("") == []


def test_mounts_under_a_directory_deepest_first_with_escaped_spaces() -> None:
    mountinfo = "\n".join(
        [
            "22 1 8:1 / / rw - ext4 /dev/vda rw",
            "30 22 0:5 / /run/n/state/netns/cni-1 rw - nsfs nsfs rw",
            "31 22 0:6 / /run/n/state/sandboxes/a/shm rw - tmpfs shm rw",
            "32 22 0:7 / /run/n rw - tmpfs tmpfs rw",
            "33 22 0:8 / /run/n\\040x/y rw - tmpfs tmpfs rw",
            "34 22 0:9 / /run/nx rw - tmpfs tmpfs rw",
        ]
    )
    points = mounts_under(mountinfo, Path("/run/n"))
    assert set(points) == {"/run/n/state/netns/cni-1", "/run/n/state/sandboxes/a/shm", "/run/n"}
    assert points[-1] == "/run/n"
    assert mounts_under(mountinfo, Path("/run/n x")) == ["/run/n x/y"]


def test_pause_image_name_follows_the_binary() -> None:
    first, second = pause_image_name(b"one"), pause_image_name(b"two")
    assert first.startswith(f"{REGISTRY_NAME}/kubetune-testbed/pause:") and first != second


@pytest.mark.parametrize(
    ("shown", "expected"),
    [
        (
            None,
            [
                ["ip", "link", "add", "kubetune0", "type", "bridge"],
                ["ip", "addr", "add", "10.201.0.1/32", "dev", "kubetune0"],
                ["ip", "link", "set", "kubetune0", "up"],
            ],
        ),
        ("", [["ip", "addr", "add", "10.201.0.1/32", "dev", "kubetune0"], ["ip", "link", "set", "kubetune0", "up"]]),
        ("5: kubetune0    inet 10.201.0.1/32 scope global kubetune0\\", [["ip", "link", "set", "kubetune0", "up"]]),
    ],
)
def test_host_address_setup_is_idempotent(shown: str | None, expected: list[list[str]]) -> None:
    assert HostAddress().setup_commands(shown) == expected


def test_certificate_subject_carries_user_and_groups() -> None:
    assert certificate_subject("system:node:n0", ("system:nodes",)) == "/O=system:nodes/CN=system:node:n0"
    assert certificate_subject("system:kube-proxy") == "/CN=system:kube-proxy"


def test_kubeconfig_with_a_client_certificate_has_no_token() -> None:
    document = kubeconfig_document(
        "https://h:1", None, Path("/ca"), "u", client_certificate=(Path("/c.crt"), Path("/c.key"))
    )
    assert document["users"] == [{"name": "u", "user": {"client-certificate": "/c.crt", "client-key": "/c.key"}}]
    assert kubeconfig_document("https://h:1", "t", Path("/ca"))["users"][0]["user"] == {"token": "t"}


def test_registry_config_serves_plain_http_from_the_storage_dir() -> None:
    config = registry_config(Path("/cache/registry"), "127.0.0.1", 5000)
    assert config["storage"]["filesystem"]["rootdirectory"] == "/cache/registry"
    assert config["http"]["addr"] == "127.0.0.1:5000"


def test_oci_layout_is_reproducible_and_consistent(tmp_path: Path) -> None:
    files = [ImageFile("bin/probe", b"\x7fELF...")]
    first = write_oci_layout(tmp_path / "a", "v1", files, ["/bin/probe"], {"writable": 0o1777}, user="1000")
    second = write_oci_layout(tmp_path / "b", "v1", files, ["/bin/probe"], {"writable": 0o1777}, user="1000")
    assert first == second

    def blob(digest: str) -> bytes:
        data = (tmp_path / "a" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        return data

    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    assert config["config"]["Entrypoint"] == ["/bin/probe"] and config["config"]["User"] == "1000"
    layer = gzip.decompress(blob(manifest["layers"][0]["digest"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert members["writable"].isdir() and members["writable"].mode == 0o1777
    assert members["bin"].isdir() and members["bin/probe"].mode == 0o755


def test_shim_socket_is_containerds_hash_of_address_namespace_and_sandbox() -> None:
    # Observed on a running node: the shim of sandbox 5c16... listened on /run/containerd/s/6c70...
    sandbox = "5c161e022304dd42ba4374a6eb2910cc229d4ca4f8e857a597e2825a9d81a081"
    assert shim_socket(Path("/run/kubetune-node/containerd.sock"), "k8s.io", sandbox) == Path(
        "/run/containerd/s/6c7000739148d66273d3e13506fa4420b8644c04d610c812fca722a3775c1702"
    )


def test_a_node_may_clean_up_what_an_earlier_one_left_but_must_leave_nothing_of_its_own() -> None:
    before = {"shim sockets": ["old"], "pod bridge": True, "sysctls": {"vm/overcommit_memory": "0\n"}}
    cleaner = {"shim sockets": [], "pod bridge": False, "sysctls": {"vm/overcommit_memory": "0\n"}}
    dirtier = {"shim sockets": ["old", "new"], "pod bridge": True, "sysctls": {"vm/overcommit_memory": "1\n"}}

    assert footprint_left(before, cleaner) == {}
    assert footprint_left(before, dirtier) == {"shim sockets": ["new"], "sysctls": {"vm/overcommit_memory": "1\n"}}
    assert footprint_left({"pod bridge": False}, {"pod bridge": True}) == {"pod bridge": True}
    # Of the settings, only those whose value changed are named.
    two = {"sysctls": {"kernel/panic": "0\n", "vm/overcommit_memory": "0\n"}}
    assert footprint_left(two, {"sysctls": {"kernel/panic": "10\n", "vm/overcommit_memory": "0\n"}}) == {
        "sysctls": {"kernel/panic": "10\n"}
    }


def test_the_lock_file_names_the_pid_that_started_the_node() -> None:
    assert lock_holder_pid("pid 4242, node dir /var/lib/kubetune-testbed/node\n") == 4242
    assert lock_holder_pid("") is None
