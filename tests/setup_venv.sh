# Sourced by tests/run.sh and tests/try_it.sh from the repository root: make sure .venv
# exists with the pins of requirements-dev.txt (re-created when they change), and put it
# first on PATH.
repo="${repo:-$(pwd)}"
venv="${repo}/.venv"
stamp="${venv}/.requirements.sha256"
want="$(sha256sum requirements-dev.txt | cut -d' ' -f1)"

if [[ ! -x "${venv}/bin/python" || "$(cat "${stamp}" 2>/dev/null)" != "${want}" ]]; then
    echo "setting up ${venv} from requirements-dev.txt" >&2
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
    # pip's output goes to a log: shown only when the install fails.
    if ! { "${venv}/bin/python" -m pip install --upgrade pip \
           && "${venv}/bin/python" -m pip install -r requirements-dev.txt; } \
           > "${venv}/pip-install.log" 2>&1; then
        tail -40 "${venv}/pip-install.log" >&2
        echo "tests/setup_venv.sh: error: pip install failed (log: ${venv}/pip-install.log)" >&2
        exit 1
    fi
    echo "${want}" > "${stamp}"
fi

export PATH="${venv}/bin:${PATH}"
