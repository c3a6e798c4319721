#!/usr/bin/env bash
# make gpu-check: one call on a GPU machine (one H100 or H200) writes OUTDIR/gpu-check.md; see README "GPU check".
#
#   bash scripts/gpu_check.sh OUTDIR            # on the GPU machine (python3 with CUDA torch)
#   bash scripts/gpu_check.sh --dry-run OUTDIR  # the same path on CPU at tiny sizes (tests/test_gpu_check.py)
#
# OUTDIR defaults to $OUT; --images DIR the sample photos (default examples/photos/euvp/raw, else seeded noise
# images). PYTHON picks the interpreter (default python3). Exit status 1 if any section failed (the report
# says which), 0 otherwise. Expected time on one H100: about 2-3 minutes; the hard time boxes add up to 7.
set -uo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=()
OUTDIR=""
IMAGES=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=(--dry-run) ;;
        --images) IMAGES="$2"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) OUTDIR="$1" ;;
    esac
    shift
done
OUTDIR="${OUTDIR:-${OUT:-}}"
if [ -z "$OUTDIR" ]; then usage >&2; exit 2; fi
PYTHON="${PYTHON:-python3}"
# An absolute path (symlinks kept: a venv's python is one), since the check runs from another folder.
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
IMAGES="${IMAGES:-$REPO/examples/photos/euvp/raw}"
case "$IMAGES" in /*) ;; *) IMAGES="$PWD/$IMAGES" ;; esac
WORK="$(mktemp -d "${TMPDIR:-/tmp}/reefcap-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

# Install from a copy of the sources: an in-tree build would leave build/ and *.egg-info in the checkout, and a
# stale build/lib can carry deleted modules into the wheel. --no-build-isolation: no network, so the
# interpreter's own setuptools builds it.
mkdir -p "$WORK/src"
(cd "$REPO" && cp -r pyproject.toml README.md reefcap models training server clients bench "$WORK/src/")
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
WHEELS=()
NOTE="Install: reefcap from $REPO"
if [ ${#DRY[@]} -eq 0 ]; then
    # The dry run takes the interpreter's own server stack (make install put it in .venv): the wheels are
    # built for the GPU machine's Python 3.12 and would not import on another Python.
    shopt -s nullglob
    WHEELS=("$REPO"/.whl/*.whl)
    shopt -u nullglob
    if [ ${#WHEELS[@]} -eq 0 ]; then
        NOTE="$NOTE; no .whl/ wheels (run make gpu-wheels and carry .whl): pytest may fail to collect server tests"
    else
        NOTE="$NOTE + ${#WHEELS[@]} wheels from .whl/: $(printf '%s ' "${WHEELS[@]##*/}")"
    fi
fi
SECONDS=0
if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index --disable-pip-version-check \
        --target "$WORK/site" "$WORK/src" "${WHEELS[@]}" >"$WORK/install.log" 2>&1; then
    { echo "# reefcap GPU check"; echo; echo "- Result: FAILED: install"; echo; echo '```'
      tail -40 "$WORK/install.log"; echo '```'; } >"$OUTDIR/gpu-check.md"
    echo "install failed; report: $OUTDIR/gpu-check.md" >&2
    exit 1
fi
NOTE="$NOTE (${SECONDS} s)"

# Run from the install folder: `python -m` puts cwd first on sys.path, and the checkout's reefcap/ folder
# lacks the subpackages (models/, training/... install as reefcap.models, reefcap.training...).
cd "$WORK/site" || exit 1
PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m reefcap.bench.gpu_check "$OUTDIR" "${DRY[@]}" \
    --repo "$REPO" --work "$WORK" --images "$IMAGES" --note "$NOTE"
