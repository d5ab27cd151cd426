"""What every benchmark script shares: the environment stamp, timing, statistics, memory, the
result writers, and the serving pieces (a Triton server on an export, clients in a closed loop).

Methods, for every script that uses them:

* Timing. A call on the CPU is timed with ``time.perf_counter``; a call on a CUDA device between
  two CUDA events, after a synchronisation and followed by one, so queued work neither leaks into
  the next call nor escapes this one.
* Interleaving. Callables compared on the same point run in rounds, one call each per round, the
  order reversed every other round (A B, B A, A B, ...). A machine that slows down or speeds up
  during the run then shifts both sides of every pair alike, and the order inside a pair (the
  second call finding warm caches, or the first one's worker threads still spinning) cancels out
  over the rounds. A ratio is the median of the per-round ratios, with their interquartile range
  as the spread: timing one runtime's whole block after the other lets the drift into the ratio.
  An optional pause before every timed call lets the previous call's spinning thread pools go
  idle, so no call competes with them for the cores.
* Percentiles are numpy's linear interpolation (p99 of 10 runs is close to their maximum).
* Memory. On a CUDA device the peak of PyTorch's allocator during one call; on the CPU the peak
  resident set of the whole process during one call (Linux ``VmHWM``, reset before the call): it
  includes every model loaded in the process, not only the one called.

Imports only the standard library and numpy at module level, so ``--help`` stays instant.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import math
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
# Expressions the request generators rotate over (RefCOCO style); the small timing tokenizer is
# trained on them.
TEXTS = ("the man on the left", "the flag behind her", "white helmet", "a person in a space suit")
LIBRARIES = ("deris", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt", "triton", "numpy", "tritonclient",
             "nvidia-pytriton")


# --- the environment stamp ------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def library_versions(names: Sequence[str] = LIBRARIES) -> str:
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join([f"Python {platform.python_version()}", *found])


def gpu_model() -> tuple[str, str]:
    """(GPU name, driver version), or ("none", "none") without a CUDA device."""
    try:
        import torch
    except ImportError:
        return "none", "none"
    if not torch.cuda.is_available():
        return "none", "none"
    name = torch.cuda.get_device_name()
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (no nvidia-smi)"
    return name, f"{driver}, CUDA {torch.version.cuda}"


@dataclass(frozen=True)
class Stamp:
    """Where and when a result was measured: written into every report, CSV row and plot."""

    device: str
    cpu: str
    gpu: str
    driver: str
    threads: int
    malloc: str  # how the process's C library hands out CPU memory (see set_malloc)
    versions: str
    date: str
    commit: str
    load_before: float  # 1-minute load average when the measurement started (the machine may be shared)

    def lines(self) -> list[str]:
        return [
            f"- date: {self.date}; git commit {self.commit}",
            f"- device: {self.device}; CPU {self.cpu} ({cores()} cores available, {self.threads} threads used); "
            f"GPU {self.gpu}; driver {self.driver}",
            f"- CPU memory: {self.malloc}",
            f"- versions: {self.versions}",
            f"- 1-minute load average {self.load_before:.2f} before and {os.getloadavg()[0]:.2f} after the runs "
            "(other processes on a shared machine slow every number down)",
        ]

    def caption(self) -> str:
        """One or two short lines for the foot of a plot."""
        return (f"{self.device} | CPU {self.cpu} | GPU {self.gpu} | driver {self.driver} | {self.date} | commit {self.commit}\n"
                f"{self.malloc} | {self.versions}")

    def columns(self) -> dict[str, str]:
        return {"device": self.device, "cpu": self.cpu, "gpu": self.gpu, "driver": self.driver,
                "threads": str(self.threads), "malloc": self.malloc, "versions": self.versions, "date": self.date, "commit": self.commit}


MALLOC_MODES = ("keep", "default")


def add_malloc_option(parser: Any) -> None:
    parser.add_argument(
        "--malloc", choices=MALLOC_MODES, default="keep",
        help="CPU memory of this process: keep = glibc's malloc keeps freed memory for reuse, as every deris command "
             "sets it (deris.cpu_memory); default = glibc's own behaviour, where large blocks go back to the kernel "
             "when freed and every call page-faults them in again, as in a plain Python process (default keep)")


def set_malloc(mode: str) -> str:
    """Apply ``--malloc`` to this process; returns what the stamp says of it."""
    from deris.cpu_memory import keep_freed_memory, user_malloc_settings

    if user := user_malloc_settings():
        return "malloc as the environment sets it (" + ", ".join(f"{n}={os.environ[n]}" for n in user) + ")"
    if mode == "keep" and keep_freed_memory():
        return "glibc malloc keeps freed memory (--malloc keep)"
    return "the C library's malloc defaults" + (" (--malloc default)" if mode == "default" else " (not glibc)")


def environment(device: str, threads: int, malloc: str) -> Stamp:
    gpu, driver = gpu_model() if device.startswith("cuda") else ("none", "none")
    return Stamp(device, cpu_model(), gpu, driver, threads, malloc, library_versions(),
                 datetime.datetime.now().astimezone().isoformat(timespec="seconds"), git_commit(), os.getloadavg()[0])


# --- timing --------------------------------------------------------------------------------------

Call = Callable[[], object]


def time_ms(call: Call, cuda: bool) -> float:
    """Milliseconds of one call (see the module docstring for the two clocks)."""
    if not cuda:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3
    import torch

    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return float(begin.elapsed_time(end))


def interleaved(calls: Mapping[str, Call], warmup: int, runs: int, cuda: bool, settle_s: float = 0.0) -> dict[str, list[float]]:
    """``runs`` timed calls of every callable, in alternating rounds after ``warmup`` untimed ones
    (also interleaved, so every callable starts timing equally warm).

    ``settle_s``: an untimed pause before every timed call. Thread pools keep their workers
    spinning for a while after a call (ONNX Runtime's intra-op pool by default, OpenMP's); the
    pause lets them go idle, so no call runs against the previous one's spinning threads.
    """
    order = list(calls)
    for _ in range(warmup):
        for name in order:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in order}
    for index in range(runs):
        for name in order if index % 2 == 0 else reversed(order):
            time.sleep(settle_s)
            times[name].append(time_ms(calls[name], cuda))
    return times


# --- statistics -----------------------------------------------------------------------------------


def percentiles(samples: Sequence[float], points: Sequence[float] = (50, 90, 99)) -> list[float]:
    return [float(v) for v in np.percentile(np.asarray(samples, dtype=np.float64), points)]


@dataclass(frozen=True)
class Ratio:
    """``baseline / other`` per interleaved pair: the median and the interquartile range."""

    median: float
    low: float  # 25th percentile
    high: float  # 75th percentile
    pairs: int

    def text(self) -> str:
        return f"{self.median:.2f}x [{self.low:.2f}-{self.high:.2f}]"


def pair_ratio(baseline: Sequence[float], other: Sequence[float]) -> Ratio:
    """The speed-up of ``other`` over ``baseline`` (> 1: other is faster) from same-round pairs."""
    if len(baseline) != len(other) or not baseline:
        raise ValueError(f"pairs need two equally long, non-empty series, got {len(baseline)} and {len(other)} samples")
    ratios = [b / o for b, o in zip(baseline, other)]
    low, median, high = percentiles(ratios, (25, 50, 75))
    return Ratio(median, low, high, len(ratios))


def fit_exponent(pixels: Sequence[float], latency: Sequence[float]) -> float:
    """k of the least-squares fit latency ~ c * pixels^k (a line on log-log axes). k = 1: time
    proportional to the pixel count; below 1: fixed costs (the cognition branch at 224, the
    pre-processing, launch overheads) still weigh; above 1: a super-linear part dominates."""
    if len(pixels) != len(latency) or len(set(pixels)) < 2:
        raise ValueError(f"an exponent needs at least two different pixel counts, got {list(pixels)}")
    if min(pixels) <= 0 or min(latency) <= 0:
        raise ValueError("pixel counts and latencies must be positive")
    slope, _ = np.polyfit(np.log(np.asarray(pixels, dtype=np.float64)), np.log(np.asarray(latency, dtype=np.float64)), 1)
    return float(slope)


# --- memory --------------------------------------------------------------------------------------


def _rss_peak_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_mib(call: Call, cuda: bool) -> float | None:
    """Peak memory of one call in MiB (see the module docstring), or None where it cannot be read."""
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    call()
    peak = _rss_peak_kib()
    return None if peak is None else peak / 1024


# --- writers --------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> Path:
    from deris.atomic import atomic_write

    return atomic_write(path, text.encode())


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows (dicts) as CSV; the columns are the union of the rows' keys in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; ``right`` marks the columns to right-align (numbers)."""
    align = right if right is not None else [False] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(figure: Any, path: Path, stamp: Stamp) -> Path:
    """A matplotlib figure as PNG, with the stamp at its foot."""
    from deris.atomic import atomic_write

    figure.text(0.01, 0.005, stamp.caption(), fontsize=6, va="bottom", ha="left", wrap=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return atomic_write(path, buffer.getvalue())


# --- requests -------------------------------------------------------------------------------------


def sample_jpeg(height: int = 480, width: int = 640) -> bytes:
    """A photo-sized JPEG (smooth gradients and solid shapes): the encoded image of every request."""
    import cv2

    from deris.export.verify import synthetic_image

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(synthetic_image(height, width, seed=0), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the sample JPEG")
    return bytes(data.tobytes())


def timing_tokenizer(directory: Path) -> Path:
    """A small sentencepiece model with beit3.spm's special layout, trained on :data:`TEXTS`, for
    timing without the real beit3.spm: tokenising a short expression costs about the same."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "timing"
    corpus = [f"{a} {t}" for a in ("red", "blue", "small", "large", "left", "right") for t in TEXTS]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(prefix), model_type="unigram", vocab_size=64,
        hard_vocab_limit=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    return prefix.with_suffix(".model")


# --- serving --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def triton_server(onnx_dir: Path, work: Path, tokenizer: Path, *, decoder: str = "rounds", max_batch_size: int = 8,
                  threads: int = 1) -> Iterator[Any]:
    """A Triton server on the python-backend repository generated for the export in ``onnx_dir``
    (the only kind the tritonserver bundled in nvidia-pytriton serves; the generator's defaults
    otherwise); its log goes to ``work/server.log``."""
    from deris.triton_repo.repository import generate_triton_repo
    from deris.triton_repo.server import TritonServer

    repo = generate_triton_repo(onnx_dir, work / "repo", "python", decoder, spm_path=tokenizer,
                                max_batch_size=max_batch_size, intra_op_threads=threads, force=True)
    with open(work / "server.log", "w") as log, TritonServer(repo, http_port=free_port(), grpc_port=free_port(), log=log) as server:
        yield server


def server_version(server: Any) -> str:
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.http_url) as client:
        return str(client.get_server_metadata()["version"])


@dataclass
class Run:
    """A closed-loop run: ``concurrency`` clients, each sending its next request when the last returns."""

    name: str
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def cells(self) -> list[object]:
        p50, p90, p99 = percentiles(self.latencies_ms)
        return [self.name, self.concurrency, self.requests, f"{self.throughput:.1f}", f"{p50:.1f}", f"{p90:.1f}", f"{p99:.1f}"]


RUN_HEADER = ("run", "clients", "requests", "requests/s", "p50 ms", "p90 ms", "p99 ms")


def closed_loop(name: str, sender: Callable[[int], Callable[[int], object]], requests: int, concurrency: int,
                warmup: int) -> Run:
    """``sender(worker)`` returns one worker's request function (its own connection, say), called
    with the request's index; ``requests`` are split over ``concurrency`` threads, each of which
    first sends ``warmup`` untimed requests. The clock runs from when all are warm to the last answer."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    errors: list[BaseException] = []

    def worker(index: int, count: int) -> None:
        mine = []
        try:
            send = sender(index)
            for i in range(warmup):
                send(i)
        except BaseException as exc:  # reported by the caller's thread below
            errors.append(exc)
            barrier.abort()
            return
        barrier.wait()
        try:
            for i in range(count):
                start = time.perf_counter()
                send(i)
                mine.append((time.perf_counter() - start) * 1e3)
        except BaseException as exc:
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    counts = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(counts)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return Run(name, concurrency, time.perf_counter() - start, latencies)


def _busy_ticks() -> int:
    """Clock ticks all CPUs spent busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _tree_ticks(root: int) -> int:
    """CPU ticks of ``root`` and its descendants (a server and its python-backend stubs included)."""
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(ticks.get(pid, 0) for pid in tree)


class CpuShare:
    """Share of the machine's CPU that *other* processes used between start() and stop(): on a
    shared machine their load lowers every number."""

    def start(self) -> None:
        self.busy, self.own, self.time = _busy_ticks(), _tree_ticks(os.getpid()), time.monotonic()

    def stop(self) -> float:
        other = (_busy_ticks() - self.busy) - (_tree_ticks(os.getpid()) - self.own)
        elapsed = max(time.monotonic() - self.time, 1e-9)
        return max(0.0, other / (os.sysconf("SC_CLK_TCK") * elapsed * cores()))


def format_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"

