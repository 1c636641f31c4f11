"""Time from `kubectl apply` of a FineTuneJob to its first training step, broken down stage by stage.

    python -m bench.time_to_first_step [--rows 64] [--max-steps 3]

The test bed of `make demo` (tests/testbed/demo.py: control plane with controllers and scheduler, a real node
(kubelet, containerd, runc) pulling the images `make images` built from a local registry, moto S3, Prometheus),
kubetune installed with Helm so that the operator image runs as the chart's pod on the real node,
SmolLM2-135M-Instruct and a small AG News slice in S3. One FineTuneJob (qLoRA, maxSteps 3,
evaluation off) is created; the bench records, on the wall clock of this machine:

- the client's create call, and watch events on the FineTuneJob, its trainer Job and pod (receive times: the
  objects' own timestamps have one-second resolution): trainer Job created, pod created, scheduled, Running;
- the trainer's JSON-lines log, as the kubelet serves it (millisecond timestamps): each stage's start, the model
  download, and the first `progress` record (the tracker reports step 1 at once, whatever the interval);
- when each stage and the first step became visible in FineTuneJob.status.progress to a watcher.

The trainer's model cache starts empty (an emptyDir of the new pod), so the model is really fetched from S3; the
trainer image is already on the node (pulled when the node started), as on a node that ran a job before. Results: a
markdown table on stdout and in bench/results/time_to_first_step.md.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bench.figures import load_line, markdown_table, seconds
from bench.machine import cpu_line

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "bench" / "results" / "time_to_first_step.md"
JOB_NAME = "ttfs-smollm2"
# Where tests/testbed/demo.py's upload_inputs puts the model.
MODEL_URI = "s3://kubetune-models/smollm2-135m-instruct/"
DATA_BUCKET = "kubetune-data"
TERMINAL_PHASES = ("Succeeded", "Failed", "Cancelled")


@dataclass(frozen=True)
class Milestone:
    """A moment on the way to the first step; `interval` names the work between the previous moment and this one."""

    key: str
    title: str
    source: str
    interval: str


MILESTONES = (
    Milestone("created", "FineTuneJob created", "client: create call sent", ""),
    Milestone("job", "trainer Job created", "watch: Job ADDED", "operator: FineTuneJob → children and trainer Job"),
    Milestone("pod", "pod created", "watch: Pod ADDED", "Job controller: Job → pod"),
    Milestone("scheduled", "pod scheduled", "watch: spec.nodeName set", "scheduler: bind the pod to the GPU node"),
    Milestone("running", "pod Running", "watch: status.phase", "kubelet: sandbox, network and the container"),
    Milestone("data", "data stage begins", "log: stage data", "trainer start-up: interpreter, imports, config"),
    Milestone("model", "data stage done", "log: stage model", "data: fetch from S3, parse, validate, split"),
    Milestone("fetched", "model fetched from S3", "log: downloaded … model", "model download from S3 (cold cache)"),
    Milestone("train", "tokens measured", "log: stage train", "tokenizer load + token-length measurement"),
    Milestone("loaded", "model loaded", "log: model loaded", "model load (4-bit) + LoRA"),
    Milestone("first_step", "first step done", "log: progress step 1", "trainer set-up + first optimizer step"),
)
# Milestones also visible in FineTuneJob.status.progress, with the status value that shows them.
STATUS_MILESTONES = {"data": "stage data", "model": "stage model", "train": "stage train", "first_step": "step ≥ 1"}


@dataclass(frozen=True)
class LogRecord:
    """One JSON line of the trainer's log."""

    time: float
    logger: str
    message: str
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Interval:
    """Seconds between two observed milestones, named for the work in between."""

    work: str
    start: str
    end: str
    seconds: float


@dataclass(frozen=True)
class Observation:
    """One watch event as received."""

    received: float
    resource: str
    kind: str
    body: Mapping[str, Any]


# ----------------------------------------------------------------------------------------------------------------------
# Pure: reading the log and the watch events


def parse_log(text: str) -> list[LogRecord]:
    """The trainer's JSON-lines records; anything else in the pod log (a library's print) is skipped."""
    records = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or "time" not in entry or "message" not in entry:
            continue
        records.append(
            LogRecord(
                time=datetime.fromisoformat(entry["time"]).timestamp(),
                logger=str(entry.get("logger", "")),
                message=str(entry["message"]),
                fields=entry.get("fields") or {},
            )
        )
    return records


