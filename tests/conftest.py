"""Shared test fixtures: the golden data directory and an isolated HF home.

The golden tensors live in ``../shared/golden`` relative to the repository root. They are never
copied into the repo; a missing folder is a hard error, not a skip.
"""

import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dynamic modules (trust_remote_code) and caches go to a fresh temp dir, never ~/.cache. transformers
# reads these when it is first imported, so they are set here, before any test module imports it.
_HF_HOME = tempfile.mkdtemp(prefix="vcf_hf_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_MODULES_CACHE"] = os.path.join(_HF_HOME, "modules")



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
