"""``videochat-flash``: chat about a video, build Hub folders, convert original checkpoints, train.

    videochat-flash chat VIDEO "question" [--model DIR_OR_HUB_ID|tiny] [--max-frames N] [--device auto|cpu|cuda]
                                          [--dtype auto|float32|bfloat16|float16] [--max-new-tokens N]
                                          [--quantize none|int8|nf4]
    videochat-flash export DIR [--model ...] [--max-shard-size 4GB] [--base-model HUB_ID]
    videochat-flash convert SRC DST [--base-model HUB_ID] [--link-weights]
    videochat-flash make-tiny DIR [--seed N]
    videochat-flash train CONFIG
    videochat-flash niah --haystack VIDEO --needles NEEDLES.json --out DIR [--model ...] [--frames 1000,2000,...]
                         [--depths 0,0.2,...] [--fps 1] [--repeat-above N] [--yarn FACTOR] [--token-dropping]

``--model`` takes a folder of this package, an original VideoChat-Flash checkpoint (folder or Hub id: converted on
the fly into the cache, weights linked, not copied), a Hub id, or ``tiny`` (a tiny random model built offline).
Errors are reported on one line (set ``VIDEOCHAT_FLASH_DEBUG=1`` for the traceback). ``chat`` checks its options and
the video (it exists, is a readable media file with a video stream: PyAV's packet probe, no decoding) before it
imports torch or loads a model, so bad input fails at once. The progress bar is drawn only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from .hub_export import DEFAULT_MODEL_ID, ModelUnavailableError

PROG = "videochat-flash"
QUANTIZE_CHOICES = ("none", "int8", "nf4")
TINY_WARNING = (
    "note: --model tiny is a tiny model with RANDOM weights, built offline: its answers are random text "
    "(it only shows that everything runs)."
)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (argparse prints the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="VideoChat-Flash on transformers v5 (CPU or GPU).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="answer a question about a video")
    chat.add_argument("video", help="video file")
    chat.add_argument("question", help="what to ask about the video")
    chat.add_argument("--model", default=DEFAULT_MODEL_ID,
                      help=f"folder, Hub id or 'tiny' (default: {DEFAULT_MODEL_ID})")
    chat.add_argument("--max-frames", type=_positive_int, default=None,
                      help="most frames sampled from the video (default: chat()'s, 512)")
    chat.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="auto = cuda when available, else cpu")
    chat.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="auto = bfloat16 on cuda, float32 on cpu")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=None,
                      help="answer length cap (default: the model's)")
    chat.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                      help="the LLM's linear layers in int8 (torchao weight-only, CPU or GPU; needs the [quant] extra) "
                           "or nf4 (bitsandbytes 4-bit, CUDA only); the vision tower, projector and lm_head stay "
                           "unquantized. With --dtype auto the rest is bfloat16")
    chat.add_argument("--cache-dir", default=None, help="where tiny/converted models are kept")

    export = commands.add_parser("export", help="write a model as a self-contained Hub folder")
    export.add_argument("directory")
    export.add_argument("--model", default=DEFAULT_MODEL_ID, help="folder, Hub id or 'tiny'")
    export.add_argument("--max-shard-size", default="4GB")
    export.add_argument("--base-model", default=None, help="Hub id written as base_model in the model card")
    export.add_argument("--cache-dir", default=None)

    convert = commands.add_parser("convert", help="original checkpoint folder -> Hub folder of this package")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--base-model", default=None, help="Hub id written as base_model in the model card")
    convert.add_argument("--link-weights", action="store_true", help="symlink the safetensors instead of copying")

    tiny = commands.add_parser("make-tiny", help="write the tiny random model (offline) as a Hub folder")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)

    train = commands.add_parser("train", help="fine-tune from a YAML/JSON config (several processes: under torchrun "
                                              "or accelerate launch, -m videochat_flash.videochat_flash_cli train)")
    train.add_argument("config")
    _niah_parser(commands)
    return parser


def _numbers(kind):
    def parse(text: str):
        try:
            return tuple(kind(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def _niah_parser(commands) -> None:
    niah = commands.add_parser("niah", help="needle-in-a-haystack grid (results.jsonl, results.json, heatmap.png)")
    niah.add_argument("--haystack", required=True, help="haystack video file")
    niah.add_argument("--needles", required=True, help="needles JSON (the original's single- or multi-hop format)")
    niah.add_argument("--out", required=True, help="output folder (an interrupted run resumes there)")
    niah.add_argument("--model", default=DEFAULT_MODEL_ID, help="folder, Hub id or 'tiny'")
    niah.add_argument("--frames", type=_numbers(int), default=None, help="haystack lengths (default 1000,...,10000)")
    niah.add_argument("--depths", type=_numbers(float), default=None, help="needle depths (default 0,0.2,...,1)")
    niah.add_argument("--fps", type=float, default=1.0, help="haystack frames per second of video (default 1)")
    niah.add_argument("--repeat-above", type=_positive_int, default=None,
                      help="longer grids encode half the frames, twice (the original: 7500)")
    niah.add_argument("--yarn", type=float, default=None, metavar="FACTOR", help="YaRN rope scaling (the original: 4)")
    niah.add_argument("--token-dropping", action="store_true", help="in-LLM token dropping on (off in the original)")
    niah.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    niah.add_argument("--device-map", default=None, help="e.g. auto: spread the model over the GPUs (accelerate)")
    niah.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    niah.add_argument("--cache-dir", default=None, help="where tiny/converted models and haystack tokens are kept")


def _device_and_dtype(device: str, dtype: str, quantize: str = "none"):
    """`auto` resolved: cuda when available; bfloat16 on cuda or beside quantized weights (which compute in the
    activations' dtype: bfloat16 halves that traffic and the unquantized rest), float32 on a CPU otherwise (the
    original's exact arithmetic)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" or quantize != "none" else "float32"
    return device, getattr(torch, dtype)


def check_quantize(quantize: str, device: str) -> None:
    """What ``--quantize`` needs, checked before any model loads: int8 needs torchao; nf4 needs a CUDA device
    (bitsandbytes' 4-bit kernels) and bitsandbytes. Raises ValueError or ImportError that says what to do."""
    import importlib.util

    if quantize == "nf4" and device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if quantize == "nf4" and device != "cuda":
        raise ValueError("--quantize nf4 is bitsandbytes 4-bit, which needs a CUDA GPU; on a CPU use --quantize int8 "
                         "(torchao) or --dtype bfloat16")
    package = {"int8": ("torchao", "pip install 'videochat-flash-hf[quant]'"),
               "nf4": ("bitsandbytes", "pip install bitsandbytes")}.get(quantize)
    if package is not None and importlib.util.find_spec(package[0]) is None:
        raise ImportError(f"--quantize {quantize} needs {package[0]}: {package[1]}")


def quantization_config(quantize: str, dtype=None):
    """transformers' quantization config for ``--quantize`` (None for ``none``): ``int8`` = torchao int8 weight-only
    (``TorchAoConfig(Int8WeightOnlyConfig())``), ``nf4`` = bitsandbytes 4-bit NF4 computing in `dtype`. Only the
    LLM's linear layers are quantized: the model class keeps the vision tower and projector out
    (``_keep_in_fp32_modules``, which both quantizers read) and the quantizers keep the output embeddings
    (``lm_head``, tied to the input embeddings in the 2B checkpoint) by default."""
    if quantize == "none":
        return None
    if quantize == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(f"--quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")


def load_model(folder, device: str = "auto", dtype: str = "auto", quantize: str = "none"):
    """The model of a Hub folder of this package as ``chat`` loads it, in eval mode: `device` / `dtype` as the
    options (``auto`` included), `quantize` one of ``none``, ``int8``, ``nf4``. Quantized weights are created on
    their device while loading (``device_map``; bitsandbytes models cannot be moved afterwards)."""
    from transformers import AutoModel

    check_quantize(quantize, device)
    device, dtype = _device_and_dtype(device, dtype, quantize)
    quantization = quantization_config(quantize, dtype)
    if quantization is None:
        return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
    placement = {} if device == "cpu" else {"device_map": device}  # device_map needs accelerate: not on a CPU
    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, quantization_config=quantization,
                                     **placement).eval()


