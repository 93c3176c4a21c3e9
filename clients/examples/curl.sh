#!/usr/bin/env bash
# Call every endpoint of `titans serve` with curl, in the order a client would use them.
#
#   titans serve &                 # 127.0.0.1:8000 with the demo checkpoint
#   bash clients/examples/curl.sh
#
# Reads TITANS_URL (default http://127.0.0.1:8000), TITANS_API_KEY when the server requires
# keys, and EXAMPLE_MAX_TOKENS (default 40). Needs curl 7.76 or newer (--fail-with-body) and
# python3, which reads ids out of the JSON replies. Every request must succeed except the
# one that shows an error body, so the script stops at the first unexpected failure.
set -euo pipefail

URL="${TITANS_URL:-http://127.0.0.1:8000}"
URL="${URL%/}"
MAX_TOKENS="${EXAMPLE_MAX_TOKENS:-40}"
STATE_FILE="$(mktemp "${TMPDIR:-/tmp}/titans-state.XXXXXX")"
HEADER_FILE="$(mktemp "${TMPDIR:-/tmp}/titans-auth.XXXXXX")"
trap 'rm -f "$STATE_FILE" "$HEADER_FILE"' EXIT

# curl reads the key from a file readable only by this user (-H @FILE), so it does not
# show in the process list.
AUTH=()
if [[ -n "${TITANS_API_KEY:-}" ]]; then
  printf 'Authorization: Bearer %s\n' "$TITANS_API_KEY" > "$HEADER_FILE"
  AUTH=(-H "@$HEADER_FILE")
fi

api() {  # api METHOD PATH [curl options...]: one JSON request that must succeed
  local method="$1" path="$2"
  shift 2
  curl -sS --fail-with-body -X "$method" "${AUTH[@]}" "$URL$path" "$@"
  echo
}

json_field() {  # json_field NAME: print one top-level field of the JSON on stdin
  python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

section() { printf '\n### %s\n' "$*"; }

section "liveness and readiness (no API key needed)"
curl -sS --fail-with-body "$URL/healthz"; echo
curl -sS --fail-with-body "$URL/readyz"; echo

section "models"
api GET /v1/models

section "create a session (id chosen by the server) and read it back"
SESSION="$(api POST /v1/sessions -H 'Content-Type: application/json' \
  -d '{"metadata": {"example": "curl"}}' | json_field id)"
echo "session: $SESSION"
api GET "/v1/sessions/$SESSION"
api GET /v1/sessions

section "generate (one JSON body)"
api POST "/v1/sessions/$SESSION/generate" -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"ROMEO:\\n\", \"max_tokens\": $MAX_TOKENS, \"temperature\": 0.8, \"seed\": 1}"

section "generate with streaming: one 'data:' event per text delta, then the result"
api POST "/v1/sessions/$SESSION/generate" -N -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"\\nJULIET:\\n\", \"max_tokens\": $MAX_TOKENS, \"stream\": true}"

section "append text to the memory without generating"
api POST "/v1/sessions/$SESSION/append" -H 'Content-Type: application/json' \
  -d '{"text": "Two households, both alike in dignity, in fair Verona, where we lay our scene."}'

section "export the memory to a file, reset it, import the file back"
curl -sS --fail-with-body "${AUTH[@]}" "$URL/v1/sessions/$SESSION/memory" -o "$STATE_FILE"
echo "exported $(wc -c < "$STATE_FILE") bytes"
api POST "/v1/sessions/$SESSION/memory/reset"
api PUT "/v1/sessions/$SESSION/memory" -H 'Content-Type: application/octet-stream' --data-binary "@$STATE_FILE"

section "fork: a new session with a copy of the memory"
FORK="$(api POST "/v1/sessions/$SESSION/fork" -H 'Content-Type: application/json' -d '{}' | json_field id)"
echo "fork: $FORK"

section "OpenAI-compatible completion on the session (X-Session-Id header)"
api POST /v1/completions -H 'Content-Type: application/json' -H "X-Session-Id: $SESSION" \
  -d "{\"prompt\": \"\\nROMEO:\", \"max_tokens\": $MAX_TOKENS}"

section "OpenAI-compatible completion, streamed, without a session (fresh memory, discarded)"
api POST /v1/completions -N -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"ROMEO:\", \"max_tokens\": $MAX_TOKENS, \"stream\": true}"

section "OpenAI-compatible chat on the fork (send only the new messages)"
api POST /v1/chat/completions -H 'Content-Type: application/json' -H "X-Session-Id: $FORK" \
  -d "{\"messages\": [{\"role\": \"user\", \"content\": \"Who is Juliet?\"}], \"max_tokens\": $MAX_TOKENS}"

section "OpenAI-compatible chat, streamed, with a usage chunk at the end"
api POST /v1/chat/completions -N -H 'Content-Type: application/json' \
  -d "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": $MAX_TOKENS,
       \"stream\": true, \"stream_options\": {\"include_usage\": true}}"

section "tokenize and detokenize"
TOKENS="$(api POST /v1/tokenize -H 'Content-Type: application/json' -d '{"text": "Wherefore art thou"}' \
  | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["tokens"]))')"
echo "tokens: $TOKENS"
api POST /v1/detokenize -H 'Content-Type: application/json' -d "{\"tokens\": $TOKENS}"

section "an error: every route answers errors as {\"error\": {message, type, param, code}}"
curl -sS "${AUTH[@]}" -w '\nstatus: %{http_code} (expected 404)\n' "$URL/v1/sessions/no-such-session"

section "delete both sessions"
api DELETE "/v1/sessions/$FORK"
api DELETE "/v1/sessions/$SESSION"

section "Prometheus metrics (first lines)"
curl -sS --fail-with-body "${AUTH[@]}" "$URL/metrics" | grep '^titans_requests' | head -n 5 || true
