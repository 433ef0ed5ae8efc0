import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Tests never touch the user's caches or the network.
os.environ.setdefault("VLMTOOLS_QUIET", "0")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLMTOOLS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """20 small random RGB PNGs plus one of each awkward kind."""
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(d / f"img{i:02d}.png")
    return d


@pytest.fixture(scope="session")
def tiny_encoder():
    from vlmtools.models import ModelSpec, load_model

    return load_model(ModelSpec.parse("vlmtools-tiny"), "cpu")


# ----------------------------------------------------------------------------- processes and waits
# A test that starts a process waits on what the process does (a file, a line, a state), with a deadline
# that bounds a hang rather than timing the code: a loaded laptop may be ten times slower than an idle one.
# Every process a test starts is ended at teardown, whether the test passed or not.

LOADED_DEADLINE = 120.0  # seconds; generous on purpose


def wait_until(predicate, what: str, timeout: float = LOADED_DEADLINE, every: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail the test saying that ``what`` did not happen in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        time.sleep(every)


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat ("R", "S", "T" stopped, "Z" zombie...), None when gone (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def end_process(proc: subprocess.Popen, group: bool = False) -> None:
    """Kill ``proc`` (its whole process group when ``group``: workers too) if still there, reap it, close its pipes."""
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=60)
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def default_sigint() -> None:
    """preexec_fn for a child a test will ^C: SIGINT back to its default disposition, as under a terminal.
    A suite started as a background job of a script (`cmd &`, nohup) runs with SIGINT ignored, children
    inherit that, and a Python child whose SIGINT is ignored at start-up never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def spawn():
    """``spawn(args, **popen_kwargs)`` starts a process (SIGINT at its default: default_sigint); at teardown
    each one is ended (end_process; the whole group when started with start_new_session=True), whether the
    test passed or failed."""
    started: list[tuple[subprocess.Popen, bool]] = []

    def start(args, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("preexec_fn", default_sigint)
        proc = subprocess.Popen(args, **kwargs)
        started.append((proc, bool(kwargs.get("start_new_session"))))
        return proc

    yield start
    for proc, group in started:
        end_process(proc, group)


def run_cli(*args, input=None, env=None, timeout=120):
    """Run `python -m vlmtools ...` in a subprocess (real process, real stdio)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlmtools", *map(str, args)], input=input, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


# pydantic: typer converts option values with it; vlmtools.cli.coerce makes that needless for ordinary values
HEAVY_MODULES = ("torch", "open_clip", "torchvision", "pydantic")
_REPORT_MODULES = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: sys.stderr.write('LOADED ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules}"
    f" & set({HEAVY_MODULES!r}))) + '\\n'))\n"
    "sys.argv = ['vlmtools'] + sys.argv[1:]\n"
    "from vlmtools.cli.app import main\n"
    "main()\n")


def run_cli_modules(*args, env=None, timeout=120):
    """Run `vlmtools ARGS` in a fresh interpreter: (the completed process, the heavy packages it imported:
    torch, open_clip, torchvision, pydantic). Its stderr ends with the LOADED line."""
    proc = subprocess.run([sys.executable, "-c", _REPORT_MODULES, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    loaded = json.loads(proc.stderr.rsplit("LOADED ", 1)[1]) if "LOADED " in proc.stderr else None
    return proc, loaded