def _load(folder, device: str, dtype: str, quantize: str = "none"):
    from transformers import AutoTokenizer

    model = load_model(folder, device, dtype, quantize)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return model, tokenizer


def local_video(video: str):
    """`video` checked before loading anything (numpy, Pillow and PyAV only), as a local path: an http(s) or data
    URL is downloaded once here (the copy is what the command reads); a path must exist and be a readable,
    non-empty regular file or a frame folder, and a file a still image or a media file with video frames (PyAV's
    packet probe, no decoding). Raises ``FileNotFoundError`` or ``ValueError`` with ``video_loading``'s messages."""
    from . import video_loading

    video = video_loading.local_media(video)
    kind, _, path = video_loading._classify_input(video)
    if kind == "file" and video_loading.av is not None:
        with warnings.catch_warnings():  # a damaged file warns again when it is loaded
            warnings.simplefilter("ignore")
            video_loading._pyav_probe(path)
    return video


@contextlib.contextmanager
def _bars_on_terminals_only():
    """transformers' and the Hub's progress bars (weight loading, downloads) off while stderr is no terminal, so logs
    hold no carriage returns; chat's video bar decides the same way itself (tqdm ``disable=None``)."""
    if sys.stderr.isatty():
        yield
        return
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def cmd_chat(args) -> int:
    from .hub_export import resolve_model

    video = local_video(args.video)  # before torch is imported or any model loads
    check_quantize(args.quantize, args.device)  # (load_model checks again; here it fails before any download)
    with _bars_on_terminals_only():
        folder = resolve_model(args.model, cache_dir=args.cache_dir)
        if args.model == "tiny":
            print(TINY_WARNING, file=sys.stderr)
        model, tokenizer = _load(folder, args.device, args.dtype, args.quantize)
        generation = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
        sampling = {"max_num_frames": args.max_frames} if args.max_frames else {}
        answer = model.chat(video, tokenizer, args.question, return_history=False, generation_config=generation,
                            progress=True, **sampling)
    print(answer)
    return 0


