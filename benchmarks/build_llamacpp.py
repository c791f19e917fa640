"""Build llama.cpp's ``llama-server`` from the package registry, for ``benchmarks/peers_llamacpp.py``.

llama-cpp-python's source distribution on PyPI vendors llama.cpp; this downloads that sdist (pinned below),
unpacks it into ``DEST`` and compiles the vendored tree's server with the machine's cmake and C++ compiler
(native CPU flags, no network features). Nothing is installed into the Python environment: the peer is a
benchmark-only binary, like TRL is a benchmark-only extra. About 10 minutes on 2 cores.

    .venv/bin/python benchmarks/build_llamacpp.py --dest ~/llamacpp        # prints the server's path
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its sdist vendors llama.cpp at the commit its release pinned
TARGETS = ["llama-server", "llama-bench"]


def build(dest: Path, jobs: int = 2) -> Path:
    dest = dest.expanduser().resolve()
    server = dest / "build" / "bin" / "llama-server"
    if server.exists():
        return server
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH: install cmake and a C++ compiler (Debian: cmake g++)")
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", str(dest)], check=True)
    src = dest / f"llama_cpp_python-{VERSION}"
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(dest, filter="data")
    tree = src / "vendor" / "llama.cpp"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(tree), "-B", str(dest / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(dest / "build"), "-j", str(jobs), "--target", *TARGETS], check=True)
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, required=True, help="a folder outside the checkout for the sources and the build")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    print(build(a.dest, a.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
