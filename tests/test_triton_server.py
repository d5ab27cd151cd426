"""A real tritonserver (bundled in nvidia-pytriton) serving the `deris` ensemble of deris-tiny.

The server runs the python-backend repository (ONNX Runtime inside python models); its answers
are compared with the local PyTorch ``Predictor`` built from the same checkpoint and tokenizer:
masks exactly, scores to 1e-5. Then batching (concurrent vs one by one), load, bad requests, and
the `deris client` / `deris serve` commands.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tis import TinyExport, encode, free_port, png_claiming_size, small, synthetic_image  # noqa: E402
from tritonclient.utils import InferenceServerException

from deris.cli import main as deris_main  # noqa: E402
from deris.outputs import write_prediction_files  # noqa: E402
from deris.prediction import Prediction  # noqa: E402
from deris.predictor import Predictor  # noqa: E402
from deris.triton_repo.client import ClientError, DerisClient, register  # noqa: E402

PROTOCOLS = ("http", "grpc")
SCORE_ATOL = 1e-5
TEXTS = ("the man on the left", "red car", "small dog next to the door")
IMAGES = {
    "astronaut.jpg": encode(small(skimage.data.astronaut(), (160, 120)), "JPEG"),
    "chelsea.png": encode(small(skimage.data.chelsea(), (150, 100)), "PNG"),
    "coffee.jpg": encode(small(skimage.data.coffee(), (133, 100)), "JPEG"),
    "synthetic.png": encode(synthetic_image(), "PNG"),
    "gray.png": encode(small(skimage.data.camera(), (90, 90))),
    "rgba.png": encode(np.dstack([small(skimage.data.astronaut(), (64, 80)), np.full((80, 64), 128, np.uint8)])),
}
LOAD_IMAGE = IMAGES["synthetic.png"]


def url(server: Any, protocol: str) -> str:
    return str(server.http_url if protocol == "http" else server.grpc_url)


def assert_same(served: Prediction, local: Prediction) -> None:
    assert served.mask.shape == local.mask.shape
    assert np.array_equal(served.mask, local.mask), f"{int((served.mask != local.mask).sum())} mask pixels differ"
    np.testing.assert_allclose(served.scores, local.scores, rtol=0, atol=SCORE_ATOL)
    assert served.no_target == local.no_target
    assert served.selected == local.selected
    assert served.existence_prob == pytest.approx(local.existence_prob, abs=SCORE_ATOL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_matches_local_predictor(triton_server: Any, local_predictor: Any, protocol: str) -> None:
    with DerisClient(url(triton_server, protocol), protocol) as client:
        for data in IMAGES.values():
            for text in TEXTS:
                served = client.predict(data, text)
                assert served.score_threshold == local_predictor.score_threshold
                assert_same(served, local_predictor.predict(data, text))
        # A stricter threshold per request: the server's decision follows it.
        strict = client.predict(IMAGES["astronaut.jpg"], TEXTS[0], score_threshold=0.95)
    strict_local = Predictor(local_predictor.model, local_predictor.text_encoder, score_threshold=0.95)
    assert_same(strict, strict_local.predict(IMAGES["astronaut.jpg"], TEXTS[0]))
    assert strict.no_target and not strict.mask.any()


def batch_sizes_run(server: Any, model: str) -> dict[int, int]:
    """{batch size: executions} the server has run for ``model`` so far."""
    with httpclient.InferenceServerClient(server.http_url) as client:
        stats = client.get_inference_statistics(model)["model_stats"][0]["batch_stats"]
    return {int(s["batch_size"]): int(s["compute_infer"]["count"]) for s in stats}


def run_concurrently(server: Any, jobs: list[tuple[bytes, str]], workers: int) -> list[Prediction]:
    """Each job from its own thread and connection, all released at once."""
    barrier = threading.Barrier(workers)

    def one(job: tuple[bytes, str]) -> Prediction:
        with DerisClient(server.grpc_url, "grpc") as client:
            barrier.wait()
            return client.predict(*job)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def test_dynamic_batching_gives_the_same_results(triton_server: Any) -> None:
    jobs = [(data, TEXTS[i % len(TEXTS)]) for i, data in enumerate(list(IMAGES.values()) * 3)][:16]
    with DerisClient(triton_server.grpc_url, "grpc") as client:
        one_by_one = [client.predict(*job) for job in jobs]
    before = batch_sizes_run(triton_server, "round_1")
    together = run_concurrently(triton_server, jobs, workers=16)
    after = batch_sizes_run(triton_server, "round_1")
    batched = {size: count - before.get(size, 0) for size, count in after.items() if size > 1}
    assert any(batched.values()), f"the concurrent requests were never batched: {after}"
    for served, single in zip(together, one_by_one):
        assert_same(served, single)


def test_load(triton_server: Any) -> None:
    clients, per_client = 8, 50
    texts = [f"{t} {i}" for i in range(4) for t in TEXTS][: clients]
    with DerisClient(triton_server.grpc_url, "grpc") as client:
        expected = {text: client.predict(LOAD_IMAGE, text) for text in texts}
    latencies: list[float] = []
    errors: list[str] = []

    def worker(text: str) -> None:
        with DerisClient(triton_server.http_url, "http") as client:
            for _ in range(per_client):
                start = time.perf_counter()
                try:
                    served = client.predict(LOAD_IMAGE, text)
                    assert_same(served, expected[text])
                except Exception as exc:  # collected: every request must succeed and match
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"\nload: {clients} clients x {per_client} requests in {elapsed:.1f} s = {len(latencies) / elapsed:.1f} req/s; "
          f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert not errors, f"{len(errors)} failed requests, first: {errors[0]}"
    assert len(latencies) == clients * per_client


# --- bad requests ------------------------------------------------------------------------------


def raw_infer(server: Any, protocol: str, inputs: dict[str, np.ndarray], model: str = "deris",
              dtypes: dict[str, str] | None = None, parameters: dict[str, Any] | None = None) -> Any:
    module: Any = httpclient if protocol == "http" else grpcclient
    with module.InferenceServerClient(url(server, protocol)) as client:
        tensors = []
        for name, array in inputs.items():
            dtype = (dtypes or {}).get(name, "BYTES")
            tensor = module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return client.infer(model, tensors, parameters=parameters)


def request(image: bytes, text: bytes) -> dict[str, np.ndarray]:
    return {"IMAGE": np.array([[image]], dtype=np.object_), "TEXT": np.array([[text]], dtype=np.object_)}


GOOD = request(IMAGES["synthetic.png"], b"the red car")
BAD_REQUESTS: dict[str, tuple[Callable[[Any, str], Any], str]] = {
    "corrupt image": (lambda s, p: raw_infer(s, p, request(b"\x89PNG\r\n\x1a\n" + b"\x07" * 64, b"a cat")), "image header is corrupt|not in a recognized image format"),
    "truncated jpeg header": (lambda s, p: raw_infer(s, p, request(IMAGES["astronaut.jpg"][:200], b"a cat")), "image header is corrupt"),
    "zero-byte image": (lambda s, p: raw_infer(s, p, request(b"", b"a cat")), r"image data is empty \(0 bytes\)"),
    "20000x20000 header": (lambda s, p: raw_infer(s, p, request(png_claiming_size(20000, 20000), b"a cat")),
                           r"image is too large: .*400000000 pixels"),  # refused from the header, never decoded
    "empty text": (lambda s, p: raw_infer(s, p, request(IMAGES["synthetic.png"], b"")), "text is empty"),
    "text empty after cleaning": (lambda s, p: raw_infer(s, p, request(IMAGES["synthetic.png"], b"?!.")), "no tokens after cleaning"),
    "non-UTF-8 text": (lambda s, p: raw_infer(s, p, request(IMAGES["synthetic.png"], b"caf\xe9 \xff")), "not valid UTF-8"),
    "wrong dtype": (lambda s, p: raw_infer(s, p, GOOD | {"TEXT": np.zeros((1, 1), np.float32)}, dtypes={"TEXT": "FP32"}),
                    "data-type is 'FP32', but model 'deris' expects 'BYTES'"),
    "wrong shape": (lambda s, p: raw_infer(s, p, GOOD | {"TEXT": np.array([[b"a", b"b"]], dtype=np.object_)}), "unexpected shape for input 'TEXT'"),
    "missing input": (lambda s, p: raw_infer(s, p, {"IMAGE": GOOD["IMAGE"]}), "expected 2 inputs but got 1"),
    "unknown model": (lambda s, p: raw_infer(s, p, GOOD, model="segment-anything"), "unknown model: 'segment-anything'"),
    "mixed sizes in one request": (lambda s, p: raw_infer(s, p, {
        "IMAGE": np.array([[IMAGES["synthetic.png"]], [IMAGES["chelsea.png"]]], dtype=np.object_),
        "TEXT": np.array([[b"a cat"], [b"a dog"]], dtype=np.object_)}), "have different sizes"),
    "score threshold 1.5": (lambda s, p: raw_infer(s, p, GOOD, parameters={"score_threshold": 1.5}),
                            r"score_threshold must be a number inside \(0, 1\), got 1.5"),
    "mask threshold 'high'": (lambda s, p: raw_infer(s, p, GOOD, parameters={"mask_threshold": "high"}),
                              r"mask_threshold must be a number inside \(0, 1\), got 'high'"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request(triton_server: Any, protocol: str, case: str) -> None:
    send, message = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException, match=message) as info:
        send(triton_server, protocol)
    status = str(info.value.status())
    assert status in (("404", "StatusCode.NOT_FOUND") if case == "unknown model" else ("400", "StatusCode.INVALID_ARGUMENT"))
    with httpclient.InferenceServerClient(triton_server.http_url) as client:
        assert client.is_server_ready()
    assert raw_infer(triton_server, protocol, GOOD).as_numpy("MASK").shape == (1, 72, 100)


@pytest.mark.parametrize("name", ["one pixel", "gray.png", "rgba.png", "long text"])
def test_unusual_valid_requests(triton_server: Any, local_predictor: Any, name: str) -> None:
    image, text = IMAGES.get(name, IMAGES["synthetic.png"]), TEXTS[0]
    if name == "one pixel":
        image = encode(np.full((1, 1, 3), 77, np.uint8))
    if name == "long text":
        text = " ".join(["the tall man in a red shirt"] * 20)  # far beyond 16 tokens: truncated
    with DerisClient(triton_server.http_url) as client:
        assert_same(client.predict(image, text), local_predictor.predict(image, text))


def test_same_size_items_in_one_request(triton_server: Any, local_predictor: Any) -> None:
    data = IMAGES["coffee.jpg"]
    result = raw_infer(triton_server, "grpc", {
        "IMAGE": np.array([[data], [data]], dtype=np.object_),
        "TEXT": np.array([[TEXTS[0].encode()], [TEXTS[1].encode()]], dtype=np.object_),
    })
    for i, text in enumerate(TEXTS[:2]):
        local = local_predictor.predict(data, text)
        assert np.array_equal(result.as_numpy("MASK")[i].astype(bool), local.mask)
        np.testing.assert_allclose(result.as_numpy("SCORES")[i], local.scores, atol=SCORE_ATOL)


def test_fused_decoder_repository(tiny_export: TinyExport, local_predictor: Any, tmp_path: Path) -> None:
    """`--decoder fused` serves the single decoder graph and gives the same answers."""
    from deris.triton_repo.repository import generate_triton_repo
    from deris.triton_repo.server import TritonServer

    repo = generate_triton_repo(tiny_export.onnx_dir, tmp_path / "repo", "python", "fused", spm_path=tiny_export.spm)
    with open(tmp_path / "server.log", "w") as log, TritonServer(repo, http_port=free_port(), grpc_port=free_port(), log=log) as server:
        with DerisClient(server.grpc_url, "grpc") as client:
            for name in ("astronaut.jpg", "gray.png"):
                assert_same(client.predict(IMAGES[name], TEXTS[0]), local_predictor.predict(IMAGES[name], TEXTS[0]))
    assert server.process is not None and server.process.returncode == 0


def test_the_demo_model_served_gives_the_local_masks_on_its_scenes(demo_export: Path, tmp_path: Path) -> None:
    """Parity that compares masks, not noise: the shipped demo model exported (ONNX Runtime's
    optimised graphs, fused decoder) and served answers exactly like the local PyTorch predictor on
    scenes of the kind it was trained on, and its masks are shapes: nearly all of their pixels lie on
    the scene's shapes, which cover a small part of each image (which shape is referred is the held-out
    evaluation's business, README "Demo model")."""
    from deris.demo import demo_paths, load_demo_predictor
    from deris.scenes import make_scene
    from deris.triton_repo.repository import generate_triton_repo
    from deris.triton_repo.server import TritonServer

    local = load_demo_predictor()
    repo = generate_triton_repo(demo_export, tmp_path / "repo", "python", "fused", spm_path=demo_paths()[1])
    rng = np.random.default_rng(11)
    scenes = [make_scene(rng) for _ in range(4)]
    on_shapes = []
    with open(tmp_path / "server.log", "w") as log, TritonServer(repo, http_port=free_port(), grpc_port=free_port(), log=log) as server:
        with DerisClient(server.grpc_url, "grpc") as client:
            for scene in scenes:
                data = encode(scene.image, "PNG")
                shapes = np.any([shape.mask for shape in scene.shapes], axis=0)
                for expression in scene.expressions:
                    served = client.predict(data, expression.text)
                    assert_same(served, local.predict(data, expression.text))
                    if served.mask.any():
                        on_shapes.append((served.mask & shapes).sum() / served.mask.sum())
    assert server.process is not None and server.process.returncode == 0
    assert len(on_shapes) >= 8 and min(on_shapes) >= 0.8, f"share of mask pixels on shapes: {np.round(on_shapes, 2)}"


