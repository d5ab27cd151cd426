"""Compile jobs that run beside the tests, started as soon as the session knows its tests.

Compiling the Triton kernels for sm_80 and sm_90, exporting the session's models and a few
command-line checks (the demo sweep, ``deris-export trt`` without TensorRT) take minutes of
single-threaded CPU, while most of the suite keeps only one of the CI machine's two cores busy.
A module (conftest.py or a test module) declares such jobs in a module-level
``background_jobs(directory) -> {name: argv}``, a job named ``F`` or ``F:...`` being for the
fixture ``F`` and writing what it makes into ``directory / name`` (:meth:`Background.folder`). conftest.py runs the test modules that use such a fixture after the others, and
after collection it starts the jobs whose fixtures the selected tests use,
in the order the tests first need them, at the lowest CPU priority (they take idle time, not the
tests'); the fixture waits for its job with :meth:`Background.result`. Jobs still running when the
session ends are killed.

The jobs run without ``TRITON_INTERPRET``, which conftest.py sets for the test process: the
kernel compiles need the real compiler, exporting never runs a kernel, and the command-line
checks run as a user's shell runs them (on the CPU, PyTorch's kernels).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import threading
from pathlib import Path

# Two at once: enough to fill an idle core, and each holds about half a GB.
WORKERS = 2


class Background:
    def __init__(self, directory: Path) -> None:
        self.directory = directory  # the jobs' to write into; removed with them
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="background")
        self._jobs: dict[str, concurrent.futures.Future[subprocess.CompletedProcess[str]]] = {}
        self._running: dict[str, subprocess.Popen[str]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}

    def start(self, key: str, argv: list[str]) -> None:
        if key in self._jobs:
            raise ValueError(f"background job {key!r} declared twice")
        self._jobs[key] = self._pool.submit(self._run, key, argv)

    def _run(self, key: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the session ended before this job started")
            process = subprocess.Popen(["nice", "-n", "19", *argv], env=self._env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self._running[key] = process
        try:
            stdout, stderr = process.communicate()
        finally:
            with self._lock:
                self._running.pop(key, None)
        return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)

    def folder(self, key: str) -> Path:
        """Where job ``key`` writes its files, by convention: ``directory / key``."""
        return self.directory / key

    def result(self, key: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """The finished job (its exit code is the caller's to check), waiting at most ``timeout``
        seconds from now; a job that takes longer is killed and the test fails."""
        if key not in self._jobs:
            raise KeyError(f"background job {key!r} was not started: only fixtures that tests name as "
                           "parameters start their jobs (not request.getfixturevalue)")
        try:
            return self._jobs[key].result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self._jobs[key].cancel()
            with self._lock:
                if key in self._running:
                    self._running[key].kill()
            raise TimeoutError(f"background job {key!r} did not finish within {timeout:.0f} s") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for process in self._running.values():
                process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.directory, ignore_errors=True)
