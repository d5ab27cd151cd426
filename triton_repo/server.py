"""``deris serve``: run a Triton Inference Server on a repository from ``deris-export triton-repo``.

A ``tritonserver`` on PATH (e.g. in an NGC container, with the TensorRT and ONNX Runtime backends)
is used as is. Otherwise the server bundled in the ``nvidia-pytriton`` wheel is run: it has only the
python backend, so it serves ``--backend python`` repositories. The recipe (docs/deployment.md, "The pinned stack"):

* the wheel's ``backends`` folder is copied to a work folder, with the python-backend stub for this
  interpreter's version put into ``backends/python``;
* ``PATH`` starts with this interpreter's ``bin``: the stub embeds libpython and finds its
  ``sys.prefix`` by looking ``python3`` up on PATH (it ignores PYTHONPATH), so this puts the
  python models into this environment, with ``deris``, numpy<2 and onnxruntime;
* ``LD_LIBRARY_PATH`` starts with this interpreter's ``LIBDIR`` (the stub's libpython) and the
  wheel's ``nvidia_pytriton.libs``.

Stopping (docs/serving.md, "Stopping the server"). Left to itself, tritonserver 2.51 handles SIGTERM
badly for an ensemble: its composing models refuse new work as soon as the stop begins, so an ensemble
request between two steps fails ("Server is stopping, scheduler for model has stopped accepting new
inference requests") or hangs until the exit timeout; and any idle HTTP keep-alive connection makes it
wait its whole exit timeout, after which it exits 1 without unloading the models ("Exit timeout
expired"; the python stubs log "Non-graceful termination detected"). So :meth:`TritonServer.stop`
drains the server itself before signalling it, through the model-repository API (explicit model
control, restricted to a per-run key):

1. unload the entry models (those no ensemble uses as a step, i.e. ``deris``): new requests are
   refused and readiness goes false at once, while the requests in flight finish their remaining
   steps on the composing models, which are still loaded;
2. once they have, unload the composing models (the python stubs finish cleanly);
3. SIGTERM tritonserver, whose own exit timeout is then only a short linger for idle HTTP
   keep-alive connections, which it closes (they never close by themselves).

Readiness is polled with a client that is closed after each poll, so that it leaves no idle connection.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any

from deris.cli_support import EXIT_CHECK_FAILED, EXIT_OK, ToolError, add_command, add_quiet

if TYPE_CHECKING:  # imported where used: `deris --help` must not wait for tritonclient
    from tritonclient.http import InferenceServerClient

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_HOST = "127.0.0.1"
# The seconds a stop gives the requests in flight and the model unloading; with _EXIT_GRACE_S on
# top, still under Kubernetes' default grace period (30 s).
DEFAULT_EXIT_TIMEOUT_S = 20.0
# tritonserver's own --exit-timeout-secs. By the time it gets SIGTERM from stop() nothing is in flight
# and no model is loaded, so all it waits for is idle HTTP keep-alive connections, which only its
# exit closes. One second rather than zero tolerates a health probe that races the signal.
TRITON_EXIT_TIMEOUT_S = 1
# After SIGTERM, how long tritonserver gets at least to exit by itself before it is killed.
_EXIT_GRACE_S = 5.0
_POLL_S = 0.1
# The model-repository API (load / unload / index) needs this header with the run's secret key, so
# that only stop() can unload models; without explicit model control (the default, which `deris
# serve` replaces) nobody could.
STOP_KEY_HEADER = "deris-stop-key"
# tritonserver options that stop() relies on; set through --server-arg they would break it.
_MANAGED_OPTIONS = ("--model-control-mode", "--load-model", "--exit-timeout-secs")
# Model kinds of `deris-export triton-repo` that need a backend the bundled server lacks.
_OTHER_BACKENDS = re.compile(r'^platform:\s*"(tensorrt_plan|onnxruntime_onnx)"', re.MULTILINE)


def onnxruntime_pool_args(repo: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """tritonserver arguments that give a repository's ``onnxruntime_onnx`` models one shared thread
    pool of the largest ``intra_op_thread_count`` among them (none for a repository without such
    models, or when ``extra_args`` configure the onnxruntime backend themselves).

    Each of those models otherwise has its own pools of that size on the same cores, and an ensemble
    runs them one after the other: the pool that just finished spins on the cores the next model
    needs. Triton's ONNX Runtime backend has no per-model switch for spinning (its parameters are the
    thread counts, the execution mode, the memory arena and the graph optimisation level); one global
    pool is its way to keep a chain of models from oversubscribing the cores, which is what turning
    spinning off does in one process (export/ort_optimize.session_options).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if any(arg.startswith("--backend-config=onnxruntime,") for arg in extra_args):
        return []
    threads = []
    for path in sorted(repo.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        if config.platform == "onnxruntime_onnx":
            count = config.parameters["intra_op_thread_count"].string_value if "intra_op_thread_count" in config.parameters else ""
            threads.append(int(count) if count.isdigit() else 0)
    if not threads:
        return []
    args = ["--backend-config=onnxruntime,enable-global-threadpool=1", "--backend-config=onnxruntime,inter_op_thread_count=1"]
    if max(threads) > 0:  # 0: ONNX Runtime's default, one thread per core
        args.append(f"--backend-config=onnxruntime,intra_op_thread_count={max(threads)}")
    return args


class ServerError(ToolError):
    """The server could not be found, started, or did not become ready; the message says why."""


def bundled_server_dir() -> Path:
    """``pytriton/tritonserver`` of the installed ``nvidia-pytriton`` wheel, found without importing it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServerError(
            "no tritonserver on PATH and nvidia-pytriton is not installed; install the serve extra "
            "(pip install 'deris[serve]') or run inside a Triton server container"
        )
    folder = Path(spec.origin).parent / "tritonserver"
    if not (folder / "bin" / "tritonserver").is_file():
        raise ServerError(f"the nvidia-pytriton installation has no server binary at {folder / 'bin' / 'tritonserver'}")
    return folder


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the server when the thread that started it dies.

    Otherwise a crashed or killed caller (a test run, say) leaves tritonserver running and holding
    its ports. Linux only; start servers from a thread that outlives them (the main thread in the
    CLI and the tests). libc is loaded here, in the parent: the child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return set_death_signal


class TritonServer:
    """One ``tritonserver`` process serving ``repo``.

    >>> with TritonServer("repo", http_port=8000, grpc_port=8001) as server:
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)

    ``binary``: a ``tritonserver`` to run; by default the one on PATH, else the bundled one.
    ``log``: where the server's stdout/stderr go (a file object); None means inherit (the terminal).
    ``extra_args`` are appended to the server's command line (e.g. ``--backend-config=...``).
    ``exit_timeout``: the seconds :meth:`stop` gives the requests in flight and the unloading.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        *,
        http_port: int = DEFAULT_HTTP_PORT,
        grpc_port: int = DEFAULT_GRPC_PORT,
        host: str = DEFAULT_HOST,
        binary: str | os.PathLike[str] | None = None,
        log: IO[str] | None = None,
        extra_args: Sequence[str] = (),
        exit_timeout: float = DEFAULT_EXIT_TIMEOUT_S,
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir() or not any(self.repo.glob("*/config.pbtxt")):
            raise ServerError(
                f"{self.repo} is not a Triton model repository (no <model>/config.pbtxt); "
                "generate one with `deris-export triton-repo`"
            )
        self.http_port, self.grpc_port, self.host = http_port, grpc_port, host
        self.binary = Path(binary) if binary is not None else None
        self.log = log
        managed = [arg for arg in extra_args if arg.split("=", 1)[0] in _MANAGED_OPTIONS]
        if managed:
            raise ServerError(
                f"{' '.join(managed)}: deris sets {', '.join(_MANAGED_OPTIONS)} itself, to drain in-flight requests "
                "on stop (docs/serving.md, \"Stopping the server\"); use --exit-timeout for the stop's time limit"
            )
        self.extra_args = list(extra_args)
        if exit_timeout <= 0:
            raise ValueError(f"exit_timeout must be a positive number of seconds, got {exit_timeout}")
        self.exit_timeout = exit_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._stop_key = secrets.token_hex(16)
        self._ready = False

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def _client_host(self) -> str:
        # A server bound to every interface is reached locally through the loopback address.
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment to run; prepares the bundled server's work folder."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        args = [
            f"--model-repository={self.repo}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            "--allow-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            # Every model loaded at start, as without model control, but stop() may unload them.
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-restricted-api=model-repository:{STOP_KEY_HEADER}={self._stop_key}",
            f"--grpc-restricted-protocol=model-repository:{STOP_KEY_HEADER}={self._stop_key}",
            f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}",
        ]
        binary = self.binary or (Path(found) if (found := shutil.which("tritonserver")) else None)
        if binary is None:
            binary = self._prepare_bundled(env, args)
        return [str(binary), *args, *onnxruntime_pool_args(self.repo, self.extra_args), *self.extra_args], env

    def _prepare_bundled(self, env: dict[str, str], args: list[str]) -> Path:
        dist = bundled_server_dir()
        needs = sorted(
            {m.group(1) for path in self.repo.glob("*/config.pbtxt") if (m := _OTHER_BACKENDS.search(path.read_text()))}
        )
        if needs:
            raise ServerError(
                f"{self.repo} has {' and '.join(needs)} models, but there is no tritonserver on PATH and the one bundled "
                "in nvidia-pytriton has only the python backend; run where a full tritonserver is on PATH (e.g. an NGC "
                "tritonserver container), or generate the repository with `--backend python`"
            )
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton has no python-backend stub for Python {version} ({stub})")
        self._workdir = tempfile.TemporaryDirectory(prefix="deris-tritonserver-")
        backends = Path(self._workdir.name) / "backends"
        shutil.copytree(dist / "backends", backends)
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        libs = [str(sysconfig.get_config_var("LIBDIR")), str(dist.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        # The bundled server has no GPU pinned memory to offer on CPU machines; this silences its warning.
        args += [f"--backend-directory={backends}", "--pinned-memory-pool-byte-size=0"]
        return dist / "bin" / "tritonserver"

    def start(self) -> None:
        if self.process is not None:
            raise ServerError("the server was already started")
        cmd, env = self.command()
        try:
            # A session of its own: a Ctrl-C in the terminal reaches only us, and we forward it once.
            self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT if self.log else None,
                                            start_new_session=True, preexec_fn=_die_with_parent())
        except OSError as exc:
            self.stop()
            raise ServerError(f"cannot run {cmd[0]}: {exc}") from exc

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Wait until every model is loaded (strict readiness); return the seconds it took."""
        import tritonclient.http as httpclient

        if self.process is None:
            raise ServerError("the server was not started")
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready{self._log_hint()}")
            try:
                with httpclient.InferenceServerClient(self.http_url) as client:
                    if client.is_server_ready():
                        self._ready = True
                        return time.monotonic() - start
            except Exception:  # not listening yet: connection refused or reset
                pass
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        name = getattr(self.log, "name", None)
        if isinstance(name, str) and Path(name).is_file():
            self.log.flush()  # type: ignore[union-attr]
            return f"; server log {name} ends with:\n" + "\n".join(Path(name).read_text(errors="replace").splitlines()[-30:])
        return "; see the server log above"

    def send_signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float | None = None) -> int | None:
        """tritonserver's exit code once it has exited; None if it still runs after ``timeout`` s."""
        if self.process is None:
            raise ServerError("the server was not started")
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """Stop gracefully; return tritonserver's exit code (None if it was never started).

        Once the server was ready: new requests are refused at once, the requests in flight finish,
        the models are unloaded, then tritonserver exits and closes idle keep-alive connections (see
        the module docstring). The drain gets ``exit_timeout`` s: what is still in flight then fails
        and tritonserver exits 1 (it is killed if it has not exited by the deadline, or
        ``_EXIT_GRACE_S`` s after the signal if that is later). A server that was not ready yet just
        gets SIGTERM. Each step is reported on the log.
        """
        try:
            if self.process is None:
                return None
            start = time.monotonic()
            deadline = start + self.exit_timeout
            if self._ready and self.process.poll() is None:
                self._ready = False
                if self._drain(deadline):
                    self._say(f"drained in {time.monotonic() - start:.1f} s: every request in flight was answered "
                              "and every model unloaded; stopping tritonserver")
            self.send_signal(signal.SIGTERM)
            try:
                self.process.wait(max(deadline - time.monotonic(), _EXIT_GRACE_S))
            except subprocess.TimeoutExpired:
                self._say(f"tritonserver did not exit within {time.monotonic() - start:.0f} s of the stop; killing it")
                self.process.kill()
                self.process.wait()
            return self.process.returncode
        finally:
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def _drain(self, deadline: float) -> bool:
        """Unload the entry models, then the others, each time waiting until their requests are done.

        Returns whether both finished before ``deadline``; reports why not. A server that exits or
        stops answering meanwhile ends the drain (tritonserver's own exit code then tells the rest).
        """
        import http.client

        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        try:
            # Closed before tritonserver is signalled: an open connection would hold up its exit.
            with httpclient.InferenceServerClient(self.http_url, network_timeout=self.exit_timeout) as client:
                loaded = [m["name"] for m in self._index(client) if m.get("state") == "READY"]
                steps = {step["model_name"] for name in loaded
                         for step in client.get_model_config(name).get("ensemble_scheduling", {}).get("step", [])}
                entries = [name for name in loaded if name not in steps]
                self._unload(client, entries)
                self._say(f"stopping: new requests to {', '.join(entries)} are refused; the requests in flight get "
                          f"up to {self.exit_timeout:g} s to finish")
                if not self._wait_unloaded(client, entries, deadline, "still had requests in flight, which fail"):
                    return False
                composing = [name for name in loaded if name in steps]
                self._unload(client, composing)
                return self._wait_unloaded(client, composing, deadline, "had not unloaded")
        except (InferenceServerException, OSError, http.client.HTTPException) as exc:
            self._say(f"draining stopped, tritonserver exited or stopped answering: {type(exc).__name__}: {exc}")
            return False

    def _index(self, client: InferenceServerClient) -> list[dict[str, Any]]:
        index: list[dict[str, Any]] = client.get_model_repository_index(headers={STOP_KEY_HEADER: self._stop_key})
        return index

    def _unload(self, client: InferenceServerClient, models: list[str]) -> None:
        for name in models:
            client.unload_model(name, headers={STOP_KEY_HEADER: self._stop_key})

    def _wait_unloaded(self, client: InferenceServerClient, models: list[str], deadline: float, failure: str) -> bool:
        """Wait until ``models`` are unloaded: an unloading model is not ready, but stays UNLOADING
        until its last request is done. False (reported with ``failure``) at ``deadline``."""
        while busy := [m["name"] for m in self._index(client) if m["name"] in models and m.get("state") in ("READY", "UNLOADING")]:
            if time.monotonic() >= deadline:
                self._say(f"stopping anyway: after the exit timeout ({self.exit_timeout:g} s), {', '.join(busy)} {failure}")
                return False
            time.sleep(_POLL_S)
        return True

    def _say(self, message: str) -> None:
        """One line of the stop's report: on the server's log, or on stderr when it inherits the terminal."""
        out = self.log if self.log is not None else sys.stderr
        print(f"deris serve: {message}", file=out, flush=True)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "serve", run=run_serve,
        help="serve a Triton model repository (from `deris-export triton-repo`)",
        description="Run tritonserver on a repository made by `deris-export triton-repo`: the tritonserver on "
        "PATH if there is one, else the one bundled in nvidia-pytriton (python-backend repositories only). "
        "Waits until every model is loaded, then runs until Ctrl-C or SIGTERM. On either, new requests are "
        "refused and readiness goes false at once, the requests in flight finish (for at most --exit-timeout "
        "seconds), the models are unloaded and the server exits, closing idle keep-alive connections; a second "
        "signal stops it without waiting. Exits 0 when every request in flight was answered, 1 when the server "
        "failed or a stop abandoned requests (docs/serving.md, \"Stopping the server\").",
        examples="  deris serve --repo repo/ --http-port 8000 --grpc-port 8001\n"
        "  deris serve --repo repo/ --host 0.0.0.0 --exit-timeout 45   # terminationGracePeriodSeconds: 60",
    )
    p.add_argument("--repo", type=Path, required=True, help="model repository directory")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help=f"HTTP port (default {DEFAULT_HTTP_PORT})")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help=f"gRPC port (default {DEFAULT_GRPC_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 for every interface)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models to load (default 300)")
    p.add_argument("--exit-timeout", type=_seconds, default=DEFAULT_EXIT_TIMEOUT_S, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, the seconds the requests in flight and the model unloading get before "
                   f"the server is stopped anyway (and killed {_EXIT_GRACE_S:g} s later at most); keep it more than "
                   f"{_EXIT_GRACE_S:g} s under the platform's kill timeout (default {DEFAULT_EXIT_TIMEOUT_S:g})")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra tritonserver argument, e.g. --server-arg=--backend-config=tensorrt,plugins=/p.so (repeatable)")
    add_quiet(p)


