#!/usr/bin/env bash
# Install MegaComet's kernel and process limits on this box. Idempotent: a second run changes
# nothing and says so.
#
#   sudo tuning/apply.sh              sysctl drop-in + live values, limits.d, systemd unit
#   tuning/apply.sh --dry-run         print what it would change; changes nothing, needs no root
#
# What it does, in order:
#   1. sysctl: tuning/sysctl.conf -> /etc/sysctl.d/90-megacomet.conf, and the live values in
#      /proc/sys, printing "old -> new" per key. Keys that are maximums (FLOOR_KEYS) are never
#      lowered: where the box already allows more, the higher value is kept, also in the file.
#      Port lists (UNION_KEYS) are merged: ports the box reserves already stay reserved.
#   2. limits: tuning/limits.conf -> /etc/security/limits.d/90-megacomet.conf (new logins), after
#      checking its nofile is within fs.nr_open (a limit above it makes pam_limits refuse logins).
#   3. systemd, if present: tuning/megacomet.service -> /etc/systemd/system/, with this
#      checkout's path, owner and python3 filled in; daemon-reload. It does not start the service.
#
# Environment, for tests and odd layouts: MEGACOMET_ETC (default /etc) and MEGACOMET_PROC_SYS
# (default /proc/sys) move where it writes and reads.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
ETC=${MEGACOMET_ETC:-/etc}
PROC_SYS=${MEGACOMET_PROC_SYS:-/proc/sys}
NAME=90-megacomet.conf

# Maximums: raising them costs nothing until used, lowering them could break something else on
# the box. Compared field by field (tcp_mem has three).
FLOOR_KEYS=" fs.file-max fs.nr_open fs.epoll.max_user_watches net.core.somaxconn
 net.ipv4.tcp_max_syn_backlog net.core.netdev_max_backlog net.ipv4.tcp_mem net.core.rmem_max
 net.core.wmem_max vm.min_free_kbytes net.ipv4.tcp_max_tw_buckets net.ipv4.tcp_max_orphans
 net.netfilter.nf_conntrack_max "

# Lists of ports, "8000-8127,9000": the value set is the box's list and ours together, so
# another service's reservation is never dropped.
UNION_KEYS=" net.ipv4.ip_local_reserved_ports "

DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run|-n) DRY=1 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "apply.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

if [[ $DRY == 0 && $EUID != 0 && $ETC == /etc ]]; then
    echo "apply.sh: needs root to write /etc and /proc/sys: sudo $0 (or --dry-run)" >&2
    exit 1
fi

CHANGES=0
FAILURES=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say() { printf '%s\n' "$*"; }
# "4096\t16384  x" -> "4096 16384 x"
normalize() { local -a f; read -r -a f <<< "$*" || true; printf '%s' "${f[*]-}"; }
is_floor() { [[ $FLOOR_KEYS == *" $1"[[:space:]]* ]]; }
is_union() { [[ $UNION_KEYS == *" $1 "* ]]; }

# Union of two port lists in ip_local_reserved_ports' format, merged and sorted as the kernel
# prints it ("9000,8000-8063" + "8064-8127" -> "8000-8127,9000").
union_ports() {
    printf '%s,%s' "$1" "$2" | tr ',' '\n' | awk -F- '
        /^[0-9]+(-[0-9]+)?$/ { print $1, (NF > 1 ? $2 : $1) }' | sort -n -k1,1 -k2,2 | awk '
        function put() { out = out (out == "" ? "" : ",") (lo == hi ? lo : lo "-" hi) }
        NR == 1 { lo = $1; hi = $2; next }
        $1 <= hi + 1 { if ($2 > hi) hi = $2; next }
        { put(); lo = $1; hi = $2 }
        END { if (NR) put(); printf "%s", out }'
}

