#!/usr/bin/env bash
# Flower's deployment runtime on this machine: a SuperLink and N SuperNodes as separate processes
# on 127.0.0.1, `flwr run` of this app for R rounds, then every started process is stopped.
#
#   scripts/local-deployment.sh N R ['key=value ...' run config overrides] [NODE_CONFIG_0 ... NODE_CONFIG_N-1]
#
# SuperNode k gets --node-config NODE_CONFIG_k when given (a data owner's own data:
# 'data="/path/owner.jsonl" reward="math"', with scenario='user-data' in the overrides), else
# "partition-id=k num-partitions=N" (client k of the run's named scenario).
#
# With FGRPO_SECURE=1 the federation runs with TLS (a local CA from scripts/make-credentials.sh)
# and SuperNode authentication: each SuperNode's public key is registered with the SuperLink
# before the SuperNode starts, and only registered SuperNodes can join.
#
# With FGRPO_RESIDENT=1 each SuperNode gets a resident owner process (`fgrpo owner serve`, the same run config
# and node config; socket $FGRPO_DEPLOY_DIR/owner-k.sock, log owner-k.log, pids in owner-pids) that loads the
# owner's model and data once; the SuperNode's node config names its socket (owner-socket), so each round's
# ClientApp only passes the message on. They start before the run and stop with the rest.
#
# Each process starts in its own process group (setsid) and is stopped by group, so the SuperExec,
# ServerApp and ClientApp children go with it. Logs and Flower's state: $FGRPO_DEPLOY_DIR
# (default: a new temporary folder, printed). The run directory: out=... in the overrides, else
# runs/deployment-<date-time>. Exit code: flwr run's, or 1 when the run left no summary.json.
set -euo pipefail

N=${1:?usage: scripts/local-deployment.sh N R [run-config overrides]}
R=${2:?usage: scripts/local-deployment.sh N R [run-config overrides]}
OVERRIDES=${3:-}
NODE_CONFIGS=("${@:4}")
APP_DIR=$(cd "$(dirname "$0")/.." && pwd)
WORK=${FGRPO_DEPLOY_DIR:-$(mktemp -d -t fgrpo-deploy-XXXXXX)}
mkdir -p "$WORK"
echo "logs and state: $WORK"

# Flower's processes start each other by name (flwr-clientapp, flwr-serverapp): take them from this Python's
# own bin folder, not through a version manager's shim (pyenv's costs a bash and a pyenv exec per round).
PATH="$(dirname "$(python -c 'import sys; print(sys.executable)')"):$PATH"

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LINK_PORT=$(free_port)
CERTS="$WORK/credentials"
if [ "${FGRPO_SECURE:-0}" = 1 ]; then
    "$APP_DIR/scripts/make-credentials.sh" "$CERTS" "$N" > /dev/null
    LINK_SECURITY=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem"
                   --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
    CONNECTION="root-certificates = \"$CERTS/ca.crt\""
else
    LINK_SECURITY=(--insecure)
    CONNECTION="insecure = true"
fi
setsid flower-superlink "${LINK_SECURITY[@]}" --disable-runtime-dependency-installation --port "$LINK_PORT" \
    --database "$WORK/superlink.db" > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
echo "$!" > "$WORK/pids"
for _ in $(seq 100); do
    python -c "import socket; socket.create_connection(('127.0.0.1', $LINK_PORT), 0.2)" 2>/dev/null && break
    sleep 0.2
done

export FLWR_HOME="$WORK/flwr-home"  # the SuperNodes and flwr keep their state here, not in ~/.flwr
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:$LINK_PORT"
$CONNECTION
TOML

case " $OVERRIDES " in
    *" out="*) RUN_CONFIG="num-clients=$N rounds=$R $OVERRIDES" ;;
    *) OUT="$APP_DIR/runs/deployment-$(date +%Y%m%d-%H%M%S)"
       RUN_CONFIG="num-clients=$N rounds=$R out='$OUT' $OVERRIDES" ;;