# --- the commands --------------------------------------------------------------------------------


def test_client_command_writes_predict_files(triton_server: Any, local_predictor: Any, tmp_path: Path) -> None:
    import cv2

    parser = argparse.ArgumentParser(prog="deris")
    register(parser.add_subparsers())
    image = tmp_path / "chelsea.png"
    image.write_bytes(IMAGES["chelsea.png"])
    texts = list(TEXTS[:2])
    for protocol in PROTOCOLS:
        out = tmp_path / protocol
        argv = ["client", "--url", url(triton_server, protocol), "--image", str(image), "--out", str(out)]
        args = parser.parse_args(argv + (["--grpc"] if protocol == "grpc" else []) + [a for t in texts for a in ("--text", t)])
        assert args.run(args) == 0
        # What `deris predict` writes for the same image and texts.
        local_out = tmp_path / f"local_{protocol}"
        rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
        write_prediction_files(local_out, image.name, rgb, texts, [local_predictor.predict(image, t) for t in texts])
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local_out.iterdir())
        for i in range(len(texts)):
            name = f"chelsea.t{i}.mask.png"
            assert (out / name).read_bytes() == (local_out / name).read_bytes()
        served, local = (json.loads((d / "chelsea.json").read_text()) for d in (out, local_out))
        for a, b in zip(served["results"], local["results"]):
            np.testing.assert_allclose(a.pop("scores"), b.pop("scores"), atol=SCORE_ATOL)
            for key in ("max_score", "existence_prob"):
                assert a.pop(key) == pytest.approx(b.pop(key), abs=SCORE_ATOL)
            assert a == b


