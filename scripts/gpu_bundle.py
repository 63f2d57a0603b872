"""The GPU benchmark's dependencies, carried to a machine that can download nothing.

The GPU machine has its own Python 3.12 with a CUDA torch and no network, so
everything else the benchmark imports travels in one folder (`wheels-gpu/`,
git-ignored, about 47 MiB):

  wheels/   cp312 manylinux wheels of the project's runtime dependencies, pinned to
            the versions in this checkout's .venv; only what the services, the
            simulator and the benchmark import (funasr's optional model families pull
            in scipy, numba, scikit-learn and more, which funasr skips when absent)
  lib/      libopus (from a manylinux wheel) and redis-server with the two libraries
            that a bare system lacks, for machines without those system packages
  fsmn-vad/ the real FSMN-VAD weights; speech.npz: the simulated devices' speech
  protos/   the generated gRPC modules (services/protos is git-ignored)

    .venv/bin/python scripts/gpu_bundle.py build                      # here, online
    python3 scripts/gpu_bundle.py install --into /tmp/speechfront-gpu   # there, offline

`install` uses only the standard library: it unpacks the wheels into
<into>/site (skipping numpy where the machine already has one, so its own
compiled packages keep theirs), puts stand-ins where a system piece is
missing, copies the protos into the tree and prints the environment to use.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "wheels-gpu"
LIMIT_MIB = 60

# Found by running the services, the simulator and the benchmark with every other
# distribution made unimportable; torch and its own requirements are the machine's.
# torch-complex and charset-normalizer only silence funasr's and requests' warnings.
RUNTIME = [
    "numpy", "grpcio", "grpcio-health-checking", "protobuf", "fastapi", "starlette", "anyio",
    "idna", "pydantic", "pydantic-core", "pydantic-settings", "annotated-types",
    "typing-inspection", "annotated-doc", "python-dotenv", "uvicorn", "h11", "click",
    "httptools", "uvloop", "websockets", "watchfiles", "pyyaml", "python-multipart", "redis",
    "prometheus-client", "opuslib", "kaldi-native-fbank", "httpx", "httpcore", "certifi",
    "sentencepiece", "omegaconf", "antlr4-python3-runtime", "tqdm", "hydra-core", "packaging",
    "kaldiio", "librosa", "lazy-loader", "rapidfuzz", "six", "requests", "urllib3",
    "opentelemetry-api", "funasr", "torch-complex", "charset-normalizer",
]  # fmt: skip
# Published as source only (pure Python): built into wheels here.
SOURCE_ONLY = {"opuslib", "antlr4-python3-runtime"}
# Where the machine already has these, its copy stays: its compiled packages were built with it.
PREFER_MACHINE = {"numpy"}
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64"]  # fmt: skip
OPUS_WHEEL = "opuslib-next-bundled==0.1.1"
# redis-server's libraries that a machine without the redis package lacks; the rest
# (libc, libssl, libsystemd, ...) are part of any distribution's base.
REDIS_LIBS = ["libjemalloc.so.2", "liblzf.so.1", "libatomic.so.1"]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def build(out: Path) -> None:
    check_runtime_list()
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    pins = {name: importlib.metadata.version(name) for name in RUNTIME}
    binary = [f"{n}=={v}" for n, v in pins.items() if n not in SOURCE_ONLY]
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platform_args, "-d", str(wheels), *binary)  # fmt: skip
    _pip("wheel", "-q", "--no-deps", "-w", str(wheels),
         *(f"{n}=={pins[n]}" for n in sorted(SOURCE_ONLY)))  # fmt: skip
    lib = out / "lib"
    lib.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", *platform_args,
             "--python-version", "3.12", "-d", tmp, OPUS_WHEEL)  # fmt: skip
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as whl:
            name = next(n for n in whl.namelist() if n.endswith("/libopus.so"))
            (lib / "libopus.so.0").write_bytes(whl.read(name))
    redis = shutil.which("redis-server")
    if redis is None:
        print("warning: no redis-server here, so the bundle carries none")
    else:
        shutil.copy2(Path(redis).resolve(), lib / "redis-server")
        for soname in REDIS_LIBS:
            shutil.copy2(Path("/lib/x86_64-linux-gnu", soname).resolve(), lib / soname)
    fsmn = ROOT / "models" / "fsmn-vad"
    shutil.copytree(fsmn, out / "fsmn-vad", ignore=shutil.ignore_patterns("*.onnx"))
    generated = shutil.ignore_patterns("__pycache__", "*.pyi", ".generated")
    shutil.copytree(ROOT / "services" / "protos", out / "protos", ignore=generated)
    subprocess.run(
        [sys.executable, "-m", "bench.gpu.clips", "--write", str(out / "speech.npz")],
        check=True,
        cwd=ROOT,
    )
    manifest = {"python": "3.12", "pins": pins, "prefer_machine": sorted(PREFER_MACHINE)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    size = _size_mib(out)
    print(f"bundle {out}: {size:.1f} MiB, {len(list(wheels.glob('*.whl')))} wheels")
    if size > LIMIT_MIB:
        raise SystemExit(f"the bundle is {size:.1f} MiB, over its {LIMIT_MIB} MiB budget")


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _unpack(wheel: Path, site: Path) -> None:
    """A wheel install without pip: its files, with <name>.data/{purelib,platlib} merged."""
    with zipfile.ZipFile(wheel) as whl:
        for member in whl.infolist():
            parts = member.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts and headers: nothing imports them
                parts = parts[2:]
            target = site.joinpath(*parts)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(whl.read(member))
            if member.external_attr >> 16 & 0o111:
                target.chmod(0o755)


_OPUS_HOOK = """\
# Written by scripts/gpu_bundle.py: this machine has no libopus, so opuslib gets the bundle's.
import ctypes.util