@_bars_on_terminals_only()
def cmd_export(args) -> int:
    from .hub_export import export_hub_folder, resolve_model

    folder = resolve_model(args.model, cache_dir=args.cache_dir)
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    base_model = args.base_model
    if base_model is None and args.model != "tiny" and not os.path.isdir(args.model):
        base_model = args.model
    export_hub_folder(model, processor, args.directory, base_model=base_model, max_shard_size=args.max_shard_size)
    print(f"wrote {args.directory}")
    return 0


def cmd_convert(args) -> int:
    from .hub_export import convert_original_checkpoint

    convert_original_checkpoint(args.source, args.destination, base_model=args.base_model,
                                link_weights=args.link_weights)
    print(f"wrote {args.destination}")
    return 0


def cmd_make_tiny(args) -> int:
    from .hub_export import make_tiny_folder

    make_tiny_folder(args.directory, seed=args.seed)
    print(f"wrote {args.directory} (tiny model with random weights: its answers are random)")
    return 0


def cmd_train(args) -> int:
    from .training_videochat_flash import run_training  # imported only when training: it needs the train extras

    run_training(args.config)
    return 0


def cmd_niah(args) -> int:
    from . import niah_videochat_flash as niah
    from .hub_export import resolve_model

    haystack = local_video(args.haystack)  # the video, the options, the needles file and the haystack length before any model
    settings = niah.settings_from_args(args)
    with _bars_on_terminals_only():
        folder = resolve_model(args.model, cache_dir=args.cache_dir)
        device, dtype = _device_and_dtype(args.device, args.dtype)
        model, processor = niah.load_model(folder, device, dtype, args.device_map)
        results = niah.run_niah(model, processor, haystack, args.needles, args.out, settings, progress=True)
    written = "results.jsonl, results.json" + (", heatmap.png" if results["heatmap"] else "")
    print(f"average accuracy {results['average_accuracy']:.4f}; wrote {written} in {args.out}")
    return 0


COMMANDS = {"chat": cmd_chat, "export": cmd_export, "convert": cmd_convert, "make-tiny": cmd_make_tiny,
            "train": cmd_train, "niah": cmd_niah}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, ModelUnavailableError, ValueError)):
        return text
    return f"{type(error).__name__}: {text}"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ModelUnavailableError, FileNotFoundError, ValueError, ImportError, OSError, RuntimeError) as error:
        if os.environ.get("VIDEOCHAT_FLASH_DEBUG"):
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