# Field by field maximum of two whitespace-separated integer lists of the same length; anything
# else (a range, a list of ports) -> the wanted value.
floor_of() {
    local -a live want out
    read -r -a live <<< "$1"
    read -r -a want <<< "$2"
    if (( ${#live[@]} != ${#want[@]} )); then printf '%s' "$2"; return; fi
    local i
    for i in "${!want[@]}"; do
        if [[ ! ${live[i]} =~ ^[0-9]+$ || ! ${want[i]} =~ ^[0-9]+$ ]]; then
            printf '%s' "$2"; return
        fi
        if (( ${#live[i]} > ${#want[i]} )) || { (( ${#live[i]} == ${#want[i]} )) &&
                [[ ${live[i]} > ${want[i]} ]]; }; then
            out+=("${live[i]}")  # compared as digit strings: LONG_MAX values do not overflow
        else
            out+=("${want[i]}")
        fi
    done
    printf '%s' "${out[*]}"
}

# install_file NEW DEST: write DEST if it differs from NEW; prints what happened.
install_file() {
    local new=$1 dest=$2
    if [[ -f $dest ]] && cmp -s "$new" "$dest"; then
        say "  ok    $dest (unchanged)"
        return 1
    fi
    CHANGES=$((CHANGES + 1))
    if [[ $DRY == 1 ]]; then
        say "  would write $dest"
    else
        mkdir -p "$(dirname "$dest")"
        cp "$new" "$dest.megacomet-tmp"
        chmod 644 "$dest.megacomet-tmp"
        mv -f "$dest.megacomet-tmp" "$dest"
        say "  wrote $dest"
    fi
}

# --- 1. plan the sysctl values -------------------------------------------------------------------

say "sysctl (tuning/sysctl.conf -> $ETC/sysctl.d/$NAME):"
declare -a SET_KEYS=() SET_VALUES=()
declare -A PLANNED=()
: > "$TMP/sysctl.conf"
printf '# Installed by MegaComet tuning/apply.sh from %s/tuning/sysctl.conf.\n' "$REPO" \
    >> "$TMP/sysctl.conf"
printf '# Maximums already higher on this box at install time were kept. Edit the source and rerun.\n' \
    >> "$TMP/sysctl.conf"
while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ ^[[:space:]]*(#|$) ]]; then
        printf '%s\n' "$line" >> "$TMP/sysctl.conf"
        continue
    fi
    optional=""
    [[ $line == -* ]] && { optional="-"; line=${line#-}; }
    key=$(normalize "${line%%=*}")
    want=$(normalize "${line#*=}")
    path="$PROC_SYS/${key//.//}"
    if [[ ! -r $path ]]; then
        # Absent: a module not loaded (conntrack) or an older kernel. "-" makes boot ignore it.
        say "  skip  $key (no $path: module not loaded or not in this kernel)"
        printf -- '-%s = %s\n' "$key" "$want" >> "$TMP/sysctl.conf"
        continue
    fi
    old=$(normalize "$(cat "$path")")
    new=$want
    if is_floor "$key"; then
        new=$(floor_of "$old" "$want")
    elif is_union "$key"; then
        new=$(union_ports "$old" "$want")
    fi
    PLANNED[$key]=$new
    printf '%s%s = %s\n' "$optional" "$key" "$new" >> "$TMP/sysctl.conf"
    if [[ $old == "$new" ]]; then
        if [[ $new != "$want" ]] && is_union "$key"; then
            say "  keep  $key = $old (already includes $want)"
        elif [[ $new != "$want" ]]; then
            say "  keep  $key = $old (already above $want)"
        else
            say "  ok    $key = $old"
        fi
    else
        say "  set   $key: ${old:-(empty)} -> $new"
        SET_KEYS+=("$key")
        SET_VALUES+=("$new")
    fi
done < "$HERE/sysctl.conf"

# --- 2. check the open-file limits fit under fs.nr_open ------------------------------------------

nr_open=${PLANNED[fs.nr_open]:-}
max_nofile=$(awk '$3 == "nofile" && $4 ~ /^[0-9]+$/ { if ($4 > m) m = $4 } END { print m + 0 }' \
    "$HERE/limits.conf")
unit_nofile=$(sed -n 's/^LimitNOFILE=\([0-9]*\)$/\1/p' "$HERE/megacomet.service")
if [[ -n $nr_open ]]; then
    for n in "$max_nofile" "$unit_nofile"; do
        if [[ -n $n ]] && (( n > nr_open )); then
            echo "apply.sh: open-file limit $n is above fs.nr_open $nr_open: logins and the" \
                 "unit would fail. Raise fs.nr_open in tuning/sysctl.conf first." >&2
            exit 1
        fi
    done
fi

# --- 3. apply: sysctl file and live values, limits, unit -----------------------------------------

install_file "$TMP/sysctl.conf" "$ETC/sysctl.d/$NAME" || true
for i in "${!SET_KEYS[@]}"; do
    CHANGES=$((CHANGES + 1))
    key=${SET_KEYS[i]}
    [[ $DRY == 1 ]] && continue
    if ! printf '%s\n' "${SET_VALUES[i]}" 2>/dev/null > "$PROC_SYS/${key//.//}"; then
        say "  FAILED to set $key live (read-only /proc/sys? in a container, set it on the host)"
        FAILURES=$((FAILURES + 1))
    fi
done

# A file read after ours at boot (or /etc/sysctl.conf, read last) that sets the same key wins.
for f in "$ETC"/sysctl.d/*.conf "$ETC/sysctl.conf"; do
    [[ -f $f ]] || continue
    if [[ $f != "$ETC/sysctl.conf" ]]; then
        [[ $(basename "$f") > "$NAME" && ! $f -ef "$ETC/sysctl.conf" ]] || continue
    fi
    for key in "${!PLANNED[@]}"; do
        if grep -Eq "^[[:space:]]*-?${key//./\\.}[[:space:]]*=" "$f"; then
            say "  note  $f also sets $key and is read after $NAME at boot: remove it there"
        fi
    done
done

say "limits (tuning/limits.conf -> $ETC/security/limits.d/$NAME):"
if install_file "$HERE/limits.conf" "$ETC/security/limits.d/$NAME"; then
    say "  applies to new logins; the service gets LimitNOFILE from its unit instead"
fi

if [[ -d $ETC/systemd/system ]]; then
    say "systemd (tuning/megacomet.service -> $ETC/systemd/system/megacomet.service):"
    python=$(command -v python3 || echo /usr/bin/python3)
    owner=$(stat -c %U "$REPO")
    sed -e "s|@REPO@|$REPO|g" -e "s|@USER@|$owner|g" -e "s|@PYTHON@|$python|g" \
        "$HERE/megacomet.service" > "$TMP/megacomet.service"
    if install_file "$TMP/megacomet.service" "$ETC/systemd/system/megacomet.service" &&
            [[ $DRY == 0 && $ETC == /etc && -d /run/systemd/system ]]; then
        systemctl daemon-reload
        say "  systemctl daemon-reload done; start it with: systemctl enable --now megacomet"
    fi
else
    say "systemd: no $ETC/systemd/system, unit not installed (run manager.py under your supervisor" \
        "with an open-file limit of $unit_nofile)"
fi

# --- summary -------------------------------------------------------------------------------------

if [[ $DRY == 1 ]]; then
    say "dry run: $CHANGES change(s) planned, nothing written"
elif (( CHANGES == 0 )); then
    say "nothing to change: already applied"
else
    say "$CHANGES change(s) applied; check with: python3 $REPO/tuning/check.py --target 1000000"
fi
(( FAILURES == 0 ))
