#!/usr/bin/env bash
# The one test command, used by README.md and .ci/run alike:
#   tests/run.sh [pytest arguments]
# It sets itself up (tests/setup_venv.sh: .venv with the pins of requirements-dev.txt; the
# host packages the systemd tests need, when root), then runs ruff, mypy and pytest.
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "${repo}"

source tests/setup_venv.sh

if [[ "$(id -u)" == 0 && -x tests/systemd/setup_host.sh ]]; then
    tests/systemd/setup_host.sh
fi

echo "== ruff" >&2
ruff check .
echo "== mypy" >&2
mypy
echo "== pytest" >&2
exec pytest "$@"
