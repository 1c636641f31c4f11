"""`make demo`: the whole product on this machine — test bed, Helm install, the AG News qLoRA job, its evaluation."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.cluster import NodeParts, pod_discovery, product_values, start_node_parts
from tests.testbed.controlplane import ControlPlane
from tests.testbed.hostnet import ensure_host_address
from tests.testbed.node import RealNode
from tests.testbed.processes import REPO_ROOT, cache_dir, testbed_binary, wait_for
from tests.testbed.prometheus import PrometheusServer
from tests.testbed.s3 import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from tests.testbed.shared_data import shared_sample
from tests.testbed.smollm2 import convert_smollm2

JOB_NAMESPACE = "demo"
OPERATOR_NAMESPACE = "kubetune-system"
EXAMPLE = REPO_ROOT / "examples" / "agnews-qlora.yaml"
BUCKETS = ("kubetune-data", "kubetune-models", "kubetune-artifacts")
TERMINAL = {"Succeeded", "Failed", "Cancelled"}


def state_dir() -> Path:
    return cache_dir() / "demo"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def shared_data_dir() -> Path:
    """The folder holding the shared AG News sample (SharedDataMissingError, naming the fix, when it is not there)."""
    return shared_sample("ag_news").parent.parent


def upload_inputs(s3: S3Server, model_dir: Path, data_dir: Path) -> None:
    """The job's inputs, where examples/agnews-qlora.yaml expects them."""
    client = s3.client()
    for bucket in BUCKETS:
        client.create_bucket(Bucket=bucket)
    for name in ("train.jsonl", "test.jsonl"):
        client.upload_file(str(data_dir / "ag_news" / name), "kubetune-data", f"ag_news/{name}")
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            client.upload_file(str(path), "kubetune-models", f"smollm2-135m-instruct/{path.name}")


def create_s3_secret(plane: ControlPlane, namespace: str) -> None:
    """The `kubetune-s3` Secret the chart values name, holding moto's credentials."""
    plane.kubectl(
        "create", "secret", "generic", "kubetune-s3", "-n", namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY_ID}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_ACCESS_KEY}",
        check=True,
    )  # fmt: skip


def wait_for_operator_pod(plane: ControlPlane, namespace: str) -> None:
    def operator_running() -> bool:
        pods = json.loads(plane.kubectl("get", "pods", "-n", namespace, "-o", "json", check=True).stdout)
        return any(pod["status"].get("phase") == "Running" for pod in pods["items"])

    wait_for(operator_running, 180, "the chart's operator pod to run on the real node")


@dataclass
class Testbed:
    """What the demo runs on: the control plane, the real node with its registry, S3 and Prometheus."""

    plane: ControlPlane
    parts: NodeParts
    s3: S3Server
    prometheus: PrometheusServer


def start_testbed(work: Path) -> Testbed:
    """Every part started, or none left running: a half-started test bed would hold the machine's node."""
    plane = ControlPlane(work_dir=work / "control-plane", address=ensure_host_address())
    started: list[Any] = [plane]
    try:
        plane.start()
        plane.start_controllers(node_lifecycle=True)
        parts = start_node_parts(plane)
        started.append(parts)
        s3 = S3Server(log_dir=work / "s3", host=plane.address)
        started.append(s3.start())
        prometheus = PrometheusServer(work_dir=work / "prometheus", jobs={}, pods=pod_discovery(plane))
        started.append(prometheus.start())
    except BaseException:
        for part in reversed(started):
            part.stop()
        raise
    return Testbed(plane, parts, s3, prometheus)


def install_chart(bed: Testbed, work: Path) -> None:
    values = work / "values.yaml"
    values.write_text(yaml.safe_dump(product_values(bed.s3, bed.parts.images)))
    for namespace in (OPERATOR_NAMESPACE, JOB_NAMESPACE):
        bed.plane.kubectl("create", "namespace", namespace, check=True)
    create_s3_secret(bed.plane, JOB_NAMESPACE)
    subprocess.run(
        [
            testbed_binary("helm"), "install", "kubetune", str(REPO_ROOT / "charts" / "kubetune"),
            "--namespace", OPERATOR_NAMESPACE, "--kubeconfig", bed.plane.kubeconfig, "-f", str(values), "--wait=false",
        ],
        check=True,
    )  # fmt: skip
    wait_for_operator_pod(bed.plane, OPERATOR_NAMESPACE)


def job_status(plane: ControlPlane, name: str) -> dict[str, Any]:
    result = plane.kubectl("get", "finetunejob", name, "-n", JOB_NAMESPACE, "-o", "json", check=True)
    return dict(json.loads(result.stdout).get("status") or {})


