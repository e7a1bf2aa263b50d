"""Lay this package's code out the way transformers' dynamic-module loader needs it.

The loader copies only files that the entry file reaches through single-dot relative imports of sibling files
(``from .name import X`` -> ``name.py``), so the ``vision_tower/`` package is flattened into
``vision_tower_<module>.py`` files. Its modules import nothing from the repo, so they are copied unchanged.
"""

import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent

# source path in this repo -> file name in a Hub folder
CODE_FILES = {
    "configuration_videochat_flash.py": "configuration_videochat_flash.py",
    "modeling_videochat_flash.py": "modeling_videochat_flash.py",
    "vision_tower/umt.py": "vision_tower_umt.py",
    "vision_tower/token_merging.py": "vision_tower_token_merging.py",
    "processing_videochat_flash.py": "processing_videochat_flash.py",
    "video_loading.py": "video_loading.py",
}


def copy_code_files(destination) -> list[str]:
    """Copy the model, processor and vision-tower code flat into `destination`; returns the written names."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for source, name in CODE_FILES.items():
        path = REPO_ROOT / source
        if not path.exists():
            raise FileNotFoundError(f"package file missing: {path}")
        shutil.copyfile(path, destination / name)
        written.append(name)
    return written
