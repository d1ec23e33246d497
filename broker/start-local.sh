#!/usr/bin/env bash
# Start a private RabbitMQ node from the Debian `rabbitmq-server` package,
# with its own node name, AMQP port and data directory, so that it runs
# beside any other RabbitMQ on the machine. Prints the AMQP URI on stdout.
#
#   broker/start-local.sh [PORT] [DIR]     (defaults: 5673, /tmp/provring-rabbitmq-PORT)
#   broker/stop-local.sh  [PORT]
#
# With PROVRING_LOCAL_TLS_DIR set to a directory holding ca.pem, server.pem
# and server.key (PEM), the node also listens with TLS on PORT+1 and asks
# every TLS client for a certificate from that CA; the amqps:// URI is
# printed on a second line.
#
# Needs: apt-get install rabbitmq-server
set -euo pipefail

port=${1:-${PROVRING_LOCAL_AMQP_PORT:-5673}}
base=${2:-${PROVRING_LOCAL_BROKER_DIR:-/tmp/provring-rabbitmq-$port}}
node="provring-$port@localhost"

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "rabbitmq-server is not installed: apt-get install rabbitmq-server (or docker compose up rabbitmq)" >&2
  exit 69
fi

mkdir -p "$base/mnesia" "$base/log"
cat > "$base/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$port
loopback_users.guest = true
log.file.level = warning
CONF
if [ -n "${PROVRING_LOCAL_TLS_DIR:-}" ]; then
  mkdir -p "$base/tls"
  cp "$PROVRING_LOCAL_TLS_DIR/ca.pem" "$PROVRING_LOCAL_TLS_DIR/server.pem" "$PROVRING_LOCAL_TLS_DIR/server.key" "$base/tls/"
  cat >> "$base/rabbitmq.conf" <<CONF
listeners.ssl.1 = 127.0.0.1:$((port + 1))
ssl_options.cacertfile = $base/tls/ca.pem
ssl_options.certfile = $base/tls/server.pem
ssl_options.keyfile = $base/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
CONF
fi
echo "[]." > "$base/enabled_plugins"
: > "$base/rabbitmq-env.conf"
# The Debian scripts run the node as the rabbitmq user when started as root.
if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq: "$base" 2>/dev/null || true; fi

export RABBITMQ_NODENAME="$node"
export RABBITMQ_NODE_PORT="$port"
export RABBITMQ_DIST_PORT=$((port + 20000))
export RABBITMQ_MNESIA_BASE="$base/mnesia"
export RABBITMQ_LOG_BASE="$base/log"
export RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf"
export RABBITMQ_CONF_ENV_FILE="$base/rabbitmq-env.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins"
export RABBITMQ_PID_FILE="$base/rabbitmq.pid"
export ERL_EPMD_ADDRESS=127.0.0.1

if ! rabbitmqctl -q -n "$node" status >/dev/null 2>&1; then
  rabbitmq-server -detached
  rabbitmqctl -q -n "$node" wait --timeout 90 "$RABBITMQ_PID_FILE" >/dev/null
  rabbitmqctl -q -n "$node" await_startup --timeout 90 >/dev/null
fi
echo "amqp://guest:guest@127.0.0.1:$port/%2f"
if [ -n "${PROVRING_LOCAL_TLS_DIR:-}" ]; then
  echo "amqps://guest:guest@127.0.0.1:$((port + 1))/%2f"
fi
