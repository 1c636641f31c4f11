"""What the benchmark results record about the machine: CPU model, core counts, library versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path

LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo, or what the platform module knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_line() -> str:
    """CPU model, cores (and how many this process may use), OS and Python."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable); "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def library_versions() -> str:
    """Versions of the libraries the figures depend on, as `name version, ...`."""
    return ", ".join(f"{name} {version(name)}" for name in LIBRARIES)