_find = ctypes.util.find_library


def _find_library(name):
    return {opus!r} if name == "opus" else _find(name)


ctypes.util.find_library = _find_library
"""

_AV_STANDIN = '''\
"""Stand-in written by scripts/gpu_bundle.py: PyAV (36 MiB) is not carried.

The gateway imports it for compressed audio uploads, which no simulated device
makes; using it here fails loudly instead of silently.
"""


def __getattr__(name):
    raise RuntimeError("PyAV is not installed in this benchmark environment")
'''

_REDIS_WRAPPER = """\
#!/bin/sh
# Written by scripts/gpu_bundle.py: the bundle's redis-server with its own libraries.
LD_LIBRARY_PATH="{lib}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "{lib}/redis-server" "$@"
"""


def install(bundle: Path, into: Path, bundled: bool = False, tree: Path = ROOT) -> dict[str, str]:
    """Unpack the bundle for this Python; returns the environment the benchmark needs.

    ``bundled`` uses the bundle's libopus and redis-server even where the machine has its
    own (to prove the bundle complete on a machine that has them). ``tree`` is the checkout
    that gets the generated gRPC modules and goes on PYTHONPATH.
    """
    manifest = json.loads((bundle / "manifest.json").read_text())
    if sys.version_info[:2] != (3, 12):
        print(f"warning: the bundle is for Python 3.12, this is {sys.version.split()[0]}")
    site, lib, bin_dir = into / "site", into / "lib", into / "bin"
    shutil.rmtree(into, ignore_errors=True)
    for d in (site, lib, bin_dir):
        d.mkdir(parents=True)
    # Readable by everyone: the local cluster runs Redis as `nobody` when started by root.
    into.chmod(0o755)
    for d in (site, lib, bin_dir):
        d.chmod(0o755)
    installed, kept = [], []
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        name = _dist_name(wheel)
        if name in manifest["prefer_machine"] and importlib.util.find_spec(name) is not None:
            kept.append(name)
            continue
        _unpack(wheel, site)
        installed.append(name)
    print(f"unpacked {len(installed)} wheels into {site}; kept the machine's {kept or 'none'}")
    import ctypes.util

    if bundled or ctypes.util.find_library("opus") is None:
        shutil.copy2(bundle / "lib" / "libopus.so.0", lib / "libopus.so.0")
        hook = _OPUS_HOOK.format(opus=str(lib / "libopus.so.0"))
        (site / "sitecustomize.py").write_text(hook)
        print("opuslib will load the bundle's libopus")
    if importlib.util.find_spec("av") is None:
        (site / "av").mkdir()
        (site / "av" / "__init__.py").write_text(_AV_STANDIN)
    env = {
        "PYTHONPATH": os.pathsep.join([str(site), str(tree)]),
        "SF_BENCH_FSMN_DIR": str(bundle.resolve() / "fsmn-vad"),
        "SF_BENCH_CLIPS": str(bundle.resolve() / "speech.npz"),
    }
    if bundled or shutil.which("redis-server") is None:
        if not (bundle / "lib" / "redis-server").is_file():
            raise SystemExit("no redis-server on this machine and none in the bundle")
        for name in ["redis-server", *REDIS_LIBS]:
            shutil.copy2(bundle / "lib" / name, lib / name)
        wrapper = bin_dir / "redis-server"
        wrapper.write_text(_REDIS_WRAPPER.format(lib=lib))
        wrapper.chmod(0o755)
        check = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True)
        if check.returncode != 0:
            # Most likely a system library the bundle assumes (libssl3, libsystemd0) is absent.
            raise SystemExit(f"the bundled redis-server does not run here:\n{check.stderr}")
        env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        print("the local cluster will run the bundle's redis-server")
    protos = tree / "services" / "protos"
    protos.mkdir(parents=True, exist_ok=True)
    for module in (bundle / "protos").glob("*.py"):
        shutil.copy2(module, protos / module.name)
    (into / "env.sh").write_text("".join(f"export {k}='{v}'\n" for k, v in env.items()))
    return env


# What every process of the benchmark imports first; a failure here names the missing piece
# at once instead of in a service's log a minute into the run.
IMPORT_CHECK = (
    "import torch, numpy, grpc, fastapi, uvicorn, opuslib, redis, kaldi_native_fbank;"
    "import funasr.auto.auto_model, funasr.models.sense_voice.model,"
    " funasr.models.eres2net.eres2netv2, funasr.models.campplus.utils,"
    " funasr.models.fsmn_vad_streaming.model, funasr.frontends.wav_frontend,"
    " funasr.tokenizer.sentencepiece_tokenizer;"
    "import services.cli, services.cluster, services.gateway.app, services.asr.server,"
    " services.asr.sensevoice, services.speaker.server, services.speaker.eres2net,"
    " services.vad.server, services.vad.fsmn_batched, services.simulator.device,"
    " bench.gpu.sweep, bench.gpu.loadgen, bench.gpu.direct, bench.gpu.model_table"
)
# torch's own requirements come with the machine's torch; PyAV gets the installer's stand-in.
MACHINE = {
    "torch", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2",
    "markupsafe", "fsspec", "setuptools", "triton", "av", "speechfront",
}  # fmt: skip
# Runs the import check with every distribution outside the bundle and the machine's made
# unimportable: a dependency someone adds to the services fails here, not on the GPU day.
_BLOCKER = """
import importlib.abc, importlib.metadata, sys
allowed = set(sys.argv[1].split(","))
owners = importlib.metadata.packages_distributions()
def norm(name): return name.lower().replace("_", "-")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        dists = owners.get(top)
        if dists and top not in sys.stdlib_module_names and not (
            {norm(d) for d in dists} & allowed or any(norm(d).startswith(("nvidia-", "cuda-"))
            for d in dists)
        ):
            raise ImportError(f"{top} (from {dists}) is not in the GPU bundle")
        return None
