#!/usr/bin/env bash
# Issue 15's GPU measurements in one call (H100/H200 class): DRaFT-1 beside the TRL anchor (levers off and on),
# ReNO, the ComfyUI path, SDXL-/Flux-shaped steps. JSON lines go to $OUT/results.jsonl as they are measured
# (a time limit keeps what came before it), children's other output to $OUT/log.txt. See bench/gpu_run.py.
#
#   bash bench/gpu_run.sh --check      # about 2-3 min: install, imports, every CUDA path on tiny shapes
#   bash bench/gpu_run.sh              # at most 8 min (a 430 s budget inside): the measurements, by priority
#   bash bench/gpu_run.sh --tiny       # dry run of the full list on tiny shapes (CPU when there is no GPU)
#
# The GPU machine has no network. It has CUDA torch (and transformers, timm, safetensors, huggingface_hub); bring
# the rest as wheels in .whl/ (git-ignored) at the repository root, downloaded on a machine with network:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy wcwidth importlib_metadata zipp \
#       trl==0.23.1 peft accelerate
#   # only for the ComfyUI phase (ComfyUI's imports; check which the machine lacks in the --check output):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl torchsde trampoline einops
#
# All of them are pure-Python (py3-none-any) wheels, about 10 MB in all. The --check output lists which of
# ComfyUI's imports the machine lacks (comfy_modules). A ComfyUI checkout for the ComfyUI phase: copy one
# without its .git into .comfyui/ComfyUI (git-ignored, about 16 MB), e.g.
#   rsync -a --exclude .git /path/to/ComfyUI/ .comfyui/ComfyUI/
# or set COMFYUI_PATH. With the device tool: run(command="bash bench/gpu_run.sh --check", carry=[".whl",
# ".comfyui/ComfyUI"], timeout_s=240), then run(command="bash bench/gpu_run.sh", carry=[...], timeout_s=480),
# then copy $OUT/results.jsonl into bench/results/.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/out/gpu_run}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
SITE="$ROOT/.gpu_site"                 # wheels install here (git-ignored), never into the machine's Python

# the pack imports as `rewardlab`: a folder outside the tree holding a link of that name to the repository root
LINKS="$(mktemp -d)"
ln -sfn "$ROOT" "$LINKS/rewardlab"
export PYTHONPATH="$SITE:$LINKS${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# compiled kernels stay on the machine between calls (a warm machine's second run compiles less)
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/torchinductor" TRITON_CACHE_DIR="$ROOT/.cache/triton"
if [ -z "${COMFYUI_PATH:-}" ] && [ -d "$ROOT/.comfyui/ComfyUI/comfy" ]; then
  export COMFYUI_PATH="$ROOT/.comfyui/ComfyUI"
fi

if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  echo "installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheels into $SITE" >&2
  "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "$ROOT"/.whl/*.whl \
    >>"$OUT/log.txt" 2>&1 || echo "pip install failed; see $OUT/log.txt" >&2
fi
echo "python $PY; results in $OUT/results.jsonl" >&2
exec "$PY" "$ROOT/bench/gpu_run.py" --out "$OUT" "$@"
