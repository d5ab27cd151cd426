"""Requests/s and latency of the Triton `deris` ensemble against the local PyTorch predictor.

Both sides do the whole job for one request: decode the encoded image, preprocess, tokenize, run
the model, post-process to a mask at the original size. The server runs the ``--backend python``
repository (ONNX Runtime inside python-backend models, the only kind the tritonserver bundled in
nvidia-pytriton can serve) with the generator's defaults (max batch 8, no queue delay, one
instance and one ONNX Runtime thread per model); the predictor runs PyTorch with its default
threads and with one. Server runs: gRPC at concurrency 1 (latency) and at --concurrency
(throughput, the dynamic batcher grouping concurrent requests), and HTTP at concurrency 1.

Every run is a closed loop (benchmarks/harness.py): each client sends its next request when the
last one is answered, after --warmup untimed requests; latency is per request (client side),
throughput is completed requests / wall time. The image is a 640x480 JPEG, the texts rotate over
a few expressions. Random weights unless --checkpoint is given (the work done is the same), and
a small timing sentencepiece model unless --tokenizer is given.

Latency against resolution and batch, and the served ensemble interleaved with the in-process
backends, is benchmarks/latency.py --backends ...,triton.

examples:
  python benchmarks/serving.py                      # deris-tiny, writes benchmarks/results/serving_deris-tiny.md
  python benchmarks/serving.py --requests 100 --out /tmp/serving.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import harness  # the sibling module: the script's folder is first on sys.path

GRAPHS = ("cognition", "perception", "round_0", "round_1", "round_2", "round_3")


def build_parser() -> argparse.ArgumentParser:
    from deris.cli_support import preset_name

    parser = argparse.ArgumentParser(prog="benchmarks/serving.py", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=preset_name, default="deris-tiny", metavar="NAME", help="model preset (default deris-tiny)")
    parser.add_argument("--checkpoint", type=Path, help="weights (default: random, seed 0)")
    parser.add_argument("--tokenizer", type=Path, help="beit3.spm (default: a small timing sentencepiece model)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per run (default 300)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the throughput run (default 8)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per client before each run (default 10)")
    parser.add_argument("--out", type=Path, help="markdown report (default benchmarks/results/serving_<preset>.md)")
    harness.add_malloc_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    malloc = harness.set_malloc(args.malloc)  # the local predictor's side; the server's processes keep their own
    import torch

    from deris.export.onnx_export import ExportOptions, export_onnx, load_model
    from deris.predictor import Predictor
    from deris.text import TextEncoder
    from deris.triton_repo.client import DerisClient

    out = args.out or harness.RESULTS / f"serving_{args.preset}.md"
    image = harness.sample_jpeg()
    texts = harness.TEXTS
    threads = torch.get_num_threads()
    stamp = harness.environment("cpu", threads, malloc)

    with tempfile.TemporaryDirectory(prefix="deris-bench-serving-") as tmp:
        work = Path(tmp)
        model = load_model(args.preset, args.checkpoint)
        spm = args.tokenizer or harness.timing_tokenizer(work / "tokenizer")
        print(f"exporting {args.preset} ...", flush=True)
        onnx_dir = export_onnx(model, work / "onnx", ExportOptions(model.cfg.image_size, graphs=GRAPHS), progress=False)
        predictor = Predictor(model, TextEncoder.from_spm(spm, model.cfg.max_text_len))

        print("| " + " | ".join(harness.RUN_HEADER) + " |", flush=True)
        runs: list[harness.Run] = []

        def record(run: harness.Run) -> None:
            runs.append(run)
            print("| " + " | ".join(map(str, run.cells())) + " |", flush=True)

        cpu = harness.CpuShare()
        cpu.start()

        def local(worker: int) -> Callable[[int], object]:
            return lambda i: predictor.predict(image, texts[i % len(texts)])

        record(harness.closed_loop(f"local Predictor (PyTorch, {threads} threads)", local, args.requests, 1, args.warmup))
        # The server's models run one thread each: the single-thread predictor is the like-for-like baseline.
        torch.set_num_threads(1)
        record(harness.closed_loop("local Predictor (PyTorch, 1 thread)", local, args.requests, 1, args.warmup))
        torch.set_num_threads(threads)
        with harness.triton_server(onnx_dir, work, spm) as server:
            clients: list[DerisClient] = []

            def remote(protocol: str) -> Callable[[int], Callable[[int], object]]:
                def make(worker: int) -> Callable[[int], object]:
                    client = DerisClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol)
                    clients.append(client)
                    return lambda i: client.predict(image, texts[(i + worker) % len(texts)])
                return make

            try:
                record(harness.closed_loop("Triton ensemble, gRPC", remote("grpc"), args.requests, 1, args.warmup))
                record(harness.closed_loop("Triton ensemble, HTTP", remote("http"), args.requests, 1, args.warmup))
                record(harness.closed_loop("Triton ensemble, gRPC", remote("grpc"), args.requests, args.concurrency, args.warmup))
            finally:
                for client in clients:
                    client.close()
            version = harness.server_version(server)
            other_share = cpu.stop()  # before the server stops: its processes are still ours to count
    print(f"other processes used {other_share:.0%} of the CPU during the runs")

    command = " ".join(["python benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    weights = "random (seed 0)" if args.checkpoint is None else args.checkpoint.name
    report = "\n".join([
        f"# Serving benchmark: {args.preset}",
        "",
        *stamp.lines(),
        f"- tritonserver {version}; other processes used {other_share:.0%} of the CPU during the runs",
        f"- workload: a 640x480 JPEG ({len(image)} bytes), {len(texts)} rotating expressions, {args.requests} timed "
        f"requests per run after {args.warmup} warm-up requests per client; weights {weights}",
        "- server: `--backend python` repository with the generator's defaults (max batch 8, no queue delay, "
        "1 instance and 1 ONNX Runtime thread per model), bundled tritonserver; local: `Predictor.predict` "
        "(PyTorch, default and 1 intra-op threads)",
        "- both do the whole request: decode, preprocess, tokenize, model, post-process to the original size",
        "",
        harness.markdown_table(harness.RUN_HEADER, [run.cells() for run in runs], [False, True, True, True, True, True, True]),
        "",
        f"Command: `{command}`",
        "",
    ])
    harness.write_text(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
