#!/usr/bin/env bash
# Biased-MNIST on the sources' own networks, on one GPU machine without Ray: ReBias's
# SimpleConvNet trained plain (`rebias-cnn`, beside ReBias's vanilla row) and EnD's variant
# trained with EnD (`end-cnn`, its term on the unit-norm pooled features the classifier reads),
# at rho 0.99 and 0.995 under the ReBias protocol (80 epochs, best validation epoch). The four
# models (or the cells CELLS names) share the card, each an `--in-process` run of
# scripts/debias_mnist.py with its own --out. With DEADLINE (seconds), a run still training
# then is stopped and read at its last saved epoch (`--interim`); the same command again
# resumes every run from its saved epoch.
#
#   scripts/debias_gpu.sh DATA_ROOT OUT [DEADLINE]
#
# Environment: CELLS replaces the four runs ("ARCH REGULARIZER RHO [FLAGS...];..."), e.g.
# CELLS="rebias-cnn group_balanced 0.99;rebias-cnn sensitive_nets 0.99"; a cell's FLAGS are its
# own (an alpha/beta search: "end-cnn end 0.995 --reg-option end.alpha=0.05 end.beta=0.5;...")
# and name its folder with ARCH_REGULARIZER_RHO; EXTRA is appended to every run's flags (e.g.
# EXTRA="--epochs 2 --device cpu"); PYTHON names the interpreter (default python3).
set -u
data=$1 out=$2 deadline=${3:-0}
cells=("rebias-cnn none 0.99" "end-cnn end 0.99" "rebias-cnn none 0.995" "end-cnn end 0.995")
if [ -n "${CELLS:-}" ]; then IFS=';' read -r -a cells <<<"$CELLS"; fi
here=$(dirname "$0")
python=${PYTHON:-python3}
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"  # the packages, where they are not installed
folder() {  # arch regularizer level [flags...]: the cell's folder under OUT
  local flags="${*:4}"
  flags=$(echo "$flags" | sed -e 's/--//g' -e 's/[^A-Za-z0-9.=_-]/_/g')
  echo "$out/${1}_${2}_${3}${flags:+_$flags}"
}
run() {  # limit folder arch regularizer level [flags...]; a limit of 0 is none
  local limit=$1 dir=$2 arch=$3 reg=$4 level=$5
  shift 5
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  timeout "$limit" "$python" "$here/debias_mnist.py" --task biased_mnist --protocol rebias --arch "$arch" --regularizers "$reg" \
    --levels "$level" --reg-option end.activation=pre --in-process --data-dir "$data" \
    --out "$dir" ${EXTRA:-} "$@"
}
# Render each level's images into the cache once, before four processes want them.
"$python" -c "
import sys
from modelzoo.datasets import SPLITS, load_imageset
from modelzoo.sources import load_mnist
mnist = load_mnist(sys.argv[1])
for level in (0.99, 0.995):
    for split in SPLITS:
        load_imageset(mnist, 'biased_mnist', split, level, 'all')
" "$data" || exit 1
for cell in "${cells[@]}"; do
  read -r -a words <<<"$cell"  # arch regularizer level [flags...]
  dir=$(folder "${words[@]}")
  mkdir -p "$dir"
  run "$deadline" "$dir" "${words[@]}" >"$dir/log" 2>&1 &
done
wait
for cell in "${cells[@]}"; do
  read -r -a words <<<"$cell"
  dir=$(folder "${words[@]}")
  if ! grep -q '"unbiased_acc"' "$dir/biased_mnist.json" 2>/dev/null; then
    run 0 "$dir" "${words[@]}" --interim >>"$dir/log" 2>&1
  fi
done
for cell in "${cells[@]}"; do
  read -r -a words <<<"$cell"
  dir=$(folder "${words[@]}")
  for name in biased_mnist.json biased_mnist.interim.json; do
    if [ -f "$dir/$name" ]; then
      echo "${words[*]} $name"
      "$python" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['rows']))" "$dir/$name"
    fi
  done
done
