"""Shared test fixtures: the golden data directory and an isolated HF home.

The golden tensors live in ``../shared/golden`` relative to the repository root. They are never
copied into the repo; a missing folder is a hard error, not a skip.
"""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def golden_path(name: str) -> Path:
    """Path of a golden file; raises (never skips) when the golden folder is absent."""
    if not GOLDEN_DIR.is_dir():
        raise FileNotFoundError(
            f"golden data folder not found at {GOLDEN_DIR}: the tests need ../shared/golden beside the repo"
        )
    path = GOLDEN_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"golden file missing: {path}")
    return path


@pytest.fixture(scope="session")
def golden():
    return golden_path


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_home(tmp_path_factory):
    """Dynamic modules (trust_remote_code) and caches go to a temp dir, never ~/.cache."""
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_MODULES_CACHE"] = str(home / "modules")
    yield
