"""``deris client``: query the ``deris`` ensemble of a Triton server and write ``deris predict``'s files.

The raw image bytes and the expression go to the server as they are (preprocessing runs there);
the answer is rebuilt into :class:`deris.prediction.Prediction` objects, so the result files are
written by the same code as ``deris predict`` (``deris.outputs.write_prediction_files``).

>>> with DerisClient("127.0.0.1:8001", protocol="grpc") as client:
...     prediction = client.predict(Path("kitchen.jpg").read_bytes(), "the cup left of the kettle")
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from deris.cli_support import EXIT_OK, ToolError, UsageError, add_command, add_force, add_quiet
from deris.prediction import THRESHOLDS, Prediction, check_threshold

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
MODEL = "deris"
OUTPUTS = ("MASK", "SCORES", "NO_TARGET", "EXISTENCE_PROB")


class ClientError(ToolError):
    """The server could not be reached or answered with an error; the message says which."""


class DerisClient:
    """A connection to a Triton server serving the ``deris`` ensemble.

    ``url`` is ``host:port`` (an ``http://``, ``https://`` or ``grpc://`` prefix is accepted);
    ``protocol`` is ``http`` or ``grpc``; ``timeout`` is in seconds.
    """

    def __init__(self, url: str, protocol: str = "http", *, model: str = MODEL, timeout: float = 60.0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; accepted: {', '.join(PROTOCOLS)}")
        self.protocol, self.model, self.timeout = protocol, model, timeout
        address, ssl = _split_url(url, protocol)
        self.url = address
        if protocol == "http":
            import tritonclient.http as module

            self._client: Any = module.InferenceServerClient(
                address, ssl=ssl, connection_timeout=timeout, network_timeout=timeout
            )
        else:
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(address, ssl=ssl)
        self._module: Any = module
        self._defaults: dict[str, float] | None = None

    def close(self) -> None:
        # Open keep-alive connections hold up a server's shutdown, so always close.
        self._client.close()

    def __enter__(self) -> DerisClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _where(self) -> str:
        return f"the Triton server at {self.url} ({self.protocol})"

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one tritonclient call; turn its failures into ClientErrors that say what happened."""
        from tritonclient.utils import InferenceServerException

        try:
            return function(*args, **kwargs)
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if "DEADLINE_EXCEEDED" in status:
                raise ClientError(f"no answer from {self._where()} within {self.timeout} s") from exc
            if "UNAVAILABLE" in status:
                raise ClientError(f"cannot reach {self._where()}: {exc.message()}; is `deris serve` running there?") from exc
            raise ClientError(f"{what} failed: {self._where()} answered [{status or 'error'}] {exc.message()}") from exc
        except TimeoutError as exc:
            raise ClientError(f"no answer from {self._where()} within {self.timeout} s") from exc
        except OSError as exc:  # the HTTP client raises connection errors as they come
            raise ClientError(
                f"cannot reach {self._where()}: {type(exc).__name__}: {exc}; is `deris serve` running there?"
            ) from exc

    def default_thresholds(self) -> dict[str, float]:
        """The server's default score and mask thresholds (from the ensemble's config parameters)."""
        if self._defaults is None:
            if self.protocol == "http":
                config = self._call("reading the model config", self._client.get_model_config, self.model)
            else:
                config = self._call("reading the model config", self._client.get_model_config, self.model, as_json=True)["config"]
            parameters = config.get("parameters", {})
            missing = [name for name in THRESHOLDS if name not in parameters]
            if missing:
                raise ClientError(
                    f"model {self.model!r} on {self._where()} has no {', '.join(missing)} parameter; "
                    "is it a repository from `deris-export triton-repo`?"
                )
            self._defaults = {name: float(parameters[name]["string_value"]) for name in THRESHOLDS}
        return self._defaults

    def predict(
        self,
        image: bytes,
        text: str | bytes,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
    ) -> Prediction:
        """One encoded image (the file's bytes) and one expression -> the server's Prediction.

        Thresholds left as None use the server's defaults.
        """
        overrides = {k: v for k, v in zip(THRESHOLDS, (score_threshold, mask_threshold)) if v is not None}
        used = self.default_thresholds() | overrides
        encoded = text.encode("utf-8") if isinstance(text, str) else text
        inputs = []
        for name, value in (("IMAGE", bytes(image)), ("TEXT", encoded)):
            tensor = self._module.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
            inputs.append(tensor)
        outputs = [self._module.InferRequestedOutput(name) for name in OUTPUTS]
        timeout = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self._call(
            "inference", self._client.infer, self.model, inputs, outputs=outputs, parameters=overrides or None, **timeout
        )
        arrays = {name: result.as_numpy(name) for name in OUTPUTS}
        return _prediction(arrays, used["score_threshold"])


def _split_url(url: str, protocol: str) -> tuple[str, bool]:
    """``host:port`` and whether to use TLS, from a URL with or without a scheme."""
    schemes = {"http": {"http://": False, "https://": True}, "grpc": {"grpc://": False}}[protocol]
    for scheme, ssl in schemes.items():
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/"), ssl
    if "://" in url:
        accepted = ", ".join(f"{scheme}host:port" for scheme in schemes)
        raise ValueError(f"URL {url!r} does not fit protocol {protocol}; use host:port or {accepted}")
    return url.rstrip("/"), False


def _prediction(arrays: dict[str, np.ndarray], score_threshold: float) -> Prediction:
    """Rebuild one Prediction from a single-item response."""
    scores = arrays["SCORES"][0].astype(np.float32)
    # The server selects queries with float32 scores > threshold (torch compares in float32).
    selected = [int(i) for i in np.flatnonzero(scores > np.float32(score_threshold))]
    no_target = bool(arrays["NO_TARGET"][0, 0])
    if no_target != (not selected):
        raise ClientError(
            f"the server's decision (no_target={no_target}) disagrees with its scores {scores.tolist()} at "
            f"score threshold {score_threshold}: the server's default thresholds changed while running?"
        )
    return Prediction(
        mask=arrays["MASK"][0].astype(bool),
        scores=scores,
        selected=selected,
        no_target=no_target,
        existence_prob=float(arrays["EXISTENCE_PROB"][0, 0]),
        score_threshold=score_threshold,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "client", run=run_client,
        help="segment with a running Triton server (`deris serve`) and write deris predict's files",
        description="Send an image and one or more expressions to the `deris` ensemble of a Triton server and "
        "write, as `deris predict` does, a mask PNG and an overlay PNG per expression plus one JSON. Needs no torch.",
        examples="  deris client --url 127.0.0.1:8000 --image kitchen.jpg --text 'the cup left of the kettle' --out out/",
    )
    p.add_argument("--url", help="server address host:port (default 127.0.0.1:8000, or 127.0.0.1:8001 with --grpc)")
    p.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    p.add_argument("--image", type=Path, required=True, help="input image (JPEG, PNG, ...), sent as it is")
    p.add_argument("--text", action="append", required=True, help="referring expression; repeat for several")
    p.add_argument("--score-threshold", type=float, help="override the server's score threshold, in (0, 1)")
    p.add_argument("--model", default=MODEL, help=f"ensemble name (default {MODEL})")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_force(p)
    add_quiet(p)


def run_client(args: argparse.Namespace) -> int:
    import cv2

    from deris.outputs import print_predictions, write_prediction_files
    from deris.preprocess import load_image

    protocol = "grpc" if args.grpc else "http"
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image {args.image}: {exc}") from exc
    if args.score_threshold is not None:
        check_threshold("score_threshold", args.score_threshold)
    with DerisClient(args.url or DEFAULT_URLS[protocol], protocol, model=args.model, timeout=args.timeout) as client:
        predictions = [client.predict(data, text, score_threshold=args.score_threshold) for text in args.text]
    # The server accepted the image, so it decodes here too; the overlay needs the original pixels.
    image_rgb = cv2.cvtColor(load_image(data), cv2.COLOR_BGR2RGB)
    files = write_prediction_files(args.out, args.image.name, image_rgb, args.text, predictions, force=args.force)
    print_predictions(args.text, predictions, files, args.out)
    return EXIT_OK
