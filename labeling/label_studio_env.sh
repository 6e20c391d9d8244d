#!/usr/bin/env bash
# Create .venv-label-studio/ at the repository root with pip's label-studio in it, unless it
# is there already with the pinned version (`make test`, and so .ci/run, calls it every time).
# Label Studio pins Django and dozens of other packages that must not meet the pipeline's own
# venv, so it gets its own, as bench/.venv-trl112 does; the pipeline only talks to it over
# HTTP (labeling/label_studio.py).
#
#   bash labeling/label_studio_env.sh            # then: .venv-label-studio/bin/label-studio
#   LABEL_STUDIO_VENV=/elsewhere bash labeling/label_studio_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LABEL_STUDIO_VENV:-.venv-label-studio}"
# The version the round trip was tested with (tests/test_label_studio.py); a newer one may
# move an API field: bump it after running that test.
SPEC="${LABEL_STUDIO_SPEC:-label-studio==1.23.2}"
if [ -x "$VENV/bin/label-studio" ] && grep -qxF "$SPEC" "$VENV/.installed" 2>/dev/null; then
    exit 0  # already there, same version
fi
start=$(date +%s)
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$SPEC"
# A database with every migration applied, for servers that start on a copy of it: a fresh
# Label Studio database takes ~40 s of CPU to migrate (3 min on a busy 2-core machine), a
# migrated copy starts in ~15 s (tests/test_label_studio.py). `label-studio version` runs the
# migrations and exits; no user or project is created.
rm -rf "$VENV/template-data"
LABEL_STUDIO_BASE_DATA_DIR="$VENV/template-data" LATEST_VERSION_CHECK=false \
    COLLECT_ANALYTICS=false "$VENV/bin/label-studio" version >/dev/null
echo "$SPEC" > "$VENV/.installed"
echo "label-studio venv: $VENV ($SPEC) installed in $(( $(date +%s) - start )) s"
