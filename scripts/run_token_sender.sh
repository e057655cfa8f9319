#!/usr/bin/env bash
# Run the token refresh sender with uv (PEP 723: uv reads the script's inline metadata and
# its lock, scripts/token_refresh_sender.py.lock, and provides PyYAML).
# Every argument is passed through: scripts/run_token_sender.sh --once, --check, --status ...
# Works from any working directory and through a symlink.
set -euo pipefail

script_dir="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
sender="${script_dir}/token_refresh_sender.py"

find_uv() {
    if [[ -n "${UV:-}" ]]; then
        [[ -x "${UV}" ]] && { printf '%s\n' "${UV}"; return 0; }
        echo "run_token_sender.sh: error: UV=${UV} is not an executable file" >&2
        return 1
    fi
    if command -v uv >/dev/null 2>&1; then
        command -v uv
        return 0
    fi
    local candidate
    for candidate in "${HOME:-/nonexistent}/.local/bin/uv" "${HOME:-/nonexistent}/.cargo/bin/uv" \
                     /usr/local/bin/uv /opt/uv/bin/uv /usr/bin/uv; do
        if [[ -x "${candidate}" ]]; then
            printf '%s\n' "${candidate}"
            return 0
        fi
    done
    echo "run_token_sender.sh: error: uv not found (looked at \$UV, PATH, ~/.local/bin," \
         "~/.cargo/bin, /usr/local/bin, /opt/uv/bin): install it with 'pip install uv'" \
         "(or see https://docs.astral.sh/uv/), or run 'python3 ${sender}' with PyYAML installed" >&2
    return 1
}

uv_bin="$(find_uv)" || exit 69
exec "${uv_bin}" run --quiet --script "${sender}" "$@"
