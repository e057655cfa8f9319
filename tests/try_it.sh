#!/usr/bin/env bash
# Try the sender without a Schwab account: the real scripts/run_token_sender.sh (uv) against
# the loopback stand-ins for Schwab's token endpoint and for the bot, in a throw-away bundle.
#   tests/try_it.sh [SECONDS]     (default 45)
# Access tokens from the fake live 40 s here, so the sender refreshes every 20 s; half way
# through, the bot is restarted and gets a token at once. Everything lives in .cache/try/.
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "${repo}"
source tests/setup_venv.sh
seconds="${1:-45}"

try="${repo}/.cache/try"
rm -rf "${try}"
mkdir -p "${try}/configs" "${try}/logs"
umask 077
port="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
now="$(date +%s)"
cat > "${try}/configs/schwab_app_config.yaml" <<YAML
app_key: FAKE-TRY-APP-KEY
app_secret: FAKE-TRY-APP-SECRET
callback_url: https://127.0.0.1:8182
YAML
cat > "${try}/configs/schwab_tokens.json" <<JSON
{"creation_timestamp": $((now - 86400)),
 "token": {"access_token": "FAKE-TRY-ACCESS", "refresh_token": "FAKE-TRY-REFRESH",
           "id_token": "FAKE-TRY-ID", "token_type": "Bearer", "scope": "api",
           "expires_in": 1800, "expires_at": $((now - 60))}}
JSON
printf 'token_url: http://127.0.0.1:%s/v1/oauth/token\nsocket_path: %s\n' \
    "${port}" "${try}/bot.sock" > "${try}/configs/token_refresh_sender.yaml"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

python -m tests.fakes.schwab --port "${port}" --app-key FAKE-TRY-APP-KEY \
    --app-secret FAKE-TRY-APP-SECRET --refresh-token FAKE-TRY-REFRESH --lifetime 40 \
    > "${try}/schwab.out" 2>&1 &
pids+=($!)
python -m tests.fakes.bot --socket "${try}/bot.sock" --record "${try}/bot.jsonl" \
    > "${try}/bot.out" 2>&1 &
bot_pid=$!
sleep 1

echo "== the sender, for ${seconds}s (log: ${try}/logs/token_refresh_sender.log)"
UV="${venv}/bin/uv" scripts/run_token_sender.sh \
    --app-config "${try}/configs/schwab_app_config.yaml" \
    --token-file "${try}/configs/schwab_tokens.json" \
    --config "${try}/configs/token_refresh_sender.yaml" \
    --log-file "${try}/logs/token_refresh_sender.log" \
    --state-file "${try}/logs/token_refresh_sender.state.json" &
pids+=($!)
sleep $((seconds / 2))
echo "== restarting the bot: it should get a token within a second"
kill "${bot_pid}"; wait "${bot_pid}" 2>/dev/null || true
python -m tests.fakes.bot --socket "${try}/bot.sock" --record "${try}/bot.jsonl" \
    >> "${try}/bot.out" 2>&1 &
pids+=($!)
sleep $((seconds - seconds / 2))

echo "== --status"
UV="${venv}/bin/uv" scripts/run_token_sender.sh --status \
    --token-file "${try}/configs/schwab_tokens.json" \
    --config "${try}/configs/token_refresh_sender.yaml" \
    --state-file "${try}/logs/token_refresh_sender.state.json"
echo "== the bot received $(wc -l < "${try}/bot.jsonl") token(s); the token file's creation_timestamp is unchanged:"
python -c "import json,sys; print(json.load(open(sys.argv[1]))['creation_timestamp'], '==', $((now - 86400)))" \
    "${try}/configs/schwab_tokens.json"