def test_client_errors(triton_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for protocol in PROTOCOLS:
        with DerisClient(f"127.0.0.1:{free_port()}", protocol) as client:
            with pytest.raises(ClientError, match="cannot reach the Triton server at 127.0.0.1:.* is `deris serve` running there?"):
                client.predict(IMAGES["synthetic.png"], "a cat")
    image = tmp_path / "empty.png"
    image.write_bytes(b"")
    argv = ["client", "--url", triton_server.http_url, "--image", str(image), "--text", "a cat", "--out", str(tmp_path / "o")]
    assert deris_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deris client: error: inference failed") and "answered [400] in ensemble 'deris', image data is empty (0 bytes)" in err
    assert not (tmp_path / "o").exists()


SERVE_SCRIPT = """
import sys
from deris.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_command_stops_cleanly_on_ctrl_c(python_repo: Path, tmp_path: Path) -> None:
    """`deris serve` on a one-model repository: ready, then SIGINT is forwarded and it exits with 0."""
    repo = tmp_path / "repo"
    shutil.copytree(python_repo / "round_0", repo / "round_0")
    http_port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, "serve", "--repo", str(repo), "--http-port", str(http_port), "--grpc-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while "ready in" not in (tmp_path / "serve.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.25)
        with httpclient.InferenceServerClient(f"127.0.0.1:{http_port}") as client:
            assert client.is_model_ready("round_0")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_serve_command_refuses_a_non_repository(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, "serve", "--repo", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "is not a Triton model repository (no <model>/config.pbtxt)" in result.stderr


@pytest.mark.skipif(shutil.which("tritonserver") is not None, reason="a full tritonserver is on PATH")
def test_bundled_server_refuses_onnxruntime_models(tiny_export: TinyExport, tmp_path: Path) -> None:
    from deris.triton_repo.repository import generate_triton_repo
    from deris.triton_repo.server import ServerError, TritonServer

    repo = generate_triton_repo(tiny_export.onnx_dir, tmp_path / "repo", "onnxruntime", spm_path=tiny_export.spm)
    with pytest.raises(ServerError, match="has onnxruntime_onnx models, .* bundled in nvidia-pytriton has only the python backend"):
        TritonServer(repo).start()


# --- stopping `deris serve` (docs/serving.md, "Stopping the server") ------------------------------------


def slow_image() -> bytes:
    """24 megapixels of flat colour: 80 kB on the wire, but about 0.7 s for the server to decode and
    resize, so that concurrent requests queue up and are still in flight when the stop begins."""
    image = np.zeros((4000, 6000, 3), np.uint8)
    image[:, :3000] = (200, 40, 40)
    image[1333:, 2000:] = (30, 160, 220)
    return encode(image)


def wait_for_line(log_path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, f"no {text!r} in:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.1)


@contextmanager
def serving(repo: Path, log_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """`deris serve` in a process of its own, once ready: the process and its {protocol: URL}."""
    urls = {protocol: f"127.0.0.1:{free_port()}" for protocol in PROTOCOLS}
    ports = [a for protocol in PROTOCOLS for a in (f"--{protocol}-port", urls[protocol].rsplit(":", 1)[1])]
    with open(log_path, "w") as log:  # the child has its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, "serve", "--repo", str(repo), *ports, *args],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log_path, "ready in", process)
        yield process, urls
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_clean_stop(log: str) -> None:
    """No sign in the log that the server or the python stubs were stopped before they were done."""
    for sign in ("Exit timeout expired", "Non-graceful termination", "stopping anyway"):
        assert sign not in log, log[-3000:]


def test_serve_command_sigterm_lets_in_flight_requests_finish(python_repo: Path, tmp_path: Path) -> None:
    """SIGTERM with requests in flight over HTTP and gRPC: each gets the answer the same request got
    before the stop, a request sent after the signal is refused, and `deris serve` exits 0 once the
    models are unloaded.

    (Signalled directly, tritonserver 2.51 fails or hangs the in-flight gRPC ensemble requests.)"""
    image = slow_image()
    jobs = [(protocol, f"{text} {i}") for i, text in enumerate(TEXTS[:2]) for protocol in PROTOCOLS]
    log_path = tmp_path / "serve.log"
    with serving(python_repo, log_path) as (process, urls):
        # The answers without a stop (equal to the local predictor's: test_matches_local_predictor).
        with DerisClient(urls["grpc"], "grpc") as client:
            expected = {text: client.predict(image, text) for _, text in jobs}
        barrier = threading.Barrier(len(jobs))

        def one(job: tuple[str, str]) -> tuple[Prediction, float]:
            protocol, text = job
            with DerisClient(urls[protocol], protocol) as client:
                client.default_thresholds()  # read now: the stop makes the ensemble's config unavailable
                barrier.wait()
                return client.predict(image, text), time.monotonic()

        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(one, job) for job in jobs]
            # Once the first answer is back, the other requests have long been sent and are in flight.
            wait(futures, return_when=FIRST_COMPLETED)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_for_line(log_path, "new requests to deris are refused", process)
            with pytest.raises(ClientError, match="unknown model: 'deris'"):
                with DerisClient(urls["grpc"], "grpc") as late:
                    late.predict(image, "a late request")
            results = [future.result() for future in futures]
        code = process.wait(60)
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    finished_after = sum(end > signalled for _, end in results)
    assert finished_after >= len(jobs) - 1, f"only {finished_after} of {len(jobs)} requests were still in flight at the signal"
    for (_, text), (served, _) in zip(jobs, results):
        assert_same(served, expected[text])
    assert "every request in flight was answered" in log and "deris serve: stopped cleanly" in log
    assert_clean_stop(log)


def test_serve_command_sigterm_with_idle_keep_alive_connections(python_repo: Path, tmp_path: Path) -> None:
    """Idle HTTP keep-alive connections and gRPC channels do not hold up the stop: `deris serve` exits 0
    within seconds and the connections are closed. (Signalled directly, tritonserver would wait its
    whole exit timeout for the HTTP connection, then exit 1 without unloading the models.)"""
    repo = tmp_path / "repo"
    shutil.copytree(python_repo / "round_0", repo / "round_0")
    log_path = tmp_path / "serve.log"
    with serving(repo, log_path, "--exit-timeout", "30") as (process, urls):
        http = httpclient.InferenceServerClient(urls["http"])
        grpc = grpcclient.InferenceServerClient(urls["grpc"])
        try:
            assert http.is_server_ready() and grpc.is_server_ready()  # each now holds an idle connection
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(60)
            elapsed = time.monotonic() - start
        finally:
            http.close()
            grpc.close()
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert elapsed < 10, f"the stop took {elapsed:.1f} s"
    assert re.search(r"Found \d+ HTTP service connections", log), "the idle HTTP connection was not open at the stop"
    assert_clean_stop(log)


def test_serve_command_sigterm_past_the_exit_timeout(python_repo: Path, tmp_path: Path) -> None:
    """A stop that cannot finish within --exit-timeout (requests still in flight, or models still
    unloading: which one depends on the machine's speed) is cut short in bounded time, reported, and
    exits 1."""
    from deris.triton_repo.server import _EXIT_GRACE_S

    image = slow_image()
    log_path = tmp_path / "serve.log"
    with serving(python_repo, log_path, "--exit-timeout", "1") as (process, urls):

        def one(i: int) -> str:
            with DerisClient(urls["grpc"], "grpc", timeout=30) as client:
                try:
                    client.predict(image, f"{TEXTS[0]} {i}")
                except ClientError as exc:
                    return str(exc)
                return "answered"

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, i) for i in range(6)]
            wait(futures, return_when=FIRST_COMPLETED)
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(60)
            elapsed = time.monotonic() - start
            outcomes = [future.result() for future in futures]
    log = log_path.read_text()
    assert code == 1, log[-3000:]
    assert elapsed < 1 + _EXIT_GRACE_S + 5, f"the stop took {elapsed:.1f} s"
    # Usually "stopping anyway: after the exit timeout"; on a loaded machine tritonserver can also fail
    # an unload that still has requests and exit by itself. Either way the stop is reported unclean.
    assert "deris serve: the stop was not clean" in log, log[-3000:]
    # Every request got an answer or an error: none hangs past the stop.
    assert len(outcomes) == 6, outcomes