def run_serve(args: argparse.Namespace) -> int:
    extra = list(args.server_arg) + (["--log-info=false"] if args.quiet else [])
    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port, host=args.host,
                          extra_args=extra, exit_timeout=args.exit_timeout)
    server.start()

    signals: list[int] = []
    serving = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)
        # While loading nothing can be in flight, and a second signal asks not to wait: either way
        # tritonserver stops on its own. Otherwise the main thread drains it (TritonServer.stop).
        if not serving or len(signals) > 1:
            server.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            seconds = server.wait_ready(args.ready_timeout)
        except ServerError:
            if signals:  # stopped on request while the models were loading: nothing was served
                server.wait()
                print("deris serve: stopped while the models were loading", file=sys.stderr, flush=True)
                return EXIT_OK
            raise
        serving = True
        print(f"deris serve: ready in {seconds:.1f} s; HTTP {server.http_url}, gRPC {server.grpc_url} "
              f"(Ctrl-C stops)", file=sys.stderr, flush=True)
        # Polled, not waited for: the signal handler only records the signal for this loop to see.
        while not signals and (code := server.wait(_POLL_S)) is None:
            pass
        if not signals:
            print(f"deris serve: tritonserver exited by itself with code {code}", file=sys.stderr, flush=True)
            return EXIT_OK if code == 0 else EXIT_CHECK_FAILED
        start = time.monotonic()
        code = server.stop()
        if code == 0:
            print(f"deris serve: stopped cleanly in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
            return EXIT_OK
        print(f"deris serve: the stop was not clean (tritonserver exited with code {code}); see the lines above",
              file=sys.stderr, flush=True)
        return EXIT_CHECK_FAILED
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
