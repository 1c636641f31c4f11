"""The GGUF export: llama.cpp's own converter, taken from a pinned release, turns the merged model into one GGUF file.

The converter (`convert_hf_to_gguf.py` and its `conversion` package) is not on PyPI by itself, and it needs the gguf
library of its own commit (PyPI's `gguf` of the same version number lags behind it). Both come from the
llama-cpp-python source release pinned here, fetched from PyPI and checked against its sha256; `install` unpacks them
into a directory that the trainer image and `make venv` create once. Run with
`python -m kubetune_trainer.publish.gguf_export install DIR` (standard library only, so an image layer can run it
before the rest of the trainer is copied in).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# llama-cpp-python 0.3.36's source release (the same one the test bed builds its OpenAI-compatible server from).
CONVERTER_RELEASE = "llama_cpp_python-0.3.36"
CONVERTER_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    "llama_cpp_python-0.3.36.tar.gz"
)
CONVERTER_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Inside the release: llama.cpp's tree; what the converter needs of it, and where each part goes under DIR.
LLAMA_CPP_DIR = f"{CONVERTER_RELEASE}/vendor/llama.cpp/"
CONVERTER_PARTS = {
    "convert_hf_to_gguf.py": "convert_hf_to_gguf.py",
    "conversion/": "conversion/",
    "gguf-py/gguf/": "gguf/",
    "LICENSE": "LICENSE",
}
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
ENV_CONVERTER_DIR = "KUBETUNE_GGUF_CONVERTER"
DEFAULT_CONVERTER_DIR = Path("/opt/gguf-converter")
# The converter's last lines of output name what failed; a bounded tail goes into the error.
ERROR_TAIL_CHARS = 2000


class GgufExportError(RuntimeError):
    """The converter is missing or failed."""

    reason = "ExportError"  # kubetune.conditions.TRAINER_REASON_EXPORT_ERROR (this module imports no kubetune)


@dataclass(frozen=True)
class GgufFile:
    """The written file and the weight type it holds."""

    path: Path
    quantization: str


def gguf_file_name(quantization: str) -> str:
    """model-<quantization>.gguf: the name says what is inside, as llama.cpp's own releases do."""
    return f"model-{quantization}.gguf"


def member_target(name: str) -> str | None:
    """Where a member of the release goes under DIR, or None for the parts the converter does not need."""
    if not name.startswith(LLAMA_CPP_DIR):
        return None
    inner = name[len(LLAMA_CPP_DIR) :]
    for source, target in CONVERTER_PARTS.items():
        if not source.endswith("/") and inner == source:
            return target
        if source.endswith("/") and inner.startswith(source) and inner != source:
            return target + inner[len(source) :]
    return None


def converter_dir() -> Path:
    """The unpacked converter: $KUBETUNE_GGUF_CONVERTER, else the image's /opt/gguf-converter."""
    return Path(os.environ.get(ENV_CONVERTER_DIR) or DEFAULT_CONVERTER_DIR)


def converter_missing(directory: Path) -> str | None:
    """Why the converter cannot run from `directory`, or None when it can."""
    if not (directory / CONVERTER_SCRIPT).is_file() or not (directory / "gguf" / "__init__.py").is_file():
        return (
            f"llama.cpp's GGUF converter is not in {directory}: set {ENV_CONVERTER_DIR} to a directory made by "
            "`python -m kubetune_trainer.publish.gguf_export install DIR` (the trainer image has it in "
            f"{DEFAULT_CONVERTER_DIR})"
        )
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_converter(release: Path, target: Path) -> list[str]:
    """The converter's files from the release archive into `target`; their paths under it."""
    written = []
    with tarfile.open(release) as archive:
        for member in archive.getmembers():
            relative = member_target(member.name)
            if relative is None or not member.isfile():
                continue
            source = archive.extractfile(member)
            assert source is not None
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(source.read())
            written.append(relative)
    return written


def install(target: Path, url: str = CONVERTER_URL, sha256: str = CONVERTER_SHA256) -> Path:
    """Download the pinned release (checked against its sha256) and unpack the converter into `target` (once)."""
    if converter_missing(target) is None:
        return target
    with tempfile.TemporaryDirectory() as scratch:
        release = Path(scratch) / f"{CONVERTER_RELEASE}.tar.gz"
        print(f"downloading {url}", file=sys.stderr)
        urllib.request.urlretrieve(url, release)
        actual = sha256_of(release)
        if actual != sha256:
            raise GgufExportError(f"{url}: sha256 {actual}, expected {sha256}")
        staging = target.with_name(target.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        unpack_converter(release, staging)
        os.replace(staging, target)
    problem = converter_missing(target)
    if problem:
        raise GgufExportError(problem)
    return target


def converter_command(model_dir: Path, outfile: Path, quantization: str, directory: Path) -> list[str]:
    """The converter's command line: the merged model in, one GGUF file of `quantization` out."""
    return [
        sys.executable,
        str(directory / CONVERTER_SCRIPT),
        str(model_dir),
        "--outtype",
        quantization,
        "--outfile",
        str(outfile),
    ]


def converter_env(directory: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with the converter's own gguf library first on the path (not PyPI's older one)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), env.get("PYTHONPATH")]))
    return env


def tail(text: str, limit: int = ERROR_TAIL_CHARS) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def export_gguf(model_dir: Path, out_dir: Path, quantization: str, directory: Path | None = None) -> GgufFile:
    """Convert a Hugging Face model directory (the merged model) into out_dir/model-<quantization>.gguf."""
    directory = directory or converter_dir()
    problem = converter_missing(directory)
    if problem:
        raise GgufExportError(problem)
    out_dir.mkdir(parents=True, exist_ok=True)
    outfile = out_dir / gguf_file_name(quantization)
    completed = subprocess.run(
        converter_command(model_dir, outfile, quantization, directory),
        env=converter_env(directory),
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0 or not outfile.is_file():
        raise GgufExportError(
            f"llama.cpp's converter failed on {model_dir} (exit {completed.returncode}): "
            f"{tail(completed.stderr.strip() or completed.stdout.strip())}"
        )
    return GgufFile(path=outfile, quantization=quantization)


def main(argv: Iterable[str]) -> int:
    args = list(argv)
    if len(args) != 2 or args[0] != "install":
        print("usage: python -m kubetune_trainer.publish.gguf_export install DIR", file=sys.stderr)
        return 2
    print(install(Path(args[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
