#!/usr/bin/env bash
# The one test command, used by README.md and .ci/run alike:
#   tests/run.sh [pytest arguments]
# It sets itself up: a virtual environment in .venv with the pins of requirements-dev.txt
# (re-created when they change), the host packages the systemd tests need (when root),
# then ruff, mypy and the whole pytest suite.
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "${repo}"

venv="${repo}/.venv"
stamp="${venv}/.requirements.sha256"
want="$(sha256sum requirements-dev.txt | cut -d' ' -f1)"

if [[ ! -x "${venv}/bin/python" || "$(cat "${stamp}" 2>/dev/null)" != "${want}" ]]; then
    echo "tests/run.sh: setting up ${venv} from requirements-dev.txt" >&2
    rm -rf "${venv}"
    if ! python3 -m venv "${venv}" 2>/dev/null; then
        # Debian splits venv/ensurepip out of python3.
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            rm -rf "${venv}"
            python3 -m venv "${venv}"
        else
            echo "tests/run.sh: error: python3 -m venv failed: install python3-venv" >&2
            exit 1
        fi
    fi
    "${venv}/bin/python" -m pip install --quiet --upgrade pip
    "${venv}/bin/python" -m pip install --quiet -r requirements-dev.txt
    echo "${want}" > "${stamp}"
fi

if [[ "$(id -u)" == 0 && -x tests/systemd/setup_host.sh ]]; then
    tests/systemd/setup_host.sh
fi

export PATH="${venv}/bin:${PATH}"
echo "== ruff" >&2
ruff check .
echo "== mypy" >&2
mypy
echo "== pytest" >&2
exec pytest "$@"