esac

# N SuperNodes share this machine's cores: each ClientApp gets its share of threads (with the
# default, every process runs one thread per core and OpenMP oversubscription slows training ~10x)
THREADS=$(( $(nproc) / N ))
[ "$THREADS" -ge 1 ] || THREADS=1
for k in $(seq 0 $((N - 1))); do
    if [ "${FGRPO_SECURE:-0}" = 1 ]; then
        flwr supernode register "$CERTS/node-$k.pub" local-deployment > "$WORK/register-$k.log" 2>&1
        NODE_SECURITY=(--root-certificates "$CERTS/ca.crt" --auth-supernode-private-key "$CERTS/node-$k")
    else
        NODE_SECURITY=(--insecure)
    fi
    NODE_CONFIG=${NODE_CONFIGS[$k]:-partition-id=$k num-partitions=$N}
    if [ "${FGRPO_RESIDENT:-0}" = 1 ]; then
        NODE_CONFIG="$NODE_CONFIG owner-socket=\"$WORK/owner-$k.sock\""
    fi
    # each SuperNode its own FLWR_HOME: two installing the same FAB into one folder race (one loads a
    # half-extracted app: "Cannot find pyproject.toml"), and that SuperNode's ClientApp fails the round
    mkdir -p "$WORK/flwr-home-node-$k"
    FLWR_HOME="$WORK/flwr-home-node-$k" OMP_NUM_THREADS=$THREADS setsid flower-supernode "${NODE_SECURITY[@]}" --superlink "127.0.0.1:$LINK_PORT" --port "$(free_port)" \
        --node-config "$NODE_CONFIG" > "$WORK/supernode-$k.log" 2>&1 &
    PIDS+=($!)
    echo "$!" >> "$WORK/pids"
    if [ "${FGRPO_RESIDENT:-0}" = 1 ]; then
        rm -f "$WORK/owner-$k.sock.status.json"
        OMP_NUM_THREADS=$THREADS setsid fgrpo owner serve --socket "$WORK/owner-$k.sock" --run-config "$RUN_CONFIG" \
            --node-config "$NODE_CONFIG" > "$WORK/owner-$k.log" 2>&1 &
        PIDS+=($!)
        echo "$!" >> "$WORK/owner-pids"
    fi
done
if [ "${FGRPO_RESIDENT:-0}" = 1 ]; then  # each resident has loaded its model and listens (or the run stops here)
    for k in $(seq 0 $((N - 1))); do
        pid=$(sed -n "$((k + 1))p" "$WORK/owner-pids")
        until [ -f "$WORK/owner-$k.sock.status.json" ]; do  # written once it listens
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "owner process $k exited at start; its log ($WORK/owner-$k.log) ends with:" >&2
                tail -3 "$WORK/owner-$k.log" >&2
                exit 1
            fi
            sleep 0.5
        done
    done
fi

sleep 2
for k in $(seq 0 $((N - 1))); do
    if ! kill -0 "$(sed -n "$((k + 2))p" "$WORK/pids")" 2>/dev/null; then
        echo "SuperNode $k exited at start; its log ($WORK/supernode-$k.log) ends with:" >&2
        tail -3 "$WORK/supernode-$k.log" >&2
        exit 1
    fi
done

cd "$APP_DIR"
flwr run . local-deployment --stream --run-config "$RUN_CONFIG" 2>&1 | tee "$WORK/flwr-run.log"
status=${PIPESTATUS[0]}
out_dir=$(sed -n "s/.*run directory: \(.*\)$/\1/p" "$WORK/flwr-run.log" | tail -1)
if [ "$status" = 0 ] && { [ -z "$out_dir" ] || [ ! -f "$out_dir/summary.json" ]; }; then
    echo "the run did not write its summary.json; see $WORK" >&2
    status=1
fi
exit "$status"
