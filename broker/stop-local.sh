#!/usr/bin/env bash
# Stop the private RabbitMQ node started by broker/start-local.sh.
#   broker/stop-local.sh [PORT]
set -euo pipefail
port=${1:-${PROVRING_LOCAL_AMQP_PORT:-5673}}
ERL_EPMD_ADDRESS=127.0.0.1 rabbitmqctl -q -n "provring-$port@localhost" stop
