# A throw-away fleet of one: a JetStream nats-server in a temporary directory and
# flagsmith-sse wired to it, both stopped and the directory removed on exit.
# Ports: SSE_PORT (default 8088) and NATS_PORT (default 14222). Streams end within a second
# of Ctrl-C: a demo has no fleet to hand its clients over to.

sse_port="${SSE_PORT:-8088}"
nats_port="${NATS_PORT:-14222}"
dir="$(mktemp -d -t flagsmith-sse-demo.XXXXXX)"
pids=()

cleanup() {
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

nats-server --jetstream --store_dir "$dir/jetstream" --addr 127.0.0.1 --port "$nats_port" \
  >"$dir/nats.log" 2>&1 &
pids+=("$!")

token="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$token" >"$dir/token"
chmod 600 "$dir/token"

cat <<INSTRUCTIONS
flagsmith-sse demo: NATS JetStream on 127.0.0.1:$nats_port, the service on 127.0.0.1:$sse_port.

Subscribe, in another terminal:

  curl -N http://127.0.0.1:$sse_port/sse/environments/my-environment-key/stream

Publish a change, as Flagsmith's task processor does:

  curl -X POST http://127.0.0.1:$sse_port/sse/environments/my-environment-key/queue-change \\
    -H 'Authorization: Token $token' \\
    -d '{"updated_at": "$(date -u +%Y-%m-%dT%H:%M:%S.000000+00:00)"}'

Press Ctrl-C to stop both and remove $dir.

INSTRUCTIONS

NATS_URL="nats://127.0.0.1:$nats_port" \
  LISTEN_ADDR="127.0.0.1:$sse_port" \
  FLAGSMITH_SSE_AUTHENTICATION_TOKEN_FILE="$dir/token" \
  FLAGSMITH_SSE_NATS__STORAGE=memory \
  FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD=1 \
  flagsmith-sse &
pids+=("$!")
wait "${pids[-1]}"
