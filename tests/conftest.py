import json
import os
import subprocess
import sys
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


def run_cli(*args, input=None, env=None, timeout=120):
    """Run `python -m vlmtools ...` in a subprocess (real process, real stdio)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlmtools", *map(str, args)], input=input, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


HEAVY_MODULES = ("torch", "open_clip", "torchvision")
_REPORT_MODULES = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: sys.stderr.write('LOADED ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules}"
    f" & set({HEAVY_MODULES!r}))) + '\\n'))\n"
    "sys.argv = ['vlmtools'] + sys.argv[1:]\n"
    "from vlmtools.cli.app import main\n"
    "main()\n")


def run_cli_modules(*args, env=None, timeout=120):
    """Run `vlmtools ARGS` in a fresh interpreter: (the completed process, the heavy packages it imported:
    torch, open_clip, torchvision). Its stderr ends with the LOADED line."""
    proc = subprocess.run([sys.executable, "-c", _REPORT_MODULES, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    loaded = json.loads(proc.stderr.rsplit("LOADED ", 1)[1]) if "LOADED " in proc.stderr else None
    return proc, loaded