def first_time(records: Sequence[LogRecord], matches: Callable[[LogRecord], bool]) -> float | None:
    return next((record.time for record in records if matches(record)), None)


def log_milestones(records: Sequence[LogRecord], model_uri: str) -> dict[str, float]:
    """Milestones the trainer's log shows. `loaded` only when the trainer logs a `model loaded …` line."""
    found = {
        "data": first_time(records, lambda r: r.message == "stage data"),
        "model": first_time(records, lambda r: r.message == "stage model"),
        "fetched": first_time(records, lambda r: r.message.startswith("downloaded") and model_uri in r.message),
        "train": first_time(records, lambda r: r.message == "stage train"),
        "loaded": first_time(records, lambda r: r.message.startswith("model loaded")),
        "first_step": first_time(records, lambda r: r.message == "progress" and (r.fields.get("step") or 0) >= 1),
        "finished": first_time(records, lambda r: r.message.startswith("run finished")),
    }
    for record in records:
        step = record.fields.get("step") if record.message == "progress" else None
        if isinstance(step, int) and step >= 1:
            found.setdefault(f"step:{step}", record.time)
    return {key: value for key, value in found.items() if value is not None}


def later_step_seconds(milestones: Mapping[str, float]) -> float | None:
    """Mean seconds per step after the first, from the first and last steps the progress log shows (the tracker
    logs at most one record per progress interval, so steps in between may be missing); None with one step."""
    steps = sorted(int(key.partition(":")[2]) for key in milestones if key.startswith("step:"))
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    return (milestones[f"step:{last}"] - milestones[f"step:{first}"]) / (last - first)


def first_seen(
    observations: Sequence[Observation], resource: str, matches: Callable[[Mapping[str, Any]], bool]
) -> float | None:
    return next((o.received for o in observations if o.resource == resource and matches(o.body)), None)


def progress_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return (body.get("status") or {}).get("progress") or {}


def stage_shown(stage: str) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a FineTuneJob's status.progress shows the stage."""
    return lambda body: progress_of(body).get("stage") == stage


def watch_milestones(observations: Sequence[Observation]) -> dict[str, float]:
    """Milestones from watch events: the trainer Job and pod, and what FineTuneJob.status showed when.

    Keys of status observations are prefixed `status:` (`status:data` …), phases `phase:<Phase>`."""
    found: dict[str, float | None] = {
        "job": first_seen(observations, "job", lambda body: True),
        "pod": first_seen(observations, "pod", lambda body: True),
        "scheduled": first_seen(observations, "pod", lambda body: bool((body.get("spec") or {}).get("nodeName"))),
        "running": first_seen(observations, "pod", lambda body: (body.get("status") or {}).get("phase") == "Running"),
        "status:first_step": first_seen(
            observations, "finetunejob", lambda body: (progress_of(body).get("step") or 0) >= 1
        ),
    }
    for stage in ("data", "model", "train"):
        found[f"status:{stage}"] = first_seen(observations, "finetunejob", stage_shown(stage))
    for observation in observations:
        phase = (observation.body.get("status") or {}).get("phase")
        if observation.resource == "finetunejob" and phase and f"phase:{phase}" not in found:
            found[f"phase:{phase}"] = observation.received
    return {key: value for key, value in found.items() if value is not None}


def intervals(milestones: Mapping[str, float], order: Sequence[Milestone] = MILESTONES) -> list[Interval]:
    """The work between consecutive observed milestones; a milestone not observed merges its work into the next."""
    result: list[Interval] = []
    previous: Milestone | None = None
    pending: list[str] = []
    for milestone in order:
        if milestone.key not in milestones:
            if previous is not None:
                pending.append(milestone.interval)
            continue
        if previous is not None:
            work = " + ".join([*pending, milestone.interval])
            seconds_between = milestones[milestone.key] - milestones[previous.key]
            result.append(Interval(work, previous.title, milestone.title, seconds_between))
        previous, pending = milestone, []
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Pure: the report


def breakdown_lines(milestones: Mapping[str, float]) -> list[str]:
    """The work between milestones, and the total from create to the first step."""
    rows = [[item.work, f"{item.start} → {item.end}", seconds(item.seconds)] for item in intervals(milestones)]
    if "created" in milestones and "first_step" in milestones:
        rows.append(
            [
                "**total**",
                "FineTuneJob created → first step done",
                seconds(milestones["first_step"] - milestones["created"]),
            ]
        )
    return markdown_table(["work", "between", "seconds"], rows, right=(2,))


