"""Run Triton Inference Server on model_repository/ without Docker, from the nvidia-pytriton wheel.

    python -m scholarembed_server.triton --model /path/to/model --kind cpu

The wheel bundles a tritonserver 2.51 binary, the Python backend and backend stubs for Python 3.8
to 3.13; it is installed with --no-deps and never imported. Running that binary outside NVIDIA's
container takes, all prepared here and cached under .cache/triton:

- a backend directory with libtriton_python.so, triton_python_backend_utils.py and the
  triton_python_backend_stub built for this Python;
- LD_LIBRARY_PATH with this Python's libpython first, then the wheel's nvidia_pytriton.libs;
- numpy<2 for the stub only. Backend 2.51's utilities mis-read string tensors under numpy 2 (the
  stub aborts on the first request; fixed in later releases), while the project runs on numpy 2.
  The stub's embedded Python ignores PYTHONPATH, but takes the first `python3` on PATH as its home,
  virtualenvs included. So PATH starts with a small virtualenv, .cache/triton/stub-env-pyXY-<hash>,
  that holds numpy 1.x alone plus a .pth putting the scholarembed code this launcher runs (its
  server/ and client/ folders) and then this environment's site-packages behind it: model.py imports
  torch from this very environment and scholarembed_server from the same checkout as the launcher,
  and nothing else sees that numpy. (An EXECUTION_ENV_PATH tarball would need conda-pack and a second
  copy of torch.)
- for KIND_CPU (tests, CPU hosts), a temporary copy of the repository whose instance group says
  KIND_CPU; the checked-in config stays KIND_GPU for production.

Model settings go to model.py as SCHOLAREMBED_<KEY> environment variables, which override
config.pbtxt's parameters. The server binds to loopback on free ports unless told otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

MODEL_NAME = "scholarembed"
ROOT = Path(__file__).resolve().parents[3]
DEFAULT_REPOSITORY = ROOT / "model_repository"
DEFAULT_CACHE = ROOT / ".cache" / "triton"
STUB_NUMPY = "numpy>=1.26,<2"


class TritonNotFoundError(RuntimeError):
    """The tritonserver binary (from the nvidia-pytriton wheel) is not installed."""


@dataclass(frozen=True)
class TritonDistribution:
    """The files of the nvidia-pytriton wheel that are used: binary, Python backend, stub, shared libraries."""

    binary: Path
    python_backend: Path
    stub: Path
    libraries: Path

    @classmethod
    def find(cls) -> TritonDistribution:
        # find_spec locates the package without importing it (its own dependencies are not installed).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise TritonNotFoundError(
                "nvidia-pytriton is not installed: pip install --no-deps 'nvidia-pytriton==0.7.0'"
            )
        package = Path(spec.origin).parent
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        distribution = cls(
            binary=package / "tritonserver" / "bin" / "tritonserver",
            python_backend=package / "tritonserver" / "backends" / "python",
            stub=package / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
            libraries=package.parent / "nvidia_pytriton.libs",
        )
        for path in (distribution.binary, distribution.python_backend, distribution.stub, distribution.libraries):
            if not path.exists():
                raise TritonNotFoundError(f"{path} is missing (no stub for Python {version}, or a broken install)")
        return distribution


def _copy_if_changed(source: Path, target: Path) -> None:
    def stamp(path: Path) -> tuple[int, int]:
        return path.stat().st_size, path.stat().st_mtime_ns

    if target.exists() and stamp(target) == stamp(source):
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copy2(source, partial)
    os.replace(partial, target)  # atomic: a concurrent launch never sees half a file


def prepare_backends(distribution: TritonDistribution, cache_dir: Path) -> Path:
    """The --backend-directory: python/ with the backend library, its utilities and this Python's stub."""
    backend = cache_dir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy_if_changed(distribution.python_backend / name, backend / name)
    _copy_if_changed(distribution.stub, backend / "triton_python_backend_stub")
    return backend.parent


