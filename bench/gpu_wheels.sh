#!/usr/bin/env bash
# Download, on a development machine, the wheels that bench/gpu_check.sh installs OFFLINE on a bare
# GPU machine: exactly the packages the check imports (and their needs) that the machine lacks.
#
#   bash bench/gpu_wheels.sh                  # the GPU machine: Python 3.12, torch 2.11, transformers 5.17
#   bash bench/gpu_wheels.sh --python 3.11 --torch 2.13.0   # a CPU dry run here (see gpu_check.sh)
#
# What a bare GPU machine is assumed to hold: Python, torch (CUDA), transformers and peft, with
# their own requirements. What the check needs beyond that is found by pip's resolver, not by hand:
#   1. deepspeed is published as an sdist only: it is built here into a pure-Python wheel
#      (DS_BUILD_OPS=0; the learner uses a torch optimizer and no compiled op) and checked to be one;
#   2. a stub torch wheel (the target version, torch's pure-Python requirements, none of its CUDA
#      libraries) stands in for torch, so that resolving never fetches a GPU build of torch;
#   3. pip resolves, for the target Python and platform, the machine's packages alone (torch,
#      transformers, peft) and then those plus the check's; the wheels in the second set whose
#      names are not in the first are downloaded (--no-deps, --only-binary=:all:).
#
# Output, under bench/gpu_wheels/ (gitignored):
#   cpXY/*.whl + cpXY/requirements.txt   the wheel folder (`pip install --no-index --find-links`)
#   cpXY.tar.xz                          the same wheels re-zipped uncompressed and packed with xz:
#                                        what travels to the GPU machine (it must fit in 64 MiB with
#                                        the repository; the zipped wheels alone do not: PyAV bundles
#                                        FFmpeg, ~33 MiB). gpu_check.sh unpacks it into a temp folder.
# The list of wheels with their sizes and both totals are printed; the script fails when the
# packed file exceeds --limit-mib (default 60: 64 MiB less room for the repository itself).
set -euo pipefail

PY_VERSION=3.12
TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=5.17.0
LIMIT_MIB=60
OUT_ROOT=""
# The packages the check imports beyond torch/transformers/peft (rlaif_ray's own requirements,
# pinned to the versions the project runs with; torchvision follows torch).
CHECK_REQS=(
    "deepspeed==0.19.8"
    "open_clip_torch==3.3.0"
    "decord==0.6.0"
    "av>=12"
    "openai>=1.40"
    "pyyaml>=6"
    "numpy"
    "safetensors"
    "tokenizers"
)
# Needed by the check (deepspeed and openai require pydantic) but present in the resolved base only
# through a version-dependent requirement (recent typer, which transformers requires, needs pydantic;
# older typer does not, and the GPU image lists typer without pydantic): shipped with their own
# requirements all the same; pip skips them where the machine has them.
ALSO=(pydantic)

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo "options: --python X.Y  --torch VERSION  --transformers VERSION  --out DIR  --limit-mib N"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PY_VERSION=$2; shift 2 ;;
        --torch) TORCH_VERSION=$2; shift 2 ;;
        --transformers) TRANSFORMERS_VERSION=$2; shift 2 ;;
        --out) OUT_ROOT=$2; shift 2 ;;
        --limit-mib) LIMIT_MIB=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_ROOT=${OUT_ROOT:-$ROOT/bench/gpu_wheels}
TAG=cp${PY_VERSION/./}
WHEELS=$OUT_ROOT/$TAG
PACK=$OUT_ROOT/$TAG.tar.xz
# Any Python with pip >= 23 (for --report) and torch (to build the deepspeed wheel).
HOST_PY=${HOST_PYTHON:-$ROOT/.venv/bin/python}
PIP=("$HOST_PY" -m pip)
# The package index itself: no local find-links (a "+cpu" torch lies there), no constraints.
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= PIP_DISABLE_PIP_VERSION_CHECK=1

PLATFORM_ARGS=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
    --abi "$TAG" --abi abi3 --abi none
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
    --platform linux_x86_64 --platform any)
for n in 17 24 27 28 31 34 35 39; do PLATFORM_ARGS+=(--platform "manylinux_2_${n}_x86_64"); done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/local"

echo "== target: Python $PY_VERSION ($TAG), torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION -> $WHEELS"

# 1. deepspeed: sdist only on the index; build a wheel without any compiled op.
DS_REQ=${CHECK_REQS[0]}
echo "== building the $DS_REQ wheel"
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$WORK/local" "$DS_REQ"
DS_WHEEL=$(ls "$WORK"/local/deepspeed-*.whl)
case "$(basename "$DS_WHEEL")" in
    *-py3-none-any.whl) ;;
    *) echo "deepspeed wheel is not pure Python: $DS_WHEEL" >&2; exit 1 ;;
esac
if "$HOST_PY" -m zipfile -l "$DS_WHEEL" | grep -E '\.(so|pyd)\b' >/dev/null; then
    echo "deepspeed wheel holds compiled files" >&2
    exit 1
