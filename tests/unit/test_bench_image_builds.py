"""bench.image_builds' report: one row per image with its size, layers, builds and pushes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bench.image_builds import ImageFigures, gigabytes, render_report

pytestmark = pytest.mark.unit


def test_the_report_has_a_row_per_image_with_every_figure() -> None:
    figures = [
        ImageFigures("operator", 325_000_000, 5, 140_000_000, 21.4, 1.2, 3.6, 0.04),
        ImageFigures("trainer", 6_310_000_000, 8, 6_050_000_000, 144.9, 1.6, 58.7, 0.2),
    ]

    report = render_report(figures, 65.2, datetime(2026, 12, 5, 4, 0, tzinfo=UTC), "Load: 1.0")

    assert "| operator | 0.33 GB | 5 | 0.14 GB | 21 s | 1.2 s | 4 s | 0.0 s |" in report
    assert "| trainer | 6.31 GB | 8 | 6.05 GB | 145 s | 1.6 s | 59 s | 0.2 s |" in report
    assert "`debootstrap`, run once per machine before any of these: 65 s." in report
    assert report.startswith("# Image builds")


def test_a_skipped_base_is_said_so() -> None:
    report = render_report([], None, datetime(2026, 12, 5, tzinfo=UTC), "")

    assert "not measured (--skip-base)" in report


def test_gigabytes_are_decimal() -> None:
    assert gigabytes(6_310_000_000) == "6.31 GB"
