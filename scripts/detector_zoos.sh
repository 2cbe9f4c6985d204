#!/usr/bin/env bash
# The detector evidence zoos (docs/detectors.md), generated one after the other on one core
# each, resuming whatever an earlier run left. Usage: scripts/detector_zoos.sh DATA_DIR [OUT_DIR]
set -euo pipefail
data=${1:?usage: scripts/detector_zoos.sh DATA_DIR [OUT_DIR]}
out=${2:-results}
for name in levels levels_half levels_recipes levels_seed1 levels_varied; do
    weightbias zoo generate "examples/detector_digits_${name}.toml" --out "${out}/${name}.zarr" \
        --data-dir "${data}" --num-cpus 1
done