def timeline_lines(milestones: Mapping[str, float]) -> list[str]:
    """Every milestone: how it was observed, when (seconds after the create call), and when status showed it."""
    start = milestones["created"]
    rows = []
    for milestone in MILESTONES:
        at = milestones.get(milestone.key)
        status_at = milestones.get(f"status:{milestone.key}")
        status_cell = "—"
        if status_at is not None:
            status_cell = f"{status_at - start:.2f} s ({STATUS_MILESTONES[milestone.key]})"
        rows.append(
            [
                milestone.title,
                milestone.source if at is not None else f"{milestone.source} (not logged)",
                seconds(None if at is None else at - start),
                status_cell,
            ]
        )
    return markdown_table(["milestone", "observed by", "at", "seen in FineTuneJob.status at"], rows, right=(2, 3))


def after_lines(milestones: Mapping[str, float], max_steps: int) -> list[str]:
    """The later steps' pace (what it says about the last interval), the phases seen and the end of the run."""
    start = milestones["created"]
    lines = []
    step_seconds = later_step_seconds(milestones)
    if step_seconds is not None and "loaded" not in milestones and {"train", "first_step"} <= milestones.keys():
        before_first = milestones["first_step"] - milestones["train"] - step_seconds
        lines.append(
            f"Later steps took {step_seconds:.1f} s each (from the progress log); if the first step took as long, "
            f"the model load, LoRA wrapping and trainer set-up took about {before_first:.1f} s of the last interval "
            "(an estimate: a first step also pays for lazy initialisation)."
        )
    phases = [
        f"{phase} at {milestones[f'phase:{phase}'] - start:.1f} s"
        for phase in ("Pending", "Validating", "Running", *TERMINAL_PHASES)
        if f"phase:{phase}" in milestones
    ]
    if phases:
        lines.append(f"Phases seen on the FineTuneJob: {', '.join(phases)}.")
    if "finished" in milestones:
        lines.append(
            f"The trainer logged `run finished` at {milestones['finished'] - start:.1f} s ({max_steps} steps, "
            "a checkpoint and the adapter uploaded, evaluation off)."
        )
    return [part for line in lines for part in (line, "")]