def prepare_stub_env(cache_dir: Path) -> Path:
    """A virtualenv for the stub: numpy<2 alone, then the scholarembed code this launcher runs, then this
    environment's site-packages behind them.

    The stub's embedded Python ignores PYTHONPATH (isolated configuration) but takes the first
    `python3` on PATH as its home, virtualenvs included. The model then imports scholarembed_server and
    scholarembed from the folders this launcher was imported from, whatever else is installed (an
    editable install of another checkout, say). One environment per such layer, built once and named
    by its hash; returns its bin folder.
    """
    code = [str(Path(__file__).resolve().parents[2]), str(Path(_origin("scholarembed")).parents[1])]
    base_sites = [path for path in site.getsitepackages() if Path(path).is_dir()]
    layer = (
        f"import sys; sys.path[:0] = {code!r}\n"
        + "import site; "
        + "; ".join(f"site.addsitedir({path!r})" for path in base_sites)
        + "\n"
    )
    digest = hashlib.sha1(layer.encode()).hexdigest()[:10]
    env_dir = cache_dir / f"stub-env-py{sys.version_info.major}{sys.version_info.minor}-{digest}"
    layer_file = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir)})) / "scholarembed-base.pth"
    if layer_file.exists():
        return env_dir / "bin"
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".stub-env-", dir=cache_dir))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(partial)], check=True)
    partial_site = Path(sysconfig.get_path("purelib", vars={"base": str(partial)}))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
         "--no-deps", "--target", str(partial_site), STUB_NUMPY],
        check=True,
    )  # fmt: skip
    # .pth lines run after the folder itself is on sys.path: numpy 1 first, everything else from here.
    (partial_site / layer_file.name).write_text(layer)
    try:
        partial.rename(env_dir)
    except OSError:  # a concurrent launch got there first
        shutil.rmtree(partial, ignore_errors=True)
    return env_dir / "bin"


def _origin(package: str) -> str:
    """Where a package would be imported from, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise TritonNotFoundError(f"{package} is not installed")
    return spec.origin


def environment(distribution: TritonDistribution, stub_bin: Path, settings: dict[str, str]) -> dict[str, str]:
    """tritonserver's environment, which the stub inherits."""
    env = dict(os.environ)
    libpython = sysconfig.get_config_var("LIBDIR")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libpython:
        raise TritonNotFoundError(f"{sys.executable} has no shared libpython, which the backend stub needs")

    def prepend(name: str, *paths: str) -> str:
        return os.pathsep.join([*paths, *([env[name]] if env.get(name) else [])])

    env["LD_LIBRARY_PATH"] = prepend("LD_LIBRARY_PATH", libpython, str(distribution.libraries))
    env["PATH"] = prepend("PATH", str(stub_bin))
    env.update({f"SCHOLAREMBED_{key.upper()}": value for key, value in settings.items()})
    return env


