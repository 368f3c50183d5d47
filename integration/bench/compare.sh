#!/bin/bash
# Shoal vs. NFS-Ganesha over NFSv3, side by side on this machine, with one independent
# load generator (nfsbench, a libnfs client that is not ours); then `shoal bench` (lease
# recall round trip and small files through a FUSE mount).
#
#   integration/bench/compare.sh
#
# Environment (all optional):
#   NFSBENCH_SRC   directory holding nfsbench.c and build.sh  (default: ../shared/bench
#                  next to the repository)
#   NFSBENCH_ARGS  nfsbench parameters for both servers       (default: -t 4 -n 1000 -s 64)
#   ROUNDS         rounds per server; the table shows the median and the range (default: 3)
#   SHOAL_PORT     Shoal's NFS port; its lease channel takes the next one (default: 20590)
#   GANESHA_PORT   Ganesha's NFS port; MOUNT takes the next one (default: 20490)
#   BENCH_PARENT   where the temporary directory goes         (default: ${TMPDIR:-/tmp})
#   SHOAL_BENCH    0 skips `shoal bench`                       (default: 1)
#   SHOAL_BENCH_ARGS  arguments for `shoal bench`              (default: none)
#
# Needs root (Ganesha, FUSE) and Debian packages; installs the missing ones:
# libnfs-dev, nfs-ganesha, nfs-ganesha-vfs, rpcbind, fuse3.
#
# Both exports live in one temporary directory, so both servers write to the same
# filesystem. Everything started here is stopped on exit, also on failure or Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
NFSBENCH_SRC=${NFSBENCH_SRC:-$REPO/../shared/bench}
NFSBENCH_ARGS=${NFSBENCH_ARGS:--t 4 -n 1000 -s 64}
ROUNDS=${ROUNDS:-3}
SHOAL_PORT=${SHOAL_PORT:-20590}
GANESHA_PORT=${GANESHA_PORT:-20490}
GANESHA_MNT_PORT=$((GANESHA_PORT + 1))
BENCH_PARENT=${BENCH_PARENT:-${TMPDIR:-/tmp}}
SHOAL_BENCH=${SHOAL_BENCH:-1}
SHOAL_BENCH_ARGS=${SHOAL_BENCH_ARGS:-}

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'compare.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (Ganesha and FUSE need it)"
[ -f "$NFSBENCH_SRC/nfsbench.c" ] || die "no nfsbench.c in $NFSBENCH_SRC (set NFSBENCH_SRC)"

WORK=$(mktemp -d "$BENCH_PARENT/shoal-compare.XXXXXX")
SHOAL_PID= GANESHA_PID= RPCBIND_PID=

