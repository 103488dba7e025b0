#!/usr/bin/env bash
# Local RabbitMQ nodes of their own, to try a cluster on one machine.
#
# Each node gets its own name (<name>@localhost), ports, data and logs under
# DIR/<name>, and the cookie DIR/.erlang.cookie shared by the nodes of DIR
# only: these nodes never talk to a RabbitMQ already running on the machine
# (its own cookie, its own node name, port 5672), which is left as it is.
#
#   ops/rabbitmq-extra-node.sh start DIR NAME AMQP_PORT DIST_PORT
#       start NAME@localhost in the background and wait until it runs;
#       AMQP on 127.0.0.1:AMQP_PORT, inter-node and CLI traffic on DIST_PORT;
#       no plugins (no management API: it would slow every rejoin).
#   ops/rabbitmq-extra-node.sh join DIR NAME SEED
#       NAME leaves whatever it held and joins the cluster of SEED@localhost
#       (rabbitmqctl stop_app, reset, join_cluster, start_app).
#   ops/rabbitmq-extra-node.sh ctl DIR NAME ARGS...
#       rabbitmqctl ARGS on NAME@localhost (with the cookie of DIR).
#   ops/rabbitmq-extra-node.sh stop DIR NAME
#       stop NAME@localhost and wait until its process has exited.
#
# RABBITMQ_SCRIPTS names the folder of RabbitMQ's own scripts (Debian:
# /usr/lib/rabbitmq/bin, whose /usr/sbin wrappers would switch to the
# rabbitmq user and its cookie); by default that folder, else the one holding
# rabbitmq-server on PATH.
set -euo pipefail

usage() {
    sed -n '2,/^# RABBITMQ_SCRIPTS/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

scripts() {
    if [ -n "${RABBITMQ_SCRIPTS:-}" ]; then
        echo "$RABBITMQ_SCRIPTS"
    elif [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        echo /usr/lib/rabbitmq/bin
    elif command -v rabbitmq-server >/dev/null; then
        dirname "$(command -v rabbitmq-server)"
    else
        echo "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)" >&2
        exit 3
    fi
}

# Run one of RabbitMQ's scripts with DIR's cookie ($HOME/.erlang.cookie is where Erlang reads it).
rabbit() {
    local dir=$1 script=$2
    shift 2
    HOME=$dir ERL_EPMD_ADDRESS=127.0.0.1 "$bin/$script" "$@"
}

[ $# -ge 3 ] || usage
bin=$(scripts)
command=$1 dir=$(realpath -m "$2") name=$3
shift 3
node="$name@localhost"
home="$dir/$name"

case "$command" in
start)
    [ $# -eq 2 ] || usage
    amqp_port=$1 dist_port=$2
    mkdir -p "$home"
    # One cookie for the nodes of DIR, whichever starts first (link fails where it exists).
    new_cookie=$(mktemp "$dir/.cookie.XXXXXX")
    head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$new_cookie"
    chmod 400 "$new_cookie"
    ln "$new_cookie" "$dir/.erlang.cookie" 2>/dev/null || true
    rm -f "$new_cookie"
    echo "listeners.tcp.1 = 127.0.0.1:$amqp_port" >"$home/rabbitmq.conf"
    echo '[].' >"$home/enabled_plugins" # not the machine's /etc/rabbitmq/enabled_plugins
    : >"$home/rabbitmq-env.conf" # not the machine's /etc/rabbitmq/rabbitmq-env.conf (its node name)
    RABBITMQ_NODENAME=$node \
        RABBITMQ_DIST_PORT=$dist_port \
        RABBITMQ_CONF_ENV_FILE="$home/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$home/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$home/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$home/mnesia" \
        RABBITMQ_LOG_BASE="$home/log" \
        RABBITMQ_PLUGINS_EXPAND_DIR="$home/plugins-expand" \
        RABBITMQ_PID_FILE="$home/pid" \
        ERL_CRASH_DUMP="$home/erl_crash.dump" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        rabbit "$dir" rabbitmq-server -detached
    # `wait` reads the pid file the node writes, then waits for RabbitMQ to run on it.
    rabbit "$dir" rabbitmqctl -q -n "$node" wait --timeout 120 "$home/pid"
    ;;
join)
    [ $# -eq 1 ] || usage
    seed="$1@localhost"
    rabbit "$dir" rabbitmqctl -q -n "$node" stop_app
    rabbit "$dir" rabbitmqctl -q -n "$node" reset
    rabbit "$dir" rabbitmqctl -q -n "$node" join_cluster "$seed"
    rabbit "$dir" rabbitmqctl -q -n "$node" start_app
    ;;
ctl)
    rabbit "$dir" rabbitmqctl -n "$node" "$@"
    ;;
stop)
    # With the pid file, rabbitmqctl stop returns once the node's process has exited.
    rabbit "$dir" rabbitmqctl -q -n "$node" stop "$home/pid"
    ;;
*)
    usage
    ;;
esac
