"""The product's images: their sizes, a cold and a warm build, and a first push to an empty registry.

    python -m bench.image_builds

Builds operator/Dockerfile and trainer-image/Dockerfile as `make images` does (buildah, the local Debian base, the
host's uv cache), under throwaway tags that are removed afterwards:

- cold: `--no-cache`, so every step runs again (the wheels still come from the host's uv cache, as on any machine
  where `make venv` ran; the base image is reused, and `debootstrap` of its root filesystem is timed on its own);
- warm: a copy of the build context in which one source file changed, as after an edit: buildah's layer cache keeps
  every layer up to the code;
- push: the built image into a registry with empty storage (every layer compressed and sent), then again (nothing).

Results: a markdown table on stdout and in bench/results/image_builds.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bench.figures import load_line, markdown_table
from bench.machine import cpu_line

if TYPE_CHECKING:
    from tests.testbed.images import ImageRecipe

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "bench" / "results" / "image_builds.md"
BENCH_TAG_PREFIX = "localhost/kubetune-bench"
# What the Dockerfiles copy: a build context of these alone behaves as the repository does.
CONTEXT_PATHS = ("kubetune", "operator", "trainer-image")
EDITED_FILE = "kubetune/__init__.py"


@dataclass(frozen=True)
class ImageFigures:
    """One image: its size, its layers and how long each way of building and pushing it took."""

    name: str
    size_bytes: int
    layers: int
    largest_layer_bytes: int
    cold_seconds: float
    warm_seconds: float
    first_push_seconds: float
    second_push_seconds: float


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB"


def layer_sizes(image: str) -> list[int]:
    """Uncompressed size of each layer that adds files, from the image's history."""
    history = json.loads(subprocess.run(
        ["podman", "history", "--format", "json", image], capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    return [int(entry.get("size") or 0) for entry in history if int(entry.get("size") or 0) > 0]


def copy_context(target: Path) -> Path:
    """The parts of the repository the Dockerfiles copy, without byte-code caches."""
    for name in CONTEXT_PATHS:
        shutil.copytree(REPO_ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(argv[:4])} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.monotonic() - started


def render_report(figures: list[ImageFigures], base_seconds: float | None, started: datetime, load: str) -> str:
    rows = [
        [
            f.name, gigabytes(f.size_bytes), str(f.layers), gigabytes(f.largest_layer_bytes),
            f"{f.cold_seconds:.0f} s", f"{f.warm_seconds:.1f} s", f"{f.first_push_seconds:.0f} s",
            f"{f.second_push_seconds:.1f} s",
        ]
        for f in figures
    ]  # fmt: skip
    header = ["image", "size", "layers", "largest layer", "cold build", "warm build", "first push", "push again"]
    base = f"{base_seconds:.0f} s" if base_seconds is not None else "not measured (--skip-base)"
    return "\n".join(
        [
            "# Image builds: sizes, cold and warm builds, pushes",
            "",
            "Command: `python -m bench.image_builds`.",
            "",
            f"Measured {started.strftime('%Y-%m-%d %H:%M UTC')} on {cpu_line()}.",
            load,
            "",
            *markdown_table(header, rows, right=(1, 2, 3, 4, 5, 6, 7)),
            "",
            "Sizes are uncompressed (what the node stores). A cold build rebuilds every layer with `--no-cache`; the "
            "wheels come from the host's uv cache, as after `make venv`. A warm build follows a one-line change of "
            f"`{EDITED_FILE}`: only the layers that copy code run again. A first push compresses and sends every "
            "layer to a registry with empty storage (the trainer's after the operator's: the Debian base is there); a "
            "push again sends nothing. The local Debian base's "
            f"`debootstrap`, run once per machine before any of these: {base}.",
            "",
        ]
    )


def build(recipe: ImageRecipe, tag: str, context: Path, cold: bool) -> float:
    """Seconds to build `recipe` from `context` as `tag`: cold without any cached layer (and keeping none), warm with
    buildah's layer cache as `make images` left it."""
    from tests.testbed import images

    uv = images.uv_binary()
    ca_bundle = images.HOST_CA_BUNDLE if images.HOST_CA_BUNDLE.exists() else None
    relocated = replace(recipe, tag=tag, dockerfile=context / recipe.dockerfile.relative_to(REPO_ROOT))
    argv = images.build_command(
        relocated, images.local_uv_image(images.uv_version(uv)), images.host_uv_cache(uv), ca_bundle, context
    )
    if cold:
        argv[argv.index("--layers")] = "--no-cache"
    return timed(argv)


@click.command()
@click.option("--skip-base", is_flag=True, help="Do not time a build of the local Debian base.")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS_FILE, show_default=True,
    help="Where the markdown goes.",
)  # fmt: skip
def main(skip_base: bool, output: Path) -> None:
    """Build, measure and push the operator and trainer images; print the figures."""
    from tests.testbed import images
    from tests.testbed.registry import LocalRegistry

    started = datetime.now(UTC)
    loads = [("start", os.getloadavg())]
    base_seconds = None
    if not skip_base:
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-base-") as scratch:
            rootfs = Path(scratch) / "rootfs"
            base_seconds = timed(images.debootstrap_command(rootfs))
    figures = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        context = copy_context(Path(scratch) / "context")
        registry = LocalRegistry(log_dir=Path(scratch) / "registry-logs", storage_dir=Path(scratch) / "registry")
        registry.start()
        try:
            for recipe in images.RECIPES.values():
                tag = f"{BENCH_TAG_PREFIX}/{recipe.name}:bench"
                click.echo(f"cold build of {recipe.name}", err=True)
                cold = build(recipe, f"{tag}-cold", context, cold=True)
                subprocess.run(["buildah", "rmi", f"{tag}-cold"], capture_output=True, check=False)
                (context / EDITED_FILE).write_text((context / EDITED_FILE).read_text() + f"# {time.time()}\n")
                click.echo(f"warm build of {recipe.name}", err=True)
                warm = build(recipe, tag, context, cold=False)
                pushes = []
                for _ in range(2):
                    registry.push(f"containers-storage:{tag}", f"kubetune-bench/{recipe.name}:bench")
                    pushes.append(registry.last_push_seconds)
                layers = layer_sizes(tag)
                figures.append(
                    ImageFigures(
                        recipe.name, images.image_size_bytes(tag), len(layers), max(layers), cold, warm, *pushes
                    )
                )
                subprocess.run(["buildah", "rmi", tag], capture_output=True, check=False)
        finally:
            registry.stop()
    loads.append(("end", os.getloadavg()))
    report = render_report(figures, base_seconds, started, load_line(loads, os.cpu_count() or 1))
    click.echo(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