def cpu_repository(repository: Path, workdir: Path) -> Path:
    """A copy of the repository with KIND_CPU instead of KIND_GPU in the model's instance group."""
    copy = workdir / "model_repository"
    shutil.copytree(repository, copy, ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / MODEL_NAME / "config.pbtxt"
    text, count = re.subn(r"\bkind:\s*KIND_GPU\b", "kind: KIND_CPU", config.read_text())
    if count != 1:
        raise ValueError(f"{config}: expected one KIND_GPU instance group, found {count}")
    config.write_text(text)
    return copy


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class TritonServer:
    """A running tritonserver. Use as a context manager, or call stop()."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        host: str,
        ports: dict[str, int],
        log_path: Path | None,
        workdir: Path,
    ) -> None:
        self.process = process
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = ports["http"], ports["grpc"], ports["metrics"]
        self.log_path = log_path
        self._workdir = workdir

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_address(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def wait_ready(self, timeout: float) -> None:
        """Until /v2/health/ready says 200 (strict readiness: every model loaded and warm)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.output()[-6000:]}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {timeout}s:\n{self.output()[-6000:]}")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start(
    model: str | None = None,
    *,
    kind: str = "auto",
    matryoshka_dims: str | None = None,
    dtype: str | None = None,
    max_tokens: int | None = None,
    settings: Mapping[str, object] | None = None,
    host: str = "127.0.0.1",
    http_port: int = 0,
    grpc_port: int = 0,
    metrics_port: int = 0,
    repository: Path = DEFAULT_REPOSITORY,
    cache_dir: Path = DEFAULT_CACHE,
    log_path: Path | None = None,
    ready_timeout: float = 600,
    extra_args: Sequence[str] = (),
) -> TritonServer:
    """Start tritonserver on `repository` and return once the model is loaded and warm.

    Ports given as 0 are picked free. Settings left as None keep config.pbtxt's values (or the
    SCHOLAREMBED_* variables already set); `settings` sets any other of serve's (ServerConfig fields, e.g.
    {"max_tokens_per_request": 4096}). Output goes to `log_path`, or to this process's stdout.
    """
    distribution = TritonDistribution.find()
    backends = prepare_backends(distribution, cache_dir)
    named = {"model": model, "matryoshka_dims": matryoshka_dims, "dtype": dtype, "max_tokens": max_tokens}
    env = environment(
        distribution,
        prepare_stub_env(cache_dir),
        {key: str(value) for key, value in {**named, **(settings or {})}.items() if value is not None},
    )
    if kind == "auto":
        kind = "gpu" if cuda_available() else "cpu"
    workdir = Path(tempfile.mkdtemp(prefix="scholarembed-triton-"))
    served = cpu_repository(repository, workdir) if kind == "cpu" else repository

    attempts = 3 if 0 in (http_port, grpc_port, metrics_port) else 1
    for attempt in range(attempts):
        ports = {
            name: port or free_port(host)
            for name, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port))
        }
        command = [
            str(distribution.binary),
            f"--model-repository={served}",
            f"--backend-directory={backends}",
            "--disable-auto-complete-config",  # the config is complete; skipping this halves startup
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--http-address={host}", f"--http-port={ports['http']}",
            f"--grpc-address={host}", f"--grpc-port={ports['grpc']}",
            f"--metrics-address={host}", f"--metrics-port={ports['metrics']}",
            f"--allow-gpu-metrics={'true' if kind == 'gpu' else 'false'}",
            *extra_args,
        ]  # fmt: skip
        log: IO[bytes] | None = log_path.open("ab") if log_path else None
        try:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
        finally:
            if log:
                log.close()
        server = TritonServer(process, host, ports, log_path, workdir)
        try:
            server.wait_ready(ready_timeout)
            return server
        except RuntimeError:
            # A free port taken by someone else between the probe and the bind: try new ones.
            if attempt + 1 < attempts and "already in use" in server.output().lower():
                continue
            server.stop()
            raise
        except BaseException:
            server.stop()
            raise
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scholarembed_server.triton", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="hub id or folder (default: config.pbtxt's, or $SCHOLAREMBED_MODEL)")
    parser.add_argument("--matryoshka-dims", help="e.g. 768,512,256,128 (default: the model's)")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default: config.pbtxt's)")
    parser.add_argument("--max-tokens", type=int, help="longest input (default: the model's)")
    parser.add_argument(
        "--kind", choices=["auto", "cpu", "gpu"], default="auto", help="instance kind; auto: GPU if CUDA"
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address of all endpoints")
    parser.add_argument("--http-port", type=int, default=8000, help="0 = a free port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 = a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 = a free port")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="backend directory, stub numpy")
    args = parser.parse_args(argv)

    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    try:
        server = start(
            args.model,
            kind=args.kind,
            matryoshka_dims=args.matryoshka_dims,
            dtype=args.dtype,
            max_tokens=args.max_tokens,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            repository=args.model_repository,
            cache_dir=args.cache_dir,
        )
    except (TritonNotFoundError, RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"tritonserver ready: model {MODEL_NAME!r}, gRPC {server.grpc_address}, HTTP {server.http_url}, "
        f"metrics {server.metrics_url}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while server.process.poll() is None and not stop_requested:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return server.stop()
