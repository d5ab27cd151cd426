"""What runs without torch, Triton or the model, and one CLI convention across every command.

Each check runs in a fresh interpreter whose ``sys.modules`` blocks the named packages: an import
of any of them (direct or through a dependency) raises ImportError there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tis import TinyExport, encode, read_config, small, synthetic_image

BLOCK = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
"""


def run_blocked(
    code: str, blocked: tuple[str, ...] = ("torch", "triton"), prelude: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    script = BLOCK.format(blocked=blocked) + prelude + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "argv",
    [["deris", "--help"], ["deris", "client", "--help"], ["deris", "serve", "--help"], ["deris-export", "--help"],
     ["deris-export", "onnx", "--help"], ["deris-export", "trt", "--help"], ["deris-export", "triton-repo", "--help"]],
)
def test_help_needs_no_torch(argv: list[str]) -> None:
    module = "deris.cli" if argv[0] == "deris" else "deris.export.cli"
    result = run_blocked(f"""
        import {module} as cli
        try:
            cli.main({argv[1:]!r})
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        assert "torch" not in sys.modules or sys.modules["torch"] is None
    """)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    if len(argv) > 2 or argv[0] == "deris" and argv[1] != "--help":
        assert "exit codes:" in result.stdout and "130  interrupted" in result.stdout


def test_client_needs_no_torch(triton_server: Any, local_predictor: Any, tmp_path: Path) -> None:
    """`deris client` against the real server, torch unimportable: the same mask as the local predictor."""
    image = tmp_path / "scene.png"
    image.write_bytes(encode(small(synthetic_image(), (96, 80))))
    out = tmp_path / "out"
    result = run_blocked(f"""
        from deris.cli import main
        code = main(["client", "--url", {triton_server.http_url!r}, "--image", {str(image)!r}, "--text", "the red part",
                     "--out", {str(out)!r}, "--quiet"])
        sys.exit(code)
    """)
    assert result.returncode == 0, result.stderr
    local = local_predictor.predict(image, "the red part")
    served = json.loads((out / "scene.json").read_text())["results"][0]
    assert served["selected_queries"] == local.selected and served["mask_pixels"] == int(local.mask.sum())


def _model_config_json(path: Path) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(read_config(path), preserving_proto_field_name=True)


# The python backend's stub provides these classes natively; outside the server we stand in for
# exactly what the models call, and take everything else from the real triton_python_backend_utils.
BACKEND_SHIM = """
import importlib.util, types
from pathlib import Path
import numpy as np
spec = importlib.util.find_spec("pytriton")
utils_path = Path(spec.origin).parent / "tritonserver" / "backends" / "python" / "triton_python_backend_utils.py"
utils_spec = importlib.util.spec_from_file_location("triton_python_backend_utils", utils_path)
pb_utils = importlib.util.module_from_spec(utils_spec)
utils_spec.loader.exec_module(pb_utils)
sys.modules["triton_python_backend_utils"] = pb_utils

class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)
    def name(self):
        return self._name
    def as_numpy(self):
        return self._array

class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error = list(output_tensors), error

class TritonError(Exception):
    INVALID_ARG = 3
    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code

class Request:
    def __init__(self, tensors, parameters="{}"):
        self._tensors, self._parameters = tensors, parameters
    def inputs(self):
        return self._tensors
    def parameters(self):
        return self._parameters

pb_utils.Tensor, pb_utils.InferenceResponse, pb_utils.TritonError = Tensor, InferenceResponse, TritonError

def load_model(path):
    spec = importlib.util.spec_from_file_location("model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()
"""


