#!/usr/bin/env bash
# Download, here, Ray and what the GPU image lacks for it as Python 3.12 manylinux x86_64 wheels, then split the set
# into two parts under 50 MiB each (the Ray wheel itself cut in two), so that two device calls can carry it.
#
#   bash tools/ray_wheels/fetch.sh            # from the repo root; writes .whl/ray-A and .whl/ray-B (git-ignored)
#
# Then see tools/ray_wheels/README.md for the two device calls. RAY_VERSION=... overrides the Ray version.
set -euo pipefail

RAY_VERSION=${RAY_VERSION:-2.60.0}
# Ray's Requires-Dist that the image lacks: jsonschema and its own needs (attrs and typing-extensions are there).
# packaging: Ray asks for >= 24.2; the image's version is unknown, so a current one comes along (65 KB).
DEPS=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 packaging==26.3)
PART_BYTES=$((40 * 1024 * 1024))  # the Ray wheel's first piece; the second (~36 MiB) travels with the deps

repo=$(git rev-parse --show-toplevel)
out=${1:-$repo/.whl}
all=$out/ray-all
rm -rf "$all" "$out/ray-A" "$out/ray-B"
mkdir -p "$all" "$out/ray-A" "$out/ray-B"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$all" "ray==$RAY_VERSION" "${DEPS[@]}"

ray_whl=$(cd "$all" && ls ray-"$RAY_VERSION"-*.whl)
(cd "$all" && sha256sum ./*.whl) > "$out/ray-B/SHA256SUMS"           # checked on the device after the join
split -b "$PART_BYTES" -d "$all/$ray_whl" "$out/ray-A/$ray_whl.part-"  # .part-00, .part-01
mv "$out/ray-A/$ray_whl.part-01" "$out/ray-B/"
for whl in "$all"/*.whl; do
    [ "$(basename "$whl")" = "$ray_whl" ] || cp "$whl" "$out/ray-B/"
done
rm -rf "$all"

for part in ray-A ray-B; do
    size=$(du -sm "$out/$part" | cut -f1)
    if [ "$size" -ge 50 ]; then
        echo "error: $out/$part is ${size} MiB, not under 50 MiB; lower PART_BYTES" >&2
        exit 1
    fi
    echo "$out/$part: ${size} MiB: $(cd "$out/$part" && ls | tr '\n' ' ')"
done