def progress_line(status: dict[str, Any]) -> str:
    progress = status.get("progress") or {}
    parts = [f"phase={status.get('phase', '?')}"]
    if progress.get("stage"):
        parts.append(f"stage={progress['stage']}")
    if progress.get("totalSteps"):
        parts.append(f"step={progress.get('step', 0)}/{progress['totalSteps']} ({progress.get('percent', 0):.0f}%)")
    if progress.get("evalTotal") and progress.get("stage") == "evaluate":
        done, total = progress.get("evalDone", 0), progress["evalTotal"]
        parts.append(f"eval={done}/{total} ({progress.get('evalPercent', 0):.0f}%)")
    for key, label, fmt in (("loss", "loss", "{:.3f}"), ("tokensPerSecond", "tok/s", "{:.0f}")):
        if progress.get(key) is not None:
            parts.append(f"{label}={fmt.format(progress[key])}")
    if progress.get("etaSeconds") is not None:
        parts.append(f"eta={int(progress['etaSeconds']) // 60}m{int(progress['etaSeconds']) % 60:02d}s")
    return "  ".join(parts)


def follow_job(plane: ControlPlane, name: str, timeout: float) -> dict[str, Any]:
    """Print a line whenever the job's phase or progress changes, until it ends."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        status = job_status(plane, name)
        line = progress_line(status)
        if line != last:
            print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if status.get("phase") in TERMINAL:
            return status
        time.sleep(2)
    raise TimeoutError(f"FineTuneJob {name} did not finish within {timeout:.0f}s")


def print_results(s3: S3Server, status: dict[str, Any]) -> None:
    artifacts = status.get("artifacts") or {}
    report = artifacts.get("report")
    if report:
        bucket, key = report.removeprefix("s3://").split("/", 1)
        key = key.rsplit("/", 1)[0] + "/report.md" if key.endswith(".json") else key
        say("Evaluation: did fine-tuning beat prompting?")
        print(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode())
    for condition in status.get("conditions") or []:
        if condition["type"] in ("EvalPassed", "Failed", "Succeeded"):
            print(
                f"  {condition['type']}={condition['status']} ({condition['reason']}): {condition.get('message', '')}"
            )
    if artifacts:
        say("Artifacts")
        for kind, uri in sorted(artifacts.items()):
            print(f"  {kind:12} {uri}")


def print_look_around(plane: ControlPlane, s3: S3Server, prometheus: PrometheusServer, name: str) -> None:
    say("Look around (the test bed keeps running until `make demo-down`)")
    print(f"  export KUBECONFIG={plane.kubeconfig}")
    print(f"  kubectl get ftj -n {JOB_NAMESPACE}; kubectl describe ftj {name} -n {JOB_NAMESPACE}")
    print(f"  kubectl get events -n {JOB_NAMESPACE} --sort-by=.lastTimestamp")
    print(f"  Prometheus: {prometheus.url}/graph?g0.expr=kubetune_job_train_loss")
    print(f"  S3 (moto): {s3.endpoint}  (AWS_ACCESS_KEY_ID={ACCESS_KEY_ID}, any secret)")
    print(f"  logs: {plane.log_dir}  (pods: kubectl logs, or {plane.log_dir / 'pods'})")


def ask_line(address: str, model: str, labels: list[str], text: str) -> str:
    """A curl command asking the served model to classify `text` the way it was tuned to."""
    from kubetune_trainer.data.formats import classification_instruction

    body = {"model": model, "messages": [{"role": "user", "content": classification_instruction(labels, text)}]}
    return (
        f"curl -s http://{address}:8080/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body).replace(chr(39), '')}' | python3 -m json.tool"
    )


def print_endpoint(plane: ControlPlane, s3: S3Server, name: str, timeout: float = 300) -> None:
    """Wait for the tuned model's endpoint (spec.serving) and print a command that asks it a question."""
    serving = job_status(plane, name).get("serving") or {}
    if not serving.get("url"):
        say(f"No endpoint: {serving.get('message') or 'the job asks for none'}")
        return
    say(f"Serving the tuned model at {serving['url']} (llama.cpp on the GGUF export)")
    try:
        wait_for(lambda: (job_status(plane, name).get("serving") or {}).get("readyReplicas", 0) >= 1, timeout, "it")
    except TimeoutError:
        print(f"  not ready after {timeout:.0f}s: kubectl get pods -n {JOB_NAMESPACE} -l kubetune.io/served-job={name}")
        return
    print_endpoint_check(plane, name, timeout)
    service = json.loads(plane.kubectl("get", "service", f"{name}-serve", "-n", JOB_NAMESPACE, "-o", "json").stdout)
    row = json.loads(shared_sample("ag_news").read_text().splitlines()[0])
    labels = sorted({json.loads(line)["label"] for line in shared_sample("ag_news").read_text().splitlines()})
    say("Ask the tuned model through its endpoint (paste this; from a pod use the URL above)")
    print(f"  {ask_line(service['spec']['clusterIP'], serving['model'], labels, row['text'])}")