def render_report(
    milestones: Mapping[str, float],
    settings: Mapping[str, Any],
    started: datetime,
    loads: Sequence[tuple[str, tuple[float, float, float]]],
) -> str:
    """The markdown the bench prints and writes."""
    loaded_note = (
        []
        if "loaded" in milestones
        else [
            "The trainer logs no line when the model is loaded, so the last interval holds the 4-bit model load, "
            "the LoRA wrapping, the trainer's set-up (tokenizing the rows) and the first optimizer step together; "
            "a `model loaded` log line in the training stage would split it (the bench picks it up by that prefix).",
            "",
        ]
    )
    return "\n".join(
        [
            "# Time to first step: FineTuneJob created → first training step",
            "",
            "Command: `python -m bench.time_to_first_step "
            f"--rows {settings['rows']} --max-steps {settings['max_steps']}`.",
            "",
            "The `make demo` test bed: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, a real node "
            "(kubelet, containerd, runc; the images `make images` built, pulled from a local registry), moto S3. "
            "kubetune installed with Helm: the operator image runs as the chart's pod on the real node, the trainer "
            "image as the Job's pod. One FineTuneJob: SmolLM2-135M-Instruct "
            f"(`{MODEL_URI}`, bf16 safetensors, cold model cache), {settings['rows']} AG News rows "
            f"(classification), qLoRA, batch {settings['batch_size']}, maxSteps {settings['max_steps']}, evaluation "
            f"off; status progress interval {settings['progress_interval']} s (stage changes are sent at once). "
            "Times are seconds after the client sent the create call, on this machine's wall clock: watch receive "
            "times for the Job and pod, the trainer's own log timestamps for its stages.",
            "",
            *breakdown_lines(milestones),
            "",
            *loaded_note,
            *timeline_lines(milestones),
            "",
            *after_lines(milestones, settings["max_steps"]),
            "## Machine",
            "",
            f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
            f"- CPU: {cpu_line()}; the trainer ran on the CPU (no GPU here)",
            f"- {load_line(loads, os.cpu_count() or 0)}",
            "",
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------
# Watching the job


@dataclass
class JobWatcher:
    """Threads watching one FineTuneJob, its trainer Jobs and pods (by label); `observations` in receive order."""

    kubeconfig: str
    namespace: str
    name: str
    observations: list[Observation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> JobWatcher:
        from kubernetes import client, config
        from kubetune_operator.builders import LABEL_JOB_NAME

        from bench.watch_stream import list_version
        from kubetune.api import GROUP, PLURAL, VERSION

        api_client = config.new_client_from_config(config_file=self.kubeconfig)
        custom, batch, core = (
            client.CustomObjectsApi(api_client),
            client.BatchV1Api(api_client),
            client.CoreV1Api(api_client),
        )
        selector = f"{LABEL_JOB_NAME}={self.name}"

        def finetunejobs(**kwargs: Any) -> Any:
            return custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, **kwargs)

        def jobs(**kwargs: Any) -> Any:
            return batch.list_namespaced_job(self.namespace, label_selector=selector, **kwargs)

        def pods(**kwargs: Any) -> Any:
            return core.list_namespaced_pod(self.namespace, label_selector=selector, **kwargs)

        for resource, list_call in (("finetunejob", finetunejobs), ("job", jobs), ("pod", pods)):
            version, _ = list_version(list_call)
            thread = threading.Thread(
                target=self._follow, args=(resource, list_call, version), name=f"watch-{resource}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _follow(self, resource: str, list_call: Callable[..., Any], version: str) -> None:
        try:
            self._record(resource, list_call, version)
        except Exception as error:  # a dead watch must end the wait, not leave it to time out
            self.errors.append(f"watch on {resource}s: {type(error).__name__}: {error}")

    def _record(self, resource: str, list_call: Callable[..., Any], version: str) -> None:
        from bench.watch_stream import watch_events

        for received, kind, body in watch_events(
            list_call, resource_version=version, deadline=float("inf"), stop=self._stop
        ):
            if resource == "finetunejob" and body["metadata"]["name"] != self.name:
                continue
            with self._lock:
                self.observations.append(Observation(received, resource, kind, body))

    def snapshot(self) -> list[Observation]:
        with self._lock:
            return sorted(self.observations, key=lambda o: o.received)

    def phase(self) -> str | None:
        """The FineTuneJob's latest phase seen."""
        for observation in reversed(self.snapshot()):
            if observation.resource == "finetunejob":
                return (observation.body.get("status") or {}).get("phase")
        return None

    def pod_name(self) -> str | None:
        return next((o.body["metadata"]["name"] for o in self.snapshot() if o.resource == "pod"), None)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


# ----------------------------------------------------------------------------------------------------------------------
# The test bed and the run


def finetunejob_manifest(train_uri: str, rows: int, max_steps: int, batch_size: int) -> dict[str, Any]:
    """The job: the demo's model from S3, a small slice of AG News, a few steps, no evaluation."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB_NAME},
        "spec": {
            "model": {"uri": MODEL_URI},
            "dataset": {"train": train_uri, "format": "classification", "maxLength": 256},
            "method": "qlora",
            "training": {"maxSteps": max_steps, "batchSize": batch_size},
            "evaluation": {"enabled": False},
            "output": {"uri": f"s3://kubetune-artifacts/{JOB_NAME}/"},
            "s3": {"credentialsSecretRef": "kubetune-s3"},
        },
    }


@dataclass
class Bed:
    """The demo's test bed with kubetune installed."""

    plane: Any
    s3: Any
    progress_interval: float


@contextmanager
def demo_testbed(work: Path) -> Iterator[Bed]:
    """tests/testbed/demo.py's test bed and Helm install; the operator pod healthy before the yield."""
    from tests.testbed import demo
    from tests.testbed.cluster import product_values
    from tests.testbed.processes import wait_for
    from tests.testbed.smollm2 import convert_smollm2

    bed = demo.start_testbed(work)
    try:
        demo.upload_inputs(bed.s3, convert_smollm2(), demo.shared_data_dir())
        demo.install_chart(bed, work)
        ready = ["get", "pods", "-n", demo.OPERATOR_NAMESPACE, "-o", "jsonpath={..status.containerStatuses[0].ready}"]
        wait_for(lambda: bed.plane.kubectl(*ready).stdout.strip() == "true", 120, "the operator pod to be ready")
        interval = float(product_values(bed.s3, bed.parts.images)["trainer"]["progressIntervalSeconds"])
        yield Bed(bed.plane, bed.s3, interval)
    finally:
        for server in (bed.prometheus, bed.s3, bed.parts, bed.plane):
            server.stop()


def upload_slice(s3: Any, rows: int) -> str:
    """The first `rows` rows of the shared AG News train file, as their own object; its URI."""
    from tests.testbed import demo

    lines = (demo.shared_data_dir() / "ag_news" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    key = f"bench/ag_news-{rows}.jsonl"
    s3.client().put_object(Bucket=DATA_BUCKET, Key=key, Body=("\n".join(lines) + "\n").encode())
    return f"s3://{DATA_BUCKET}/{key}"


def pod_log(plane: Any, namespace: str, pod: str) -> str:
    """The trainer container's log, as the kubelet serves it to the API server."""
    result = plane.kubectl("logs", "-n", namespace, pod)
    return str(result.stdout) if result.returncode == 0 else ""


def run_job(bed: Bed, rows: int, max_steps: int, batch_size: int, timeout: float) -> dict[str, float]:
    """Create the FineTuneJob, follow it to the end, and gather every milestone."""
    from kubernetes import client

    from kubetune.api import GROUP, PLURAL, VERSION
    from tests.testbed import demo

    manifest = finetunejob_manifest(upload_slice(bed.s3, rows), rows, max_steps, batch_size)
    watcher = JobWatcher(bed.plane.kubeconfig, demo.JOB_NAMESPACE, JOB_NAME).start()
    custom = client.CustomObjectsApi(bed.plane.api_client())
    try:
        created = time.time()
        custom.create_namespaced_custom_object(GROUP, VERSION, demo.JOB_NAMESPACE, PLURAL, manifest)
        deadline = time.monotonic() + timeout
        while watcher.phase() not in TERMINAL_PHASES and time.monotonic() < deadline:
            if watcher.errors:
                raise click.ClickException("; ".join(watcher.errors))
            time.sleep(0.5)
        phase = watcher.phase()
    finally:
        watcher.stop()
    pod = watcher.pod_name()
    log_text = pod_log(bed.plane, demo.JOB_NAMESPACE, pod) if pod else ""
    milestones = {
        "created": created,
        **watch_milestones(watcher.snapshot()),
        **log_milestones(parse_log(log_text), MODEL_URI),
    }
    if phase != "Succeeded":
        tail = "\n".join(log_text.splitlines()[-20:])
        raise click.ClickException(
            f"FineTuneJob {JOB_NAME} ended in phase {phase} (waited {timeout:.0f} s); pod log tail:\n{tail}"
        )
    return milestones


@click.command()
@click.option("--rows", default=64, show_default=True, type=click.IntRange(8, 2000), help="AG News rows to train on.")
@click.option("--max-steps", default=3, show_default=True, type=click.IntRange(1, 100), help="training.maxSteps.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 64), help="training.batchSize.")
@click.option("--timeout", default=900.0, show_default=True, help="Seconds to wait for the job to finish.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=RESULTS_FILE,
    show_default=True,
    help="Where the markdown goes.",
)
def main(rows: int, max_steps: int, batch_size: int, timeout: float, output: Path) -> None:
    """Run one FineTuneJob on the demo test bed and print where the time to its first step goes."""
    from tests.testbed.processes import cache_dir

    started = datetime.now(UTC)
    work = cache_dir() / "bench-runs" / f"time-to-first-step-{started.strftime('%Y%m%d-%H%M%S')}"
    # Every process of the test bed, the trainer pod included, gets a fresh temporary directory: a cold model cache.
    (work / "tmp").mkdir(parents=True)
    os.environ["TMPDIR"] = str(work / "tmp")
    click.echo(f"test bed in {work}", err=True)
    loads = [("start", os.getloadavg())]
    with demo_testbed(work) as bed:
        loads.append(("job created", os.getloadavg()))
        milestones = run_job(bed, rows, max_steps, batch_size, timeout)
        loads.append(("job finished", os.getloadavg()))
        interval = bed.progress_interval
    settings = {"rows": rows, "max_steps": max_steps, "batch_size": batch_size, "progress_interval": interval}
    report = render_report(milestones, settings, started, loads)
    click.echo(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