sys.meta_path.insert(0, Block())
exec(sys.argv[2])
"""


def check_runtime_list(tree: Path = ROOT) -> None:
    """The bundle's distribution list covers what the benchmark imports (run in the .venv)."""
    allowed = ",".join(sorted({*RUNTIME, *MACHINE}))
    run = subprocess.run(
        [sys.executable, "-c", _BLOCKER, allowed, IMPORT_CHECK],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"the GPU bundle's RUNTIME list misses an import:\n{run.stderr[-2000:]}")


def check_imports(env: dict[str, str], tree: Path = ROOT) -> None:
    merged = {**os.environ, **env}
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], env=merged, cwd=tree, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise SystemExit(f"the installed environment does not import:\n{run.stderr[-3000:]}")
    print("the services, the simulator and the benchmark import")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="gather the bundle (online, in the project's .venv)")
    b.add_argument("--out", type=Path, default=BUNDLE)
    i = sub.add_parser("install", help="unpack it for this Python (offline)")
    i.add_argument("--bundle", type=Path, default=BUNDLE)
    i.add_argument("--into", type=Path, default=Path(tempfile.gettempdir()) / "speechfront-gpu")
    i.add_argument(
        "--bundled",
        action="store_true",
        help="the bundle's libopus and redis-server even if present",
    )
    args = parser.parse_args()
    if args.command == "build":
        build(args.out)
    else:
        env = install(args.bundle, args.into, args.bundled)
        check_imports(env)
        print(f"environment in {args.into / 'env.sh'}:")
        for key, value in env.items():
            print(f"  {key}={value}")


if __name__ == "__main__":
    main()
