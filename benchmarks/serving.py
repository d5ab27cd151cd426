"""Requests/s and latency of the Triton `deris` ensemble against the local PyTorch predictor.

Both sides do the whole job for one request: decode the encoded image, preprocess, tokenize, run
the model, post-process to a mask at the original size. The server runs the ``--backend python``
repository (ONNX Runtime inside python-backend models, the only kind the tritonserver bundled in
nvidia-pytriton can serve) with the generator's defaults (max batch 8, no queue delay, one
instance and one ONNX Runtime thread per model); the predictor runs PyTorch with its default
threads and with one. Server runs: gRPC at concurrency 1 (latency) and at --concurrency (throughput, the
dynamic batcher grouping concurrent requests), and HTTP at concurrency 1.

Every run starts with --warmup untimed requests; latency is per request (client side), throughput
is completed requests / wall time. The image is skimage's astronaut (512x512) as JPEG; the texts
rotate over a few expressions. Random weights unless --checkpoint is given (the work done is the
same), and the small test sentencepiece model unless --tokenizer is given.

    python benchmarks/serving.py                      # deris-tiny, writes benchmarks/results/serving_deris-tiny.md
    python benchmarks/serving.py --requests 100 --out /tmp/serving.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = ("the man on the left", "the flag behind her", "white helmet", "a person in a space suit")
GRAPHS = ("cognition", "perception", "round_0", "round_1", "round_2", "round_3")


@dataclass
class Run:
    name: str
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def row(self) -> str:
        p50, p99 = np.percentile(self.latencies_ms, [50, 99])
        return (f"| {self.name} | {self.concurrency} | {self.requests} | {self.throughput:.1f} | "
                f"{p50:.1f} | {p99:.1f} |")


def timed(name: str, work: Callable[[int], Callable[[int], object]], requests: int, concurrency: int, warmup: int) -> Run:
    """``work(worker)`` returns the request function of one worker (its own connection);
    requests are split over ``concurrency`` threads."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker(index: int, count: int) -> None:
        send = work(index)
        for i in range(warmup):
            send(i)
        barrier.wait()
        mine = []
        for i in range(count):
            start = time.perf_counter()
            send(i)
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(mine)

    counts = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(counts)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    run = Run(name, concurrency, requests, time.perf_counter() - start, latencies)
    print(run.row(), flush=True)
    return run


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _busy_ticks() -> int:
    """Clock ticks all CPUs spent busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _tree_ticks(root: int) -> int:
    """CPU ticks of ``root`` and its descendants (the server and its python-backend stubs)."""
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
    """Share of the machine's CPU that *other* processes used between start() and stop():
    the machine is shared, and their load skews every number."""

    def start(self) -> None:
        self.busy, self.own, self.time = _busy_ticks(), _tree_ticks(os.getpid()), time.monotonic()

    def stop(self) -> float:
        other = (_busy_ticks() - self.busy) - (_tree_ticks(os.getpid()) - self.own)
        return max(0.0, other / (os.sysconf("SC_CLK_TCK") * (time.monotonic() - self.time) * _cores()))


def versions(server_version: str) -> str:
    names = ("deris", "torch", "onnxruntime", "numpy", "tritonclient", "nvidia-pytriton")
    found = [f"{n} {metadata.version(n)}" for n in names]
    return ", ".join([f"Python {platform.python_version()}", *found, f"tritonserver {server_version}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deris-tiny")
    parser.add_argument("--checkpoint", type=Path, help="weights (default: random, seed 0)")
    parser.add_argument("--tokenizer", type=Path, help="beit3.spm (default: the tests' small sentencepiece model)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per run (default 300)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the throughput run (default 8)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per client before each run")
    parser.add_argument("--out", type=Path, help="markdown report (default benchmarks/results/serving_<preset>.md)")
    args = parser.parse_args(argv)

    import cv2
    import skimage.data
    import torch

    import deris
    from deris.triton_repo.client import DerisClient
    from deris.export.onnx_export import ExportOptions, export_onnx
    from deris.triton_repo.repository import generate_triton_repo
    from deris.outputs import atomic_write
    from deris.predictor import Predictor
    from deris.triton_repo.server import TritonServer
    from deris.text import TextEncoder

    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"serving_{args.preset}.md"
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    image = jpeg.tobytes()

    with tempfile.TemporaryDirectory(prefix="deris-bench-serving-") as tmp:
        work = Path(tmp)
        if args.checkpoint is None:
            torch.manual_seed(0)
            model = deris.build_model(args.preset)
        else:
            model = deris.from_checkpoint(args.preset, args.checkpoint)
        spm = args.tokenizer
        if spm is None:
            sys.path.insert(0, str(REPO_ROOT / "tests"))
            from spm import train_sentencepiece

            spm = train_sentencepiece(work / "spm")
        print(f"exporting {args.preset} ...", flush=True)
        onnx_dir = export_onnx(model, work / "onnx", ExportOptions(model.cfg.image_size, graphs=GRAPHS), progress=False)
        repo = generate_triton_repo(onnx_dir, work / "repo", "python", "rounds", spm_path=spm)
        predictor = Predictor(model, TextEncoder.from_spm(spm, model.cfg.max_text_len))

        print("| run | clients | requests | requests/s | p50 ms | p99 ms |", flush=True)
        cpu = CpuShare()
        cpu.start()
        local = lambda w: lambda i: predictor.predict(image, TEXTS[i % len(TEXTS)])  # noqa: E731
        threads = torch.get_num_threads()
        runs = [timed(f"local Predictor (PyTorch, {threads} threads)", local, args.requests, 1, args.warmup)]
        # The server's models run one thread each: the single-thread predictor is the like-for-like baseline.
        torch.set_num_threads(1)
        runs.append(timed("local Predictor (PyTorch, 1 thread)", local, args.requests, 1, args.warmup))
        torch.set_num_threads(threads)
        with open(work / "server.log", "w") as log, TritonServer(repo, http_port=_free_port(), grpc_port=_free_port(), log=log) as server:
            clients: list[DerisClient] = []

            def client_for(protocol: str) -> Callable[[int], Callable[[int], object]]:
                def make(worker: int) -> Callable[[int], object]:
                    client = DerisClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol)
                    clients.append(client)
                    return lambda i: client.predict(image, TEXTS[(i + worker) % len(TEXTS)])
                return make

            try:
                runs.append(timed("Triton ensemble, gRPC", client_for("grpc"), args.requests, 1, args.warmup))
                runs.append(timed("Triton ensemble, HTTP", client_for("http"), args.requests, 1, args.warmup))
                runs.append(timed("Triton ensemble, gRPC", client_for("grpc"), args.requests, args.concurrency, args.warmup))
            finally:
                for client in clients:
                    client.close()
            import tritonclient.http as httpclient

            with httpclient.InferenceServerClient(server.http_url) as meta:
                server_version = meta.get_server_metadata()["version"]
            other_share = cpu.stop()  # before the server stops: its processes are still ours to count
    print(f"other processes used {other_share:.0%} of the CPU during the runs")

    report = io.StringIO()
    report.write(f"# Serving benchmark: {args.preset}\n\n")
    report.write(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
    report.write(f"- CPU: {cpu_model()}, {_cores()} cores available, no GPU; other processes used {other_share:.0%} "
                 "of the CPU during the runs (the machine is shared; their load lowers every number)\n")
    report.write(f"- versions: {versions(server_version)}\n")
    report.write(f"- workload: skimage astronaut 512x512 JPEG ({len(image)} bytes), {len(TEXTS)} rotating expressions, "
                 f"{args.requests} timed requests per run after {args.warmup} warm-up requests per client; weights "
                 f"{'random (seed 0)' if args.checkpoint is None else args.checkpoint.name}\n")
    report.write("- server: `--backend python` repository with the generator's defaults (max batch 8, no queue delay, "
                 "1 instance and 1 ONNX Runtime thread per model), bundled tritonserver; local: `Predictor.predict` "
                 "(PyTorch, default and 1 intra-op threads)\n")
    report.write("- both do the whole request: decode, preprocess, tokenize, model, post-process to the original size\n\n")
    report.write("| run | clients | requests | requests/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|\n")
    report.writelines(run.row() + "\n" for run in runs)
    command = " ".join(["python benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    report.write(f"\nCommand: `{command}`\n")
    atomic_write(out, report.getvalue().encode())
    print(f"wrote {out}")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cores() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
