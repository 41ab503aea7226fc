#!/usr/bin/env bash
# On the GPU machine: gather the two parts from tools/ray_wheels/fetch.sh in /tmp/raywhl, then join, check and
# install them into /tmp/site (use with PYTHONPATH=/tmp/site).
#
#   bash tools/ray_wheels/device.sh stage .whl/ray-A     # call 1: keep part A on the machine
#   bash tools/ray_wheels/device.sh install .whl/ray-B   # call 2, same warm machine: join, check, install
set -euo pipefail

STAGE=/tmp/raywhl
SITE=/tmp/site
action=${1:?usage: device.sh stage|install PART_DIR}
part=${2:?usage: device.sh stage|install PART_DIR}

mkdir -p "$STAGE"
cp "$part"/* "$STAGE"/
cd "$STAGE"
if [ "$action" = stage ]; then
    ls -l "$STAGE"
    exit 0
fi
[ "$action" = install ] || { echo "error: unknown action '$action' (stage or install)" >&2; exit 2; }

pieces=(*.whl.part-*)
if [ "${#pieces[@]}" -lt 2 ]; then
    echo "error: $STAGE has ${pieces[*]} only: part A is missing (a fresh machine?); run the stage call again" >&2
    exit 1
fi
ray_whl=${pieces[0]%.part-*}
cat "${pieces[@]}" > "$ray_whl"   # .part-00 then .part-01: the glob sorts them
sha256sum -c SHA256SUMS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" ./*.whl
PYTHONPATH=$SITE python3 -c "import ray, ray.data; print('ray', ray.__version__, 'from', ray.__file__)"