fi

# 2. A stub torch of the target version: torch's pure-Python requirements, no CUDA libraries.
"$HOST_PY" - "$WORK/local" "$TORCH_VERSION" <<'EOF'
import sys, zipfile
out, version = sys.argv[1], sys.argv[2] + "+stub"
info = f"torch-{version}.dist-info"
requires = ["filelock", "typing-extensions>=4.10.0", "setuptools", "sympy>=1.13.3", "networkx>=2.5.1",
            "jinja2", "fsspec>=0.8.5"]
metadata = "Metadata-Version: 2.1\nName: torch\nVersion: " + version + "\n" + "".join(
    f"Requires-Dist: {r}\n" for r in requires)
with zipfile.ZipFile(f"{out}/torch-{version}-py3-none-any.whl", "w") as whl:
    whl.writestr(f"{info}/METADATA", metadata)
    whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    whl.writestr(f"{info}/RECORD", "")
EOF

# 3. Resolve the machine's packages alone, then with the check's; keep what the second adds.
resolve() {  # resolve REPORT REQUIREMENT...
    local report=$1
    shift
    "${PIP[@]}" install -q --dry-run --ignore-installed --target "$WORK/target" --report "$report" \
        "${PLATFORM_ARGS[@]}" --find-links "$WORK/local" "$@"
}
BASE=("torch==$TORCH_VERSION+stub" "transformers==$TRANSFORMERS_VERSION" "peft")
echo "== resolving"
resolve "$WORK/base.json" "${BASE[@]}"
resolve "$WORK/full.json" "${BASE[@]}" "torchvision" "${CHECK_REQS[@]}"

"$HOST_PY" - "$WORK/base.json" "$WORK/full.json" "$WORK/needed.txt" "${ALSO[@]}" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
base_report, full_report, out, also = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
base = {norm(i["metadata"]["name"]): i for i in json.load(open(base_report))["install"]}
full = {norm(i["metadata"]["name"]): i for i in json.load(open(full_report))["install"]}
needed = {name for name in full if name not in base}
# ALSO and their requirements, except torch, transformers, peft and torch's own requirements.
req_name = lambda req: norm(re.split(r"[ ;<>=!~\[(]", req.strip())[0])
certain = {"torch", "transformers", "peft"}
certain |= {req_name(r) for r in base["torch"]["metadata"].get("requires_dist", [])}
todo = [norm(a) for a in also]
while todo:
    name = todo.pop()
    if name in needed or name in certain or name not in full:
        continue
    needed.add(name)
    todo += [req_name(r) for r in full[name]["metadata"].get("requires_dist", []) if "extra ==" not in r]
with open(out, "w") as f:
    for name in sorted(needed):
        f.write(f"{full[name]['metadata']['name']}=={full[name]['metadata']['version']}\n")
EOF

rm -rf "$WHEELS" "$PACK"
mkdir -p "$WHEELS"
echo "== downloading"
while read -r req; do
    case "$req" in
        deepspeed==*) cp "$DS_WHEEL" "$WHEELS/" ;;
        *) "${PIP[@]}" download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$WHEELS" "$req" ;;
    esac
done <"$WORK/needed.txt"
# What gpu_check.sh installs: the check's own requirements; pip keeps what the machine already has
# where it satisfies them and takes the rest from this folder.
printf '%s\n' torchvision "${CHECK_REQS[@]}" >"$WHEELS/requirements.txt"

# 4. Pack: wheels re-zipped without compression (same files, so the same RECORD), then xz.
echo "== packing $PACK"
mkdir -p "$WORK/pack/$TAG"
"$HOST_PY" - "$WHEELS" "$WORK/pack/$TAG" <<'EOF'
import copy, shutil, sys, zipfile
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(src.iterdir()):
    if path.suffix != ".whl":
        shutil.copy(path, dst / path.name)
        continue
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(dst / path.name, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            stored = copy.copy(info)
            stored.compress_type = zipfile.ZIP_STORED
            zout.writestr(stored, zin.read(info))
EOF
nice -n 5 tar -C "$WORK/pack" -cf - "$TAG" | nice -n 5 xz -6 -T0 >"$PACK"

echo "== wheels for $TAG (bytes, name):"
(cd "$WHEELS" && ls -l *.whl | awk '{printf "%10d  %s\n", $5, $9}' | sort -rn)
"$HOST_PY" - "$WHEELS" "$PACK" "$LIMIT_MIB" <<'EOF'
import sys
from pathlib import Path
wheels, pack, limit = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
total = sum(p.stat().st_size for p in wheels.glob("*.whl"))
packed = pack.stat().st_size
mib = 1024 * 1024
print(f"wheel folder {wheels}: {len(list(wheels.glob('*.whl')))} wheels, {total / mib:.1f} MiB")
print(f"packed {pack}: {packed / mib:.1f} MiB (limit {limit:.0f} MiB)")
if packed > limit * mib:
    sys.exit(f"{pack} is over the limit of {limit:.0f} MiB")
EOF