def print_endpoint_check(plane: ControlPlane, name: str, timeout: float) -> None:
    """Wait for the operator's endpoint check (the evaluated rows asked through the Service) and print its result."""

    def check() -> dict[str, Any]:
        return dict((job_status(plane, name).get("serving") or {}).get("check") or {})

    say("Checking that the endpoint answers as evaluated (the operator's check Job asks it the held-out rows)")
    try:
        wait_for(lambda: check().get("state") in ("Succeeded", "Failed"), timeout, "the endpoint check")
    except TimeoutError:
        print(f"  still running after {timeout:.0f}s: kubectl logs -n {JOB_NAMESPACE} job/{name}-check")
        return
    result = check()
    print(f"  {result['state']}: {result.get('message')}")
    if result.get("uri"):
        print(f"  the report shows it beside the in-process scores; details in {result['uri']}")


def up(timeout: float) -> int:
    started = time.monotonic()
    work = state_dir()
    if (work / "state.json").exists():
        print("a demo is already up: run `make demo-down` first", file=sys.stderr)
        return 1
    # A fresh cluster every time: the last demo's etcd data and logs would only get in the way.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    say(
        "Starting the test bed: etcd, kube-apiserver, controllers, a local registry holding the images `make images` "
        "built, a real node (kubelet, containerd, runc), moto S3, Prometheus"
    )
    bed = start_testbed(work)
    plane, s3, prometheus = bed.plane, bed.s3, bed.prometheus
    node = bed.parts.node
    processes = [*plane.processes, bed.parts.registry.process, node.containerd, node.kubelet, node.kube_proxy]
    processes += [s3.process, prometheus.process]
    pids = [p.process.pid for p in processes if p is not None and p.process is not None]
    (work / "state.json").write_text(json.dumps({"kubeconfig": plane.kubeconfig, "pids": pids}))
    say("Uploading the AG News sample and SmolLM2-135M-Instruct to S3")
    upload_inputs(s3, convert_smollm2(), shared_data_dir())
    say("Installing kubetune with Helm (the operator image runs as a pod on the real node, with the chart's RBAC)")
    install_chart(bed, work)
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    say(f"kubectl apply -f {EXAMPLE.relative_to(REPO_ROOT)}")
    plane.kubectl("apply", "-n", JOB_NAMESPACE, "-f", str(EXAMPLE), check=True)
    try:
        status = follow_job(plane, name, timeout)
    except TimeoutError as error:
        # Leave everything up: the job is still running and the way to look at it is below.
        print(f"{error}; it keeps running (`kubetune status {name} -n {JOB_NAMESPACE}`)", file=sys.stderr)
        print_look_around(plane, s3, prometheus, name)
        return 1
    print_results(s3, status)
    print_look_around(plane, s3, prometheus, name)
    print_endpoint(plane, s3, name)
    say(f"Demo finished in {time.monotonic() - started:.0f}s with phase {status.get('phase')}")
    return 0 if status.get("phase") == "Succeeded" else 1


def signal_group(pid: int, signum: signal.Signals) -> bool:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False
    return True


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def down() -> int:
    """Stop every process the demo started (each runs in its own session) and forget the demo."""
    work = state_dir()
    state_file = work / "state.json"
    if not state_file.exists():
        print("no demo is up")
        return 0
    pids = list(reversed(json.loads(state_file.read_text())["pids"]))
    stopped = sum(signal_group(pid, signal.SIGTERM) for pid in pids)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(group_alive(pid) for pid in pids):
        time.sleep(0.5)
    for pid in pids:
        signal_group(pid, signal.SIGKILL)  # the API server can hang on an etcd that is already gone
    # The node's containers, iptables chains, pod bridge and cgroups outlive its processes: remove them too.
    RealNode(ControlPlane(work_dir=work / "control-plane")).clean_up_after()
    state_file.unlink()
    print(f"stopped {stopped} demo process group(s); logs kept in {work}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    args = parser.parse_args()
    sys.exit(up(args.timeout) if args.command == "up" else down())


if __name__ == "__main__":
    main()
