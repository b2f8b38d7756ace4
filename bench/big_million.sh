#!/usr/bin/env bash
# The million run at a large target on a box of its own (16 cores, 10,000,000), as root:
#
#   sudo bench/big_million.sh [TARGET] [DIR]        default 10000000, bench/results
#
# 1. DIR/setup.txt: the box as found (cores, RAM, limits, the sysctls that matter), what
#    tuning/apply.sh changed, and tuning/check.py --target TARGET after it.
# 2. The open-file limit of tuning/limits.conf (1,048,576), so that bench/million.py runs one
#    worker and one client process per core instead of one per 20,000 connections.
# 3. The counts apply.sh leaves below what TARGET needs with the client on the same box (each
#    connection is two sockets): fs.file-max, fs.epoll.max_user_watches, tcp_mem's max (the
#    broadcast reach: a page per queued reply, both ends) and nf_conntrack_max if conntrack is
#    loaded. Raised for this boot only, never lowered; then check.py again.
# 4. bench/million.py --target TARGET: its table in DIR/run.txt, its JSON, client JSON and figure
#    beside it, the manager's and client's output in DIR/million.log; meanwhile DIR/mem.txt gets
#    MemAvailable, Slab and the TCP sockstat line every 5 s, and the kernel's log at the end.
set -uo pipefail
TARGET=${1:-10000000}
DIR=${2:-bench/results}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
SETUP=$DIR/setup.txt
sysctls() {
    for k in fs/file-max fs/nr_open fs/epoll/max_user_watches net/ipv4/tcp_mem \
             net/ipv4/ip_local_port_range net/core/somaxconn net/netfilter/nf_conntrack_max; do
        [[ -e /proc/sys/$k ]] && echo "  $k = $(tr '\t' ' ' < /proc/sys/$k)"
    done
}
# The open-file limit up to tuning/limits.conf's 1,048,576, never down (a box may allow more);
# where even root may not raise it (a container), million.py sizes itself from what is left.
raise_nofile() {
    local want=1048576
    if (( $(ulimit -Hn) < want )); then ulimit -Hn $want || return 0; fi
    ulimit -Sn "$(ulimit -Hn)"
}
{
    echo "== the box"
    date -u; uname -r; echo "cores $(nproc)"; grep -m1 'model name' /proc/cpuinfo; free -g
    $PY -V; echo "nofile $(ulimit -Sn)/$(ulimit -Hn)"; sysctls
    echo "== tuning/apply.sh"
    tuning/apply.sh
    raise_nofile
    echo "nofile now $(ulimit -Sn)/$(ulimit -Hn)"
    echo "== tuning/check.py --target $TARGET (after apply.sh)"
    $PY tuning/check.py --target "$TARGET"
} > "$SETUP" 2>&1

# at_least KEY VALUE: the last field of /proc/sys/KEY raised to VALUE (the others kept).
at_least() {
    local path=/proc/sys/${1//.//} f
    [[ -e $path ]] || return 0
    read -r -a f < "$path"
    if (( f[-1] < $2 )); then
        f[-1]=$2
        echo "  $1: $(tr '\t' ' ' < "$path") -> ${f[*]}"
        echo "${f[*]}" > "$path"
    fi
}
{
    echo "== raised for $TARGET with the client on this box (two sockets a connection)"
    at_least fs.file-max $((2 * TARGET + 1000000))
    at_least fs.epoll.max_user_watches $((2 * TARGET + 1000000))
    at_least net.ipv4.tcp_mem $((2 * TARGET))
    at_least net.netfilter.nf_conntrack_max $((2 * TARGET + 1000000))
    sysctls
    echo "== tuning/check.py --target $TARGET (after that)"
    $PY tuning/check.py --target "$TARGET"
} >> "$SETUP" 2>&1

( while sleep 5; do
      echo "$(date +%s) $(grep -E '^(MemAvailable|Slab):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')" \
           "$(grep '^TCP:' /proc/net/sockstat)"
  done ) > "$DIR/mem.txt" 2>&1 &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null' EXIT  # also on Ctrl-C or an early exit
$PY bench/million.py --target "$TARGET" --max-time "${MAX_TIME:-450}" \
    --json "$DIR/million-big.json" --log "$DIR/million.log" 2>&1 | tee "$DIR/run.txt"
rc=${PIPESTATUS[0]}
{ echo "== dmesg (last 40 lines)"; dmesg 2>&1 | tail -n 40; } >> "$DIR/mem.txt"
rm -f "$DIR/million-big.txt"  # the same table is in run.txt
exit "$rc"