def test_preprocess_model_needs_no_torch(python_repo: Path, tmp_path: Path) -> None:
    """The repository's preprocess model.py, torch and Triton unimportable, gives deris.preprocess's tensors."""
    from deris.preprocess import preprocess_image

    image = encode(small(synthetic_image(), (90, 70)))
    args = {"model_config": _model_config_json(python_repo / "preprocess" / "config.pbtxt"),
            "model_repository": str(python_repo / "preprocess"), "model_version": "1"}
    out = tmp_path / "img.npy"
    result = run_blocked(prelude=BACKEND_SHIM, code=f"""
        model = load_model({str(python_repo / "preprocess" / "1" / "model.py")!r})
        model.initialize({args!r})
        request = Request([Tensor("IMAGE", np.array([[{image!r}]], dtype=object)), Tensor("TEXT", np.array([[b"the cat"]], dtype=object))])
        (response,) = model.execute([request])
        assert response.error is None, response.error
        tensors = {{t.name(): t.as_numpy() for t in response.output_tensors}}
        np.save({str(out)!r}, tensors["img"])
        assert tensors["token_ids"].shape[0] == 1 and "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    assert result.returncode == 0, result.stderr
    expected = preprocess_image(image, 128).img
    np.testing.assert_array_equal(np.load(out)[0], expected)


def test_postprocess_model_needs_no_model_or_kernels(python_repo: Path, tiny_export: TinyExport, tmp_path: Path) -> None:
    """The postprocess model.py runs with deris.modeling and deris.kernels unimportable."""
    rng = np.random.default_rng(0)
    mask_logits = rng.normal(size=(1, 5, 32, 32)).astype(np.float32)
    refer_logits = np.array([[[2.0, -2.0], [-1.0, 1.0], [0.0, 0.0], [3.0, 0.0], [-3.0, 1.0]]], np.float32)
    args = {"model_config": _model_config_json(python_repo / "postprocess" / "config.pbtxt"),
            "model_repository": str(python_repo / "postprocess"), "model_version": "1"}
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, mask_logits=mask_logits, refer_logits=refer_logits, existence=np.zeros((1, 1), np.float32),
             original_size=np.array([[50, 60]], np.int64))
    result = run_blocked(prelude=BACKEND_SHIM, code=f"""
        model = load_model({str(python_repo / "postprocess" / "1" / "model.py")!r})
        model.initialize({args!r})
        feeds = np.load({str(feeds)!r})
        (response,) = model.execute([Request([Tensor(k, feeds[k]) for k in feeds.files])])
        assert response.error is None, response.error
        tensors = {{t.name(): t.as_numpy() for t in response.output_tensors}}
        assert tensors["MASK"].shape == (1, 50, 60), tensors["MASK"].shape
        assert not tensors["NO_TARGET"][0, 0]
        loaded = [m for m in ("deris.modeling", "deris.kernels", "deris.modeling.deris") if sys.modules.get(m) is not None]
        assert not loaded, loaded
    """, blocked=("deris.modeling", "deris.kernels", "triton"))
    assert result.returncode == 0, result.stderr


def _subcommands(parser: Any) -> dict[str, Any]:
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_one_cli_convention() -> None:
    """Every command of both CLIs lists the exit codes, names presets with --preset, replaces
    outputs only with --force and, where it writes output, can be made --quiet."""
    from deris.cli import build_parser as deris_parser
    from deris.cli_support import EXIT_CODES
    from deris.export.cli import build_parser as export_parser

    instant = {"deris eval-merge"}  # merges saved states: nothing long-running to quiet
    commands = {f"deris {k}": v for k, v in _subcommands(deris_parser()).items()}
    commands |= {f"deris-export {k}": v for k, v in _subcommands(export_parser()).items()}
    assert {"deris predict", "deris client", "deris serve", "deris-export onnx", "deris-export trt", "deris-export triton-repo"} <= set(commands)
    for name, parser in commands.items():
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert parser.epilog and EXIT_CODES in parser.epilog, f"{name}: --help does not list the exit codes"
        assert "%%" not in parser.format_help(), f"{name}: --help shows a doubled %% (only help= strings are %-formatted)"
        if "--out" in flags:
            assert "--force" in flags, f"{name} writes --out but has no --force"
            assert "--quiet" in flags or name in instant, f"{name} writes output but has no --quiet"
        for other in ("--onnx-dir", "--export", "--config"):
            assert other not in flags, f"{name} uses {other}; the convention is --onnx / --preset"
        preset = [a for a in parser._actions if "--preset" in a.option_strings]
        if preset:
            assert preset[0].type.__name__ == "preset_name", f"{name}: --preset does not accept names the common way"
