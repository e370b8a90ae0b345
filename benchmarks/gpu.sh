#!/usr/bin/env bash
# Every GPU measurement of benchmarks/RESULTS.md in one command, in about 7 minutes on one H100/H200:
#
#   bash benchmarks/gpu.sh RESULTS_DIR          # RESULTS.md (tables), gpu.log, profile-train.txt into RESULTS_DIR
#   bash benchmarks/gpu.sh --fetch-wheels       # on a machine with pip's network: the wheels an offline node lacks
#   bash benchmarks/gpu.sh --cpu-smoke DIR      # the same steps at toy sizes on a CPU (about 2 minutes): checks the
#                                               # script before GPU minutes are spent on it
#
# GPU nodes are often air-gapped with only PyTorch, accelerate, diffusers and safetensors: whatever else firststage
# imports is installed from benchmarks/wheels (or $FIRSTSTAGE_WHEELS), without the network, into a temporary folder.
# The wheels of lpips, webdataset and braceexpand (pure Python, 135 KB) are in the repository, so on such a node a
# fresh checkout needs nothing else; a node without diffusers needs --fetch-wheels first (diffusers is 6 MB).
# Exits non-zero if any measurement failed; the others still run. Each measurement is one line below;
# benchmarks/README.md says what the numbers mean.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${FIRSTSTAGE_WHEELS:-benchmarks/wheels}"
py="${PYTHON:-python3}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$wheels"
    exec "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$wheels" lpips==0.1.4 webdataset==1.0.2 braceexpand diffusers==0.42.1 importlib_metadata lazy-importer
fi
smoke=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then smoke=1; shift; fi
out="${1:?usage: bash benchmarks/gpu.sh [--cpu-smoke] RESULTS_DIR   (or --fetch-wheels)}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

missing=$("$py" - <<'EOF'
import importlib.util
need = ["torch", "accelerate", "diffusers", "safetensors", "lpips", "webdataset", "braceexpand", "yaml", "PIL",
        "numpy", "tqdm"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "gpu.sh: not installed: $missing; installing from $wheels (no network)"
    site="$(mktemp -d)/site"
    files=()
    for m in $missing; do  # only what is missing: an installed diffusers stays the one in use
        case $m in
            yaml) files+=("$wheels"/[Pp][Yy][Yy][Aa][Mm][Ll]-*.whl) ;;
            PIL) files+=("$wheels"/[Pp]illow-*.whl) ;;
            diffusers) files+=("$wheels"/diffusers-*.whl "$wheels"/importlib_metadata-*.whl "$wheels"/lazy_importer-*.whl) ;;
            *) files+=("$wheels/$m"-*.whl) ;;
        esac
    done
    if ! ls "${files[@]}" >/dev/null 2>&1 || ! "$py" -m pip install -q --no-index --no-deps --no-compile \
            --target "$site" "${files[@]}"; then
        echo "gpu.sh: error: missing $missing and no usable wheels in $wheels (run bash benchmarks/gpu.sh --fetch-wheels where pip has the network, then copy $wheels here)" >&2
        exit 2
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ((smoke)); then
    echo "gpu.sh: CPU smoke run: toy sizes, no memory or compile steps; the numbers mean nothing"
else
    "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu.sh:', torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 2
fi

status=0
results="$out/RESULTS.md"
step() {  # step NAME SECONDS command...: run one measurement with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)" | tee -a "$out/gpu.log"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee -a "$out/gpu.log"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        echo "gpu.sh: $name FAILED (exit $rc)" | tee -a "$out/failures.txt"
        status=1
    fi
}

K=(--preset kl-f8 --out "$results")
# enough images that worker start-up (once per repeat) is small beside the steady state
R256=256 R512=512 SRC256=300 SRC512=600 N256=2048 N512=768 STEPS=10 REPEATS=5 WORKERS=12 RDIFF=256
if ((smoke)); then
    K=(--preset tiny --out "$results")
    R256=32 R512=64 SRC256=48 SRC512=80 N256=32 N512=16 STEPS=2 REPEATS=1 WORKERS=1 RDIFF=64
fi
# Training step, kl-f8 at 256x256: naive fp32 loop against the trainer's step, with two variants; the profile is of
# the first firststage variant (the preset's own defaults).
step train-256 150 "$py" benchmarks/train.py "${K[@]}" --resolution $R256 --batch 8 --steps $STEPS \
    --repeats $REPEATS --variant "firststage=" --variant "contiguous=train.channels_last=false" \
    --variant "batch-16=train.batch_size=16" --profile "$out/profile-train.txt"
# The terms of docs/diffusable-latents.md against the plain step: EQ-VAE, scale equivariance, VA-VAE alignment (a
# tiny random DINOv2 in bf16: offline nodes have no DINOv2-L; its own forward is timed apart).
step train-diffusable 150 "$py" benchmarks/train.py "${K[@]}" --resolution $RDIFF --batch 8 --steps $STEPS \
    --repeats $REPEATS --no-naive --diffusable
# Encoding, end to end (JPEG shards -> latent shards) and encoder only, at 256 and 512.
step encode-256 150 "$py" benchmarks/encode.py "${K[@]}" --resolution $R256 --source $SRC256 --images $N256 \
    --batch 64 --workers $WORKERS --repeats $REPEATS
step encode-512 150 "$py" benchmarks/encode.py "${K[@]}" --resolution $R512 --source $SRC512 --images $N512 \
    --batch 32 --workers $WORKERS --repeats $REPEATS
# The generation probe's step (LightningDiT-B/1 on f16c32 latents of 256 px, bf16) against a plain fp32 loop.
if ((smoke)); then PROBE=(--preset probe-tiny --shape 4,16,16 --batch 8); else PROBE=(--preset probe-b1 --shape 32,16,16 --batch 128); fi
step probe-b1 120 "$py" benchmarks/probe.py "${PROBE[@]}" --steps $STEPS --repeats $REPEATS --out "$results"
if ((!smoke)); then
# Memory: the 512x512 step at batch 4 on a 24 GB card (this process capped at 24 GB), then the largest batch in 80 GB.
step memory-512-24gb 80 "$py" benchmarks/train.py "${K[@]}" --resolution 512 --batch 4 --steps 3 --repeats 3 \
    --no-naive --variant "checkpointing=train.gradient_checkpointing=true" --memory-limit-gb 24
step memory-512-80gb 120 "$py" benchmarks/train.py "${K[@]}" --resolution 512 --no-naive --max-batch-gb 80
# torch.compile of the autoencoder (compilation is inside the warm-up; last, since it may take minutes).
step train-256-compile 180 "$py" benchmarks/train.py "${K[@]}" --resolution 256 --batch 8 --steps 10 --repeats 5 \
    --no-naive --variant "firststage=" --variant "compile=train.compile=true"
fi

echo "== results ($results)"
cat "$results" 2>/dev/null
[[ -f "$out/failures.txt" ]] && cat "$out/failures.txt"
exit $status
