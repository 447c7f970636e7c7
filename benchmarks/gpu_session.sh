python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# One GPU session of benchmarks/vs_nnunet.py (issue 15), from the repository root, in under 8 min:
#
#   OUT=/path bash benchmarks/gpu_session.sh            # H200: nnU-Net 3d_fullres size
#   SMALL=1 OUT=/tmp/out bash benchmarks/gpu_session.sh # CPU smoke test of the same script
#   WHICH=jax_bf16,torch_compiled_fp16 INFER_WHICH=jax_bf16 BUDGET=300 STEP_MAX=200 ...  # a shorter re-check
#
# The first line installs the wheels in .whl/ (git-ignored, carried to the GPU machine) that its
# image lacks: ml-collections, nibabel, dynamic-network-architectures (their other requirements,
# absl-py, PyYAML, packaging, torch, timm, einops, are there). Fetch them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl ml-collections nibabel dynamic-network-architectures
# Parts (PARTS, default step,infer,step2d), each under its own `timeout` cut from one BUDGET
# (default 480 s; a part that times out still writes what it measured):
#   1. environment: nvidia-smi, Python and package versions, jax's devices;
#   step:   the 3D train step (nnU-Net 3d_fullres size), contestants interleaved (3 rounds x 5
#           steps), then a jax.profiler trace of the jax steps (kernel tables) and the XLA dump of
#           their optimised HLO (op counts), from the same worker processes;
#   infer:  sliding-window inference (240x240x155, with and without 8-flip TTA), 2 rounds, then
#           a profile of one call per variant (kernel tables kernels_infer_jax_bf16_tta{0,8}.md);
#   step2d: the 2D train step (nnU-Net 2d plan, 12 x 512^2), 3 rounds x 5 steps.
# $OUT gets at most 8 files: session.log (everything), vs_nnunet.json (all results),
# kernels_jax_{fp32,bf16}.md, hlo_train_step_jax_{fp32,bf16}.txt.gz, kernels_infer_jax_bf16_tta{0,8}.md.
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
L=$OUT/session.log
J=$OUT/vs_nnunet.json
TMP=$(mktemp -d /tmp/vs_nnunet.XXXX)
B="python3 benchmarks/vs_nnunet.py"
PARTS=${PARTS:-step,infer,step2d}
if [ -n "$SMALL" ]; then
  STEP="$B --small --rounds 2 --steps 2"; INFER="$B --small --infer --rounds 2"; BUDGET=${BUDGET:-900}
  STEP2D="$B --small --2d --rounds 2 --steps 2"; STEP_MAX=600
else
  WHICH=${WHICH:-jax_fp32,jax_bf16,torch_compiled_fp16}
  STEP="$B --rounds 3 --steps 5 --which $WHICH"; INFER="$B --infer --rounds 2 --which ${INFER_WHICH:-jax_bf16,torch_compiled_fp16}"
  STEP2D="$B --2d --rounds 3 --steps 5 --which $WHICH"
  BUDGET=${BUDGET:-480}; STEP_MAX=${STEP_MAX:-200}
fi
has() { case ",$PARTS," in *",$1,"*) return 0;; esac; return 1; }
END=$((SECONDS + BUDGET))
left() { local t=$((END - SECONDS - ${2:-0})); [ "$t" -gt "$1" ] && t=$1; echo $t; }
sec() { echo "=== $1 $(date -u +%T) (${SECONDS}s)" | tee -a "$L"; }

sec environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  timeout 60 python3 -c "
import sys, importlib.metadata as md
print('python', sys.version.split()[0], sys.executable)
for d in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax', 'torch', 'triton',
          'dynamic-network-architectures', 'ml-collections', 'nibabel', 'numpy'):
  try: print(' ', d, md.version(d))
  except md.PackageNotFoundError: pass
import jax; print('jax devices', jax.devices())
import torch; print('torch cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
                    'available', torch.cuda.is_available())
import jaxseg.train, jaxseg.inference; print('jaxseg imports ok from', jaxseg.__file__)
"
} >"$TMP/env.txt" 2>&1
cat "$TMP/env.txt" | tee -a "$L"

if has step; then
  sec "train step + profile + HLO"
  timeout -k 15 "$(left $STEP_MAX 240)" $STEP --profile "$TMP/prof" --dump-hlo "$TMP/hlo" --out "$J" >>"$L" 2>&1
  echo "exit $?" | tee -a "$L"
  cp "$TMP"/prof/kernels_*.md "$OUT/" 2>/dev/null
  for d in jax_fp32 jax_bf16; do
    f=$(ls -S "$TMP/hlo/$d"/*train_step*after_optimizations.txt 2>/dev/null | head -n 1)
    [ -n "$f" ] && gzip -c "$f" >"$OUT/hlo_train_step_$d.txt.gz"
  done
fi
if has infer; then
  T=$(left 150 110)
  sec "inference (${T}s)"
  timeout -k 15 "$T" $INFER --profile "$TMP/prof" --out "$J" >>"$L" 2>&1
  echo "exit $?" | tee -a "$L"
  cp "$TMP"/prof/kernels_infer_jax_bf16_tta*.md "$OUT/" 2>/dev/null
fi
if has step2d; then
  T=$(left 300)
  sec "2D train step (${T}s)"
  timeout -k 15 "$T" $STEP2D --out "$J" >>"$L" 2>&1
  echo "exit $?" | tee -a "$L"
fi
sec end
rm -rf "$TMP"

# Summary on stdout (tables only; the kernel tables' rows are in the .md files).
grep -E '^(machine:|train step:|inference |\| |### |host:|device |[a-z_0-9]+: optimised HLO|op  |(transpose|copy|convolution|custom-call|fusion)\(|fusion kinds|custom-call targets|convolution layouts|starting|  [a-z_0-9]+: (ready|skipped)|torch contestants)' "$L" \
  | grep -vE '^\| [0-9]+ \| `' | cut -c1-400
ls -la "$OUT"