stop() { # stop PID NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1 name=$2
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    say "$name (pid $pid) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop "$SHOAL_PID" "shoal serve"
    stop "$GANESHA_PID" "ganesha.nfsd"
    stop "$RPCBIND_PID" "rpcbind"
    if [ "$rc" != 0 ] && [ -d "$WORK" ]; then
        for log in "$WORK"/*.log; do
            [ -s "$log" ] || continue
            printf '\n--- last lines of %s\n' "$log" >&2
            tail -n 15 "$log" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! ss -ltnH "sport = :$1" | grep -q .; }

wait_listen() { # wait_listen PORT PID NAME LOG
    local port=$1 pid=$2 name=$3 log=$4
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || die "$name exited during start-up (log: $log)"
        ss -ltnH "sport = :$port" | grep -q . && return 0
        sleep 0.1
    done
    die "$name did not listen on port $port within 15 s (log: $log)"
}

# --- packages -------------------------------------------------------------------------
missing=()
for p in libnfs-dev nfs-ganesha nfs-ganesha-vfs rpcbind fuse3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- builds ---------------------------------------------------------------------------
say "building shoal (release)"
(cd "$REPO" && cargo build --release --quiet)
SHOAL=$REPO/target/release/shoal

say "building nfsbench from $NFSBENCH_SRC"
# build.sh builds next to itself; build a copy so the source tree stays untouched.
mkdir -p "$WORK/nfsbench"
cp "$NFSBENCH_SRC/nfsbench.c" "$NFSBENCH_SRC/build.sh" "$WORK/nfsbench/"
sh "$WORK/nfsbench/build.sh"
NFSBENCH=$WORK/nfsbench/nfsbench

# --- servers --------------------------------------------------------------------------
for p in "$SHOAL_PORT" $((SHOAL_PORT + 1)) "$GANESHA_PORT" "$GANESHA_MNT_PORT"; do
    port_free "$p" || die "port $p is in use (set SHOAL_PORT / GANESHA_PORT)"
done
mkdir "$WORK/shoal-export" "$WORK/ganesha-export"

say "starting shoal serve on 127.0.0.1:$SHOAL_PORT"
RUST_LOG=${RUST_LOG:-warn} "$SHOAL" serve "$WORK/shoal-export" --listen "127.0.0.1:$SHOAL_PORT" \
    >"$WORK/shoal.log" 2>&1 &
SHOAL_PID=$!
wait_listen "$SHOAL_PORT" "$SHOAL_PID" "shoal serve" "$WORK/shoal.log"

if rpcinfo -p 127.0.0.1 >/dev/null 2>&1; then
    say "rpcbind already running"
else
    say "starting rpcbind -w"
    rpcbind -f -w >"$WORK/rpcbind.log" 2>&1 &
    RPCBIND_PID=$!
    wait_listen 111 "$RPCBIND_PID" "rpcbind" "$WORK/rpcbind.log"
fi

cat >"$WORK/ganesha.conf" <<EOF
NFS_Core_Param {
    Protocols = 3, 4;
    NFS_Port = $GANESHA_PORT;
    MNT_Port = $GANESHA_MNT_PORT;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Bind_addr = 127.0.0.1;
    # NFSv3 MOUNT takes the Pseudo path (/export), as NFSv4 would.
    Mount_Path_Pseudo = true;
}
NFSv4 { Graceless = true; }
EXPORT {
    Export_Id = 1;
    Path = $WORK/ganesha-export;
    Pseudo = /export;
    Protocols = 3, 4;
    Access_Type = RW;
    Squash = None;
    SecType = sys;
    FSAL { Name = VFS; }
}
EOF
say "starting ganesha.nfsd on 127.0.0.1:$GANESHA_PORT (MOUNT $GANESHA_MNT_PORT)"
ganesha.nfsd -F -f "$WORK/ganesha.conf" -p "$WORK/ganesha.pid" -L "$WORK/ganesha.log" &
GANESHA_PID=$!
wait_listen "$GANESHA_MNT_PORT" "$GANESHA_PID" "ganesha.nfsd" "$WORK/ganesha.log"
wait_listen "$GANESHA_PORT" "$GANESHA_PID" "ganesha.nfsd" "$WORK/ganesha.log"

SHOAL_URL="nfs://127.0.0.1/?nfsport=$SHOAL_PORT&mountport=$SHOAL_PORT"
GANESHA_URL="nfs://127.0.0.1/export?nfsport=$GANESHA_PORT&mountport=$GANESHA_MNT_PORT"

# nfsbench's write mode ends with an fsync (NFSv3 COMMIT). Shoal's NFSv3 layer (nfsserve)
# has no COMMIT: it answers every WRITE FILE_SYNC (see README), so the fsync fails there
# and nfsbench counts one error per thread. run_nfsbench accepts exactly those errors and
# fails on any other.
run_nfsbench() { # run_nfsbench NAME OUT URL ARGS...: 0 if clean, 2 if only fsync failed, 1 else
    local name=$1 out=$2 url=$3
    shift 3
    if "$NFSBENCH" "$url" "$@" >"$out" 2>"$out.err"; then
        return 0
    fi
    local errors fsyncs
    errors=$(awk '$1 == "errors" { print $2 }' "$out")
    fsyncs=$(grep -c ': fsync ' "$out.err" || true)
    if [ -n "$errors" ] && [ "$errors" -gt 0 ] && [ "$errors" = "$fsyncs" ]; then
        return 2
    fi
    say "$name: nfsbench failed:"
    head -n 5 "$out.err" >&2
    return 1
}

# A first small run against each proves the server answers before the measured rounds.
for s in shoal ganesha; do
    url=SHOAL_URL
    if [ $s = ganesha ]; then url=GANESHA_URL; fi
    rc=0
    run_nfsbench "$s" "$WORK/smoke-$s.out" "${!url}" -t 1 -n 10 -s 1 || rc=$?
    if [ $rc = 1 ]; then die "$s does not serve nfsbench at ${!url}"; fi
    if [ $rc = 2 ]; then say "$s: fsync (COMMIT) not supported; its write figure excludes a flush"; fi
done

# --- measured rounds ------------------------------------------------------------------
# Servers alternate, and which one goes first alternates per round, so neither always
# runs on a machine warmed (or loaded) by the other.
say "nfsbench $NFSBENCH_ARGS, $ROUNDS round(s) per server"
: >"$WORK/results"
for r in $(seq "$ROUNDS"); do
    order="shoal ganesha"
    if [ $((r % 2)) = 0 ]; then order="ganesha shoal"; fi
    for s in $order; do
        url=SHOAL_URL
    if [ $s = ganesha ]; then url=GANESHA_URL; fi
        rc=0
        # shellcheck disable=SC2086 # NFSBENCH_ARGS is a list of arguments
        run_nfsbench "$s" "$WORK/round-$r-$s.out" "${!url}" $NFSBENCH_ARGS || rc=$?
        if [ $rc = 1 ]; then die "round $r: nfsbench against $s failed"; fi
        if [ $rc = 2 ]; then echo "$s" >>"$WORK/nofsync"; fi
        awk -v s=$s -v r="$r" 'NF == 3 { print s, r, $1, $2, $3 }' "$WORK/round-$r-$s.out" >>"$WORK/results"
        printf '   round %s %-8s %s\n' "$r" "$s" \
            "$(awk 'NF == 3 { printf "%s %s  ", $1, $2 } $1 == "errors" { printf "errors %s", $2 }' "$WORK/round-$r-$s.out")" >&2
    done
done

echo
echo "nfsbench $NFSBENCH_ARGS ($ROUNDS rounds; median, range in brackets)"
awk -v rounds="$ROUNDS" '
    function median(list,   n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        lo[0] = a[1]; hi[0] = a[n]
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { v[$1, $3] = v[$1, $3] " " $4; unit[$3] = $5; if (!($3 in seen)) { seen[$3] = 1; order[++m] = $3 } }
    END {
        printf "%-8s %-11s %26s %26s %8s\n", "mode", "unit", "shoal", "ganesha", "ratio"
        for (i = 1; i <= m; i++) {
            k = order[i]
            ms = median(v["shoal", k]); rs = sprintf("%.0f [%.0f-%.0f]", ms, lo[0], hi[0])
            mg = median(v["ganesha", k]); rg = sprintf("%.0f [%.0f-%.0f]", mg, lo[0], hi[0])
            printf "%-8s %-11s %26s %26s %8s\n", k, unit[k], rs, rg, (mg > 0 ? sprintf("%.2f", ms / mg) : "-")
        }
        print "ratio = shoal / ganesha (higher is better for Shoal)"
    }' "$WORK/results"
if [ -s "$WORK/nofsync" ]; then
    echo "write: nfsbench's closing fsync (COMMIT) failed on $(sort -u "$WORK/nofsync" | tr '\n' ' ')(no COMMIT;"
    echo "       WRITE answers FILE_SYNC without fsync), so that figure includes no flush to disk."
fi

# --- shoal bench ----------------------------------------------------------------------
if [ "$SHOAL_BENCH" != 0 ]; then
    echo
    say "shoal bench $SHOAL_BENCH_ARGS"
    # shellcheck disable=SC2086 # SHOAL_BENCH_ARGS is a list of arguments
    "$SHOAL" bench --dir "$WORK" $SHOAL_BENCH_ARGS
fi
