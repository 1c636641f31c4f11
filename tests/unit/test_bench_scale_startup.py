"""The pure parts of the operator-scale, time-to-first-step and run-all benchmarks: percentiles, /proc parsing,
milestones from logs and watch events, and the markdown they render (no timed assertions)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.figures import load_line, markdown_table, percentile, seconds
from bench.operator_scale import (
    BARE_LABEL,
    CpuFigures,
    OperatorFigures,
    Round,
    RunFigures,
    Submission,
    children_of,
    command_line,
    cpu_bound_lines,
    cpu_rows,
    distinct,
    handler_line,
    handler_runs,
    median_of,
    operator_lines,
    owned_by,
    proc_cpu_seconds,
    proc_status_mb,
    ratio,
    request_counts,
    requests_between,
    requests_line,
    run_loads,
    run_rows,
    sweep_rows,
    target_rows,
)
from bench.run_all import BENCHMARKS, Outcome, chosen, command_of, demoted, render_readme
from bench.time_to_first_step import (
    MODEL_URI,
    Observation,
    after_lines,
    intervals,
    later_step_seconds,
    log_milestones,
    parse_log,
    watch_milestones,
)
from bench.time_to_first_step import breakdown_lines as startup_breakdown
from bench.time_to_first_step import timeline_lines as startup_timeline

pytestmark = pytest.mark.unit

PROC_STATUS = """Name:\tpython
VmPeak:\t  900000 kB
VmHWM:\t  176128 kB
VmRSS:\t  102400 kB
Threads:\t12
"""
# Field 2 (the command name) may hold spaces and parentheses; utime and stime are fields 14 and 15.
PROC_STAT = "4242 (python (kopf) x) S 1 4242 4242 0 -1 4194560 5000 0 0 0 250 50 0 0 20 0 12 0 100 0 0"


def log_line(time: str, message: str, logger: str = "kubetune_trainer.progress.reporter", **fields: object) -> str:
    entry = {"time": time, "level": "info", "stage": None, "logger": logger, "message": message, "fields": fields}
    return json.dumps(entry)


def run(label: str, sent: list[float], seen: list[float | None], writes: int = 1) -> RunFigures:
    submissions = tuple(Submission(f"j{index}", at, at + 0.01) for index, at in enumerate(sent))
    job_seen = {f"j{index}": at for index, at in enumerate(seen) if at is not None}
    return RunFigures(label, f"{len(sent)} things", writes, submissions, job_seen, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))


# ----------------------------------------------------------------------------------------------------------------------
# figures


@pytest.mark.parametrize(
    ("values", "share", "expected"),
    [
        ([3.0], 0.95, 3.0),
        ([4.0, 1.0, 3.0, 2.0], 0.5, 2.5),  # unsorted input; between the two middle values
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.5, 3.0),
        ([float(v) for v in range(1, 101)], 0.95, 95.05),
        ([1.0, 2.0], 0.0, 1.0),
        ([1.0, 2.0], 1.0, 2.0),
    ],
)
def test_percentile_interpolates_between_closest_ranks(values: list[float], share: float, expected: float) -> None:
    assert percentile(values, share) == pytest.approx(expected)


def test_percentile_refuses_no_values_and_shares_outside_0_to_1() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="within 0-1"):
        percentile([1.0], 95)


def test_markdown_table_aligns_numeric_columns_right_and_refuses_ragged_rows() -> None:
    assert markdown_table(["run", "s"], [["a", "1.00 s"], ["b", "2.00 s"]], right=(1,)) == [
        "| run | s |",
        "| --- | ---: |",
        "| a | 1.00 s |",
        "| b | 2.00 s |",
    ]
    with pytest.raises(ValueError, match="row 2 has 1 cells, the header 2"):
        markdown_table(["run", "s"], [["a", "1"], ["b"]])


def test_seconds_and_load_line() -> None:
    assert seconds(1.234) == "1.23 s"
    assert seconds(None) == "—"
    line = load_line([("start", (1.5, 1.0, 0.5)), ("end", (3.25, 2.0, 1.0))], cores=2)
    assert line.startswith("Load (`os.getloadavg()`, 1-minute average; 2 cores): start 1.50, end 3.25.")


# ----------------------------------------------------------------------------------------------------------------------
# operator scale


def test_proc_readings_parse_status_in_mib_and_cpu_seconds_after_the_command_name() -> None:
    assert proc_status_mb(PROC_STATUS, "VmHWM") == pytest.approx(172.0)
    assert proc_status_mb(PROC_STATUS, "VmRSS") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no VmSwap line"):
        proc_status_mb(PROC_STATUS, "VmSwap")
    assert proc_cpu_seconds(PROC_STAT, clock_ticks=100) == pytest.approx(3.0)


def test_run_figures_measure_from_the_first_create_to_the_last_job_seen() -> None:
    figures = run("operator", sent=[100.0, 100.5, 101.0], seen=[100.2, 101.5, 104.0])

    assert figures.complete
    assert figures.total_seconds == pytest.approx(4.0)
    assert figures.submit_seconds == pytest.approx(1.01)
    assert figures.latencies == pytest.approx([0.2, 1.0, 3.0])


def test_a_job_never_seen_leaves_the_total_unknown() -> None:
    figures = run("operator", sent=[100.0, 100.5], seen=[100.2, None])

    assert not figures.complete
    assert figures.total_seconds is None
    assert figures.latencies == pytest.approx([0.2])


def memory(peak: float) -> OperatorFigures:
    return OperatorFigures(
        rss_idle_mb=90, peak_rss_mb=peak, rss_after_mb=peak - 10, cpu_seconds=3, quiet_after_seconds=9
    )


def test_scale_tables_give_percentiles_ratios_and_verdicts_on_the_median_of_the_rounds() -> None:
    floor = run("floor: Jobs only", sent=[0.0, 0.0, 0.0, 0.0], seen=[0.1, 0.2, 0.3, 1.0])
    children = run("floor: all children", sent=[0.0, 0.0, 0.0, 0.0], seen=[0.5, 0.5, 0.5, 3.0], writes=5)
    slow = run("operator", sent=[0.0, 0.0, 0.0, 0.0], seen=[0.5, 1.0, 1.5, 2.5])
    fast = run("operator", sent=[0.0, 0.0, 0.0, 0.0], seen=[0.5, 1.0, 1.5, 1.8])
    faster = run("operator", sent=[0.0, 0.0, 0.0, 0.0], seen=[0.5, 1.0, 1.5, 1.5])
    rounds = [
        Round((floor, children), slow, memory(250), threads=16),
        Round((floor, children), fast, memory(150), threads=16),
        Round((floor, children), faster, memory(140), threads=16),
    ]

    runs = "\n".join(run_rows(rounds))
    assert "| 16 | 1 | floor: all children | 4 things | 20 | 0.01 s | 4/4 | 3.00 s | 0.50 s | 2.62 s | 3.00 s |" in runs
    assert "| 16 | 1 | operator | 4 things | 4 | 0.01 s | 4/4 | 2.50 s | 1.25 s | 2.35 s | 2.50 s |" in runs
    assert "| 16 | 3 | operator | 4 things | 4 | 0.01 s | 4/4 | 1.50 s | 1.25 s | 1.50 s | 1.50 s |" in runs
    targets = "\n".join(target_rows(rounds))
    # One slow round does not decide: the median of 2.50×, 1.80× and 1.50× is 1.80×.
    assert "| 16 | all Jobs exist: operator / floor: Jobs only | 1.800× | 2.50×, 1.80×, 1.50× | ≤ 2× | yes |" in targets
    assert "| 16 | all Jobs exist: operator / floor: all children | 0.60× | 0.83×, 0.60×, 0.50× | — | — |" in targets
    assert (
        "| all | operator peak RSS (VmHWM), highest | 250 MB | 250 MB, 150 MB, 140 MB | < 200 MB | **no** |" in targets
    )
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None


def test_the_median_skips_unknown_values_and_is_unknown_without_any() -> None:
    assert median_of([2.0, None, 1.0, 3.0]) == pytest.approx(2.0)
    assert median_of([None]) is None


def test_handler_runs_are_counted_per_job_from_the_operators_log() -> None:
    log = "\n".join(
        [
            "Handler 'ensure_trainer' succeeded.",
            "Handler 'apply_suspend/spec.runPolicy.suspend' succeeded.",
            "Handler 'finetunejob_event' succeeded.",
            "Handler 'finetunejob_event' succeeded.",
            "Handler 'finetunejob_event' failed with an exception. Will retry.",
            "Creation is processed: 2 succeeded; 0 failed.",
        ]
    )

    runs = handler_runs(log)

    assert runs == {"ensure_trainer": 1, "apply_suspend": 1, "finetunejob_event": 2, "finetunejob_event (failed)": 1}
    line = handler_line(runs, jobs=2)
    assert line.endswith(
        ": finetunejob_event 1.0, ensure_trainer 0.5, apply_suspend 0.5, finetunejob_event (failed) 0.5."
    )
    assert handler_line({}, jobs=2) == "- Handler runs: none found in the operator's log."


def test_api_requests_are_counted_per_verb_and_resource_without_watches() -> None:
    lines = [
        ("201", "jobs", "", "POST", 10),
        ("409", "jobs", "", "POST", 2),
        ("200", "finetunejobs", "status", "PATCH", 1),
        ("0", "jobs", "", "WATCH", 3),
    ]
    metrics = [
        f'apiserver_request_total{{code="{code}",component="apiserver",resource="{resource}",scope="namespace",'
        f'subresource="{subresource}",verb="{verb}",version="v1"}} {value}'
        for code, resource, subresource, verb, value in lines
    ]
    metrics += ["# TYPE apiserver_request_total counter", 'apiserver_request_duration_seconds_count{verb="POST"} 12']
    before = request_counts("\n".join(metrics))
    assert before == {"POST jobs": 12.0, "PATCH finetunejobs/status": 1.0}

    grown = requests_between(before, {"POST jobs": 16.0, "PATCH finetunejobs/status": 1.0, "POST events": 2.0})
    assert grown == {"POST jobs": 4.0, "POST events": 2.0}
    assert requests_line(grown, jobs=2).endswith(": 3.00 in all: POST jobs 2.00, POST events 1.00.")
    assert requests_line({}, jobs=2) == "- API requests: not read."


def test_cpu_is_accounted_per_process_and_gives_the_ratio_before_operator_work() -> None:
    floor = replace(run("floor: Jobs only", sent=[0.0], seen=[1.0]), cpu=CpuFigures(client=0.8, watch=0.2, plane=1.0))
    unmeasured = run("floor: Jobs as the operator", sent=[0.0], seen=[1.0])
    operator = replace(
        run("operator", sent=[0.0], seen=[2.0]), cpu=CpuFigures(client=0.4, watch=0.2, plane=2.6, controller=0.8)
    )
    rounds = [Round((floor, unmeasured), operator, memory(150), threads=16)]

    rows = "\n".join(cpu_rows(rounds, cores=2))
    assert "| 16 | 1 | floor: Jobs only | 0.80 s | 0.20 s | 1.00 s | — | 2.00 s | 2.00 of 2 |" in rows
    assert "| 16 | 1 | operator | 0.40 s | 0.20 s | 2.60 s | 0.80 s | 4.00 s | 2.00 of 2 |" in rows
    assert "floor: Jobs as the operator" not in rows  # no CPU read for it
    (line,) = cpu_bound_lines(rounds)
    # (0.4 + 0.2 + 2.6) / 2.0: the operator run's CPU without the operator's, over the floor's.
    assert line.startswith("- 16 client threads: the operator run's CPU without the operator's own")
    assert "is 1.60× the floor's whole CPU (median; rounds: 1.60×)" in line
    assert line.endswith("The operator's own share of its run's CPU: 20%.")
    assert cpu_bound_lines([Round((unmeasured,), unmeasured, memory(150), threads=16)]) == []


def test_the_bare_controller_is_reported_as_the_beds_bound_and_beside_the_operator() -> None:
    floor = replace(run("floor: Jobs only", sent=[0.0], seen=[1.0]), cpu=CpuFigures(client=0.8, watch=0.2, plane=1.0))
    bare = replace(
        run(BARE_LABEL, sent=[0.0], seen=[1.6]), cpu=CpuFigures(client=0.4, watch=0.2, plane=2.4, controller=0.2)
    )
    operator = replace(
        run("operator", sent=[0.0], seen=[2.0]), cpu=CpuFigures(client=0.4, watch=0.2, plane=2.6, controller=0.8)
    )
    rounds = [
        Round((floor,), operator, memory(150), threads=16, bare=bare),
        Round((floor,), operator, memory(150), threads=16),
    ]

    assert [figures.label for figures in rounds[0].runs] == ["floor: Jobs only", BARE_LABEL, "operator"]
    assert rounds[0].bare_ratio() == pytest.approx(1.6) and rounds[0].over_bare_ratio() == pytest.approx(1.25)
    assert rounds[1].bare_ratio() is None and rounds[1].over_bare_ratio() is None
    targets = "\n".join(target_rows(rounds))
    # A round without a bare run leaves the median to the rounds that made one.
    assert f"| 16 | all Jobs exist: {BARE_LABEL} / floor: Jobs only | 1.60× | 1.60×, — | — | — |" in targets
    assert f"| 16 | all Jobs exist: operator / {BARE_LABEL} | 1.25× | 1.25×, — | — | — |" in targets
    rows = "\n".join(cpu_rows(rounds[:1], cores=2))
    assert f"| 16 | 1 | {BARE_LABEL} | 0.40 s | 0.20 s | 2.40 s | 0.20 s | 3.20 s | 2.00 of 2 |" in rows
    assert "| 16 | 1 | operator | 0.40 s | 0.20 s | 2.60 s | 0.80 s | 4.00 s | 2.00 of 2 |" in rows
    assert cpu_bound_lines(rounds[:1])[-1] == (
        f"- 16 client threads: controller CPU until every trainer Job existed, per round: {BARE_LABEL} 0.20 s; "
        "operator 0.80 s."
    )
    # Without a bare run, no row or line names it.
    alone = [Round((floor,), operator, memory(150), threads=16)]
    assert BARE_LABEL not in "\n".join(target_rows(alone) + cpu_bound_lines(alone))


def test_each_client_concurrency_is_judged_on_the_median_of_its_own_rounds() -> None:
    def at(threads: int, floor_s: float, bare_s: float, operator_s: float) -> Round:
        return Round(
            (run("floor: Jobs only", sent=[0.0], seen=[floor_s]),),
            run("operator", sent=[0.0], seen=[operator_s]),
            memory(150),
            threads=threads,
            bare=run(BARE_LABEL, sent=[0.0], seen=[bare_s]),
        )

    # As the bench runs them: round 1 at each concurrency, then round 2.
    rounds = [at(1, 2.0, 2.6, 3.0), at(16, 1.0, 1.9, 2.2), at(1, 2.0, 2.4, 2.8), at(16, 1.0, 1.8, 2.4)]

    sweep = "\n".join(sweep_rows(rounds))
    # 1 thread: ratios 1.50× and 1.40× (median 1.45×), the bare controller 1.30× and 1.20×; 16: 2.20× and 2.40×.
    assert "| 1 | 2.00 s | 2.50 s | 2.90 s | 1.450× | 1.25× | 1.16× | yes |" in sweep
    assert "| 16 | 1.00 s | 1.85 s | 2.30 s | 2.300× | 1.85× | 1.25× | **no** |" in sweep
    assert sweep.index("| 1 |") < sweep.index("| 16 |")
    targets = "\n".join(target_rows(rounds))
    assert "| 1 | all Jobs exist: operator / floor: Jobs only | 1.450× | 1.50×, 1.40× | ≤ 2× | yes |" in targets
    assert "| 16 | all Jobs exist: operator / floor: Jobs only | 2.300× | 2.20×, 2.40× | ≤ 2× | **no** |" in targets
    assert "value (median of 2 rounds)" in targets
    runs = "\n".join(run_rows(rounds))
    # Grouped by concurrency in the tables, each numbered among its own rounds.
    assert runs.index("| 1 | 2 | operator |") < runs.index("| 16 | 1 | floor: Jobs only |")
    loads = [name for name, _ in run_loads(rounds)]
    assert loads[:4] == [
        "after 1 client thread round 1 floor: Jobs only",
        f"after 1 client thread round 1 {BARE_LABEL}",
        "after 1 client thread round 1 operator",
        "after 16 client threads round 1 floor: Jobs only",
    ]
    assert loads[-1] == "after 16 client threads round 2 operator"
    assert distinct((16, 1, 16, 4)) == (16, 1, 4)
    assert (
        command_line(500, (1, 16), 5) == "python -m bench.operator_scale --jobs 500 --threads 1 --threads 16 --rounds 5"
    )


def test_the_bare_controllers_job_is_owned_by_its_finetunejob_and_the_prebuilt_job_is_left_as_it_was() -> None:
    job = {"kind": "Job", "metadata": {"name": "a-trainer", "namespace": "n", "labels": {"x": "y"}}, "spec": {}}
    owner = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "a", "uid": "u-1"}}

    owned = owned_by(job, owner)

    assert owned["metadata"]["ownerReferences"] == [
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "a", "uid": "u-1", "controller": True,
         "blockOwnerDeletion": True}
    ]  # fmt: skip
    assert owned["metadata"]["labels"] == {"x": "y"} and owned["spec"] == {}
    assert "ownerReferences" not in job["metadata"]


def test_operator_lines_give_each_rounds_memory_and_cpu() -> None:
    operator = replace(
        run("operator", sent=[0.0], seen=[2.0]), cpu=CpuFigures(client=0.4, watch=0.2, plane=2.6, controller=0.8)
    )
    floor = run("floor: Jobs only", sent=[0.0], seen=[1.0])
    lines = operator_lines(
        [Round((floor,), operator, memory(150), threads=16), Round((floor,), operator, memory(160), threads=16)], jobs=1
    )

    assert lines[0].startswith(
        "- 16 client threads, round 1, operator: resident memory 90 MB idle before the burst, peak (VmHWM) 150 MB"
    )
    assert "0.8 s of it until every trainer Job existed" in lines[0]
    assert "peak (VmHWM) 160 MB" in lines[1]
    assert lines[2] == "- Handler runs: none found in the operator's log."
    assert lines[3] == "- API requests: not read."


def test_the_floor_creates_what_the_operator_builds() -> None:
    from kubetune_operator.settings import OperatorSettings

    settings = OperatorSettings.from_env({})

    (job,) = children_of("bench-00001", "scale-x", settings)
    assert job["kind"] == "Job"
    assert job["metadata"]["namespace"] == "scale-x"
    assert job["metadata"]["name"] == "bench-00001-trainer"


# ----------------------------------------------------------------------------------------------------------------------
# time to first step

TRAINER_LOG = "\n".join(
    [
        log_line("2026-11-22T03:05:00.000+00:00", "stage data"),
        "a line some library printed",
        log_line("2026-11-22T03:05:00.300+00:00", "stage model"),
        log_line(
            "2026-11-22T03:05:02.900+00:00",
            f"downloaded 7 files from {MODEL_URI} to /tmp/kubetune-models/x",
            logger="kubetune_trainer.storage",
        ),
        log_line("2026-11-22T03:05:09.000+00:00", "stage train"),
        log_line("2026-11-22T03:05:40.000+00:00", "progress", stage="train", step=0),
        log_line("2026-11-22T03:06:12.000+00:00", "progress", stage="train", step=1, totalSteps=3),
        log_line("2026-11-22T03:07:00.000+00:00", "progress", stage="train", step=2, totalSteps=3),
        log_line("2026-11-22T03:08:00.000+00:00", "run finished: Succeeded", logger="kubetune_trainer.backends.local"),
    ]
)
T0 = datetime(2026, 11, 22, 3, 5, tzinfo=UTC).timestamp()


def test_trainer_log_milestones_come_from_its_json_lines() -> None:
    records = parse_log(TRAINER_LOG)
    assert len(records) == 8

    milestones = log_milestones(records, MODEL_URI)

    assert {key: round(value - T0, 3) for key, value in milestones.items()} == {
        "data": 0.0,
        "model": 0.3,
        "fetched": 2.9,
        "train": 9.0,
        "first_step": 72.0,
        "finished": 180.0,
        "step:1": 72.0,
        "step:2": 120.0,
    }
    assert later_step_seconds(milestones) == pytest.approx(48.0)
    assert later_step_seconds({"step:1": 5.0}) is None


def test_the_later_steps_pace_estimates_the_model_load_when_the_trainer_does_not_log_it() -> None:
    milestones = {"created": 0.0, "train": 10.0, "first_step": 50.0, "step:1": 50.0, "step:3": 70.0}
    milestones |= {"phase:Running": 0.5, "phase:Succeeded": 90.0, "finished": 88.0}

    text = "\n".join(after_lines(milestones, max_steps=3))

    assert "Later steps took 10.0 s each" in text and "took about 30.0 s of the last interval" in text
    assert "Phases seen on the FineTuneJob: Running at 0.5 s, Succeeded at 90.0 s." in text
    assert "`run finished` at 88.0 s (3 steps" in text
    assert "Later steps" not in "\n".join(after_lines({**milestones, "loaded": 20.0}, max_steps=3))


def test_watch_milestones_take_the_first_event_that_shows_each_change() -> None:
    pod = {"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}}
    scheduled = {**pod, "spec": {"nodeName": "kwok-gpu-0"}}
    running = {**scheduled, "status": {"phase": "Running"}}

    def ftj(phase: str, progress: dict[str, object]) -> dict[str, object]:
        return {"metadata": {"name": "j"}, "status": {"phase": phase, "progress": progress}}

    observations = [
        Observation(1.0, "finetunejob", "ADDED", {"metadata": {"name": "j"}}),
        Observation(1.5, "job", "ADDED", {"metadata": {"name": "j-trainer"}}),
        Observation(1.6, "finetunejob", "MODIFIED", ftj("Pending", {})),
        Observation(1.7, "pod", "ADDED", pod),
        Observation(1.8, "pod", "MODIFIED", scheduled),
        Observation(2.5, "pod", "MODIFIED", running),
        Observation(2.6, "finetunejob", "MODIFIED", ftj("Running", {})),
        Observation(4.0, "finetunejob", "MODIFIED", ftj("Running", {"stage": "data"})),
        Observation(9.5, "finetunejob", "MODIFIED", ftj("Running", {"stage": "train"})),
        Observation(80.0, "finetunejob", "MODIFIED", ftj("Running", {"stage": "train", "step": 1})),
    ]

    assert watch_milestones(observations) == {
        "job": 1.5,
        "pod": 1.7,
        "scheduled": 1.8,
        "running": 2.5,
        "status:data": 4.0,
        "status:train": 9.5,
        "status:first_step": 80.0,
        "phase:Pending": 1.6,
        "phase:Running": 2.6,
    }


def test_a_milestone_not_observed_merges_its_work_into_the_next_interval() -> None:
    milestones = {"created": 0.0, "job": 1.0, "pod": 1.5, "scheduled": 1.6, "running": 2.0, "data": 5.0}
    milestones |= {"model": 6.0, "fetched": 8.0, "train": 12.0, "first_step": 60.0}

    found = intervals(milestones)

    assert [round(item.seconds, 3) for item in found] == [1.0, 0.5, 0.1, 0.4, 3.0, 1.0, 2.0, 4.0, 48.0]
    assert found[-1].work == "model load (4-bit) + LoRA + trainer set-up + first optimizer step"
    assert (found[-1].start, found[-1].end) == ("tokens measured", "first step done")
    assert intervals({**milestones, "loaded": 30.0})[-1].seconds == pytest.approx(30.0)


def test_startup_tables_show_the_total_and_when_status_showed_each_stage() -> None:
    milestones = {"created": 10.0, "job": 11.0, "data": 15.0, "first_step": 70.0, "status:data": 15.5}

    breakdown = "\n".join(startup_breakdown(milestones))
    assert "| **total** | FineTuneJob created → first step done | 60.00 s |" in breakdown
    timeline = "\n".join(startup_timeline(milestones))
    assert "| data stage begins | log: stage data | 5.00 s | 5.50 s (stage data) |" in timeline
    assert "| pod scheduled | watch: spec.nodeName set (not logged) | — | — |" in timeline


# ----------------------------------------------------------------------------------------------------------------------
# run all


def test_quick_runs_use_the_short_variants_and_write_where_told(tmp_path: Path) -> None:
    scale = chosen(["operator_scale"])[0]

    assert command_of(scale, quick=True, results_dir=tmp_path) == [
        sys.executable, "-m", "bench.operator_scale", "--jobs", "100", "--rounds", "1",
        "--output", str(tmp_path / "operator_scale.md"),
    ]  # fmt: skip
    assert command_of(scale, quick=False, results_dir=tmp_path)[3:5] == ["--jobs", "500"]
    assert [benchmark.name for benchmark in chosen([])] == [benchmark.name for benchmark in BENCHMARKS]
    with pytest.raises(Exception, match="no_such_bench"):
        chosen(["no_such_bench"])


def test_readme_collects_every_results_file_with_its_headings_nested() -> None:
    results = {
        "operator_scale.md": "# Operator scale\n\n| a |\n\n## Machine\n",
        "extra.md": "# Something else\n```\n# not a heading\n```\n",
    }
    outcomes = {"operator_scale": Outcome("operator_scale", 0, 120.0)}

    readme = render_readme(results, outcomes, ["- CPU: test"], quick=False)

    assert readme.startswith("# Benchmark results\n\nWritten by `make bench` (`python -m bench.run_all`): ")
    assert "(`BENCH_QUICK=1`, `python -m bench.run_all --quick`)" in render_readme(results, {}, [], quick=True)
    assert "| [operator_scale.md](operator_scale.md) |" in readme and "| ran now (2.0 min) |" in readme
    assert "| [extra.md](extra.md) | — | from an earlier run |" in readme
    missing = "No results yet: trainer_throughput.md, multinode_scaling.md, image_builds.md, time_to_first_step.md"
    assert missing in readme
    assert "\n## Operator scale\n" in readme and "\n### Machine\n" in readme
    assert "- CPU: test" in readme
    assert demoted("# a\n```\n# b\n```\n## c") == "## a\n```\n# b\n```\n### c"
