"""Session-wide test setup and fixtures.

``TRITON_INTERPRET=1`` must be set before deris is imported: Triton reads it when the kernels are
defined. The fixtures below are built lazily, once per run, by the tests that ask for them.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.register_assert_rewrite("tis")  # before its import: the helpers' asserts explain themselves

import exports  # noqa: E402
from background import Background  # noqa: E402
from spm import train_sentencepiece  # noqa: E402
from tis import MAX_BATCH_SIZE, PRESET, QUEUE_DELAY_US, TinyExport, free_port  # noqa: E402

BACKGROUND = pytest.StashKey[Background]()
DECLARED = pytest.StashKey[dict[str, list[str]]]()


def background_jobs(directory: Path) -> dict[str, list[str]]:
    """The session exports, made by tests/exports.py."""
    return exports.jobs(exports.FIXTURES, directory)


def _job_fixture(key: str) -> str:
    return key.split(":")[0]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Declare the background jobs (tests/background.py) and run the test modules that wait for one
    after those that do not, so that the jobs have the other modules' time to finish in. A job named
    ``F`` or ``F:...`` is for the fixture ``F``."""
    declared: dict[str, list[str]] = {}
    directory = Path(tempfile.mkdtemp(prefix="deris-background-"))
    for module in dict.fromkeys([sys.modules[__name__], *(item.module for item in items if isinstance(item, pytest.Function))]):
        if hasattr(module, "background_jobs"):
            declared.update(module.background_jobs(directory))
    config.stash[BACKGROUND] = Background(directory)
    config.stash[DECLARED] = declared
    fixtures = {_job_fixture(key) for key in declared}
    waits = {item.getparent(pytest.Module) for item in items if fixtures & set(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: item.getparent(pytest.Module) in waits)  # stable: each group keeps its order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the background jobs that the selected tests' fixtures need, in the order the tests need them."""
    if BACKGROUND not in session.config.stash or session.config.option.collectonly:
        return
    first_use: dict[str, int] = {}
    for index, item in enumerate(session.items):
        for fixture in getattr(item, "fixturenames", ()):
            first_use.setdefault(fixture, index)
    declared = session.config.stash[DECLARED]
    wanted = sorted((first_use[_job_fixture(key)], key) for key in declared if _job_fixture(key) in first_use)
    for _, key in wanted:
        session.config.stash[BACKGROUND].start(key, declared[key])


def pytest_sessionfinish(session: pytest.Session) -> None:
    if BACKGROUND in session.config.stash:
        session.config.stash[BACKGROUND].close()


@pytest.fixture(scope="session")
def background(request: pytest.FixtureRequest) -> Background:
    return request.config.stash[BACKGROUND]


@pytest.fixture(scope="session")
def tiny_export(background: Background, tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    import deris

    folder = tmp_path_factory.mktemp("deris_tiny")
    # The background export's weights (the same seed).
    checkpoint = deris.save_checkpoint(exports.tiny_model(), folder / "deris_tiny.safetensors")
    return TinyExport(checkpoint, exports.exported(background, "tiny_export"), train_sentencepiece(folder / "spm"))


@pytest.fixture(scope="session")
def tiny_plugin_export(background: Background) -> Path:
    """The same model (seed 0) with TensorRT's MSDA plugin nodes instead of GridSample: every graph,
    fp32, at the preset's 128 px."""
    return exports.exported(background, "tiny_plugin_export")


@pytest.fixture(scope="session")
def demo_export(background: Background) -> Path:
    """The shipped demo model exported as ``deris-export onnx`` does by default (every graph at its
    preset's resolution, fp32, GridSample MSDA, ONNX Runtime's optimised graphs beside them)."""
    return exports.exported(background, "demo_export")


@pytest.fixture(scope="session")
def demo_fp16_export(background: Background) -> Path:
    """The shipped demo model's fp16 graphs, those the fused pipeline runs (cognition, perception, decoder)."""
    return exports.exported(background, "demo_fp16_export")


@pytest.fixture(scope="session")
def python_repo(tiny_export: TinyExport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deris.triton_repo.repository import generate_triton_repo

    return generate_triton_repo(
        tiny_export.onnx_dir,
        tmp_path_factory.mktemp("repo") / "python",
        "python",
        "rounds",
        spm_path=tiny_export.spm,
        max_batch_size=MAX_BATCH_SIZE,
        max_queue_delay_us=QUEUE_DELAY_US,
    )


@pytest.fixture(scope="session")
def triton_server(python_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from deris.triton_repo.server import TritonServer

    log_path = tmp_path_factory.mktemp("tritonserver") / "server.log"
    with open(log_path, "w") as log:
        server = TritonServer(python_repo, http_port=free_port(), grpc_port=free_port(), log=log)
        server.start()
        try:
            server.wait_ready(timeout=240)
            yield server
        finally:
            code = server.stop()
    assert code == 0, f"tritonserver exited with {code}; see {log_path}"


@pytest.fixture(scope="session")
def local_predictor(tiny_export: TinyExport) -> Any:
    from deris.predictor import Predictor

    return Predictor.from_checkpoint(PRESET, tiny_export.checkpoint, tiny_export.spm)
