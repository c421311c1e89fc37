#!/usr/bin/env bash
# Shape the egress of one interface to a link profile with tc netem (delay + rate).
#
#   docker/apply_link.sh [--dry-run] [--iface IFACE] [--dst IPV4] --profile NAME
#   docker/apply_link.sh [--dry-run] [--iface IFACE] [--dst IPV4] --rate-mbps R --rtt-ms D
#   docker/apply_link.sh [--dry-run] [--iface IFACE] --clear
#
# Defaults come from the environment: IFACE (eth0), LINK_PROFILE, RATE_MBPS,
# RTT_MS, DST_IP; PYTHON (python3) resolves --profile through
# configs/links.yaml (python -m popex.link.profiles).
#
# Where the delay goes: netem delays only what LEAVES an interface, so this is
# run on the edge's egress with delay = the FULL RTT. A request leaves the
# edge once and its answer comes back undelayed, so each round trip sees the
# RTT exactly once; the cloud is not shaped. The rate limits the uplink
# (edge -> cloud) only, which is what the profiles measure.
#
# --dst IPV4 shapes only traffic to that address (the cloud), so that the
# edge's answers to its own clients are not slowed down: an htb root lets
# everything else through untouched, one class carries the rate, netem under
# it the delay, and a u32 filter picks the destination. Without --dst all
# egress is shaped: tc qdisc replace dev IFACE root netem delay .. rate .. limit ..
#
# Every value is checked against a strict pattern before use and re-formatted
# as an integer (kbit, us), so nothing from the input reaches tc unchecked;
# the commands are arrays, never a string run by a shell. They are the same
# as popex.link.shaping.tc_commands(..., netem=True) builds (tested).
#
# --dry-run prints the tc commands instead of running them. Exit status 2 on
# bad input, tc's status if tc fails.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    echo "apply_link.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# "93.6" -> 93600: a decimal with at most $2 integer digits and 3 decimals, in thousandths.
thousandths() {
    local text=$1 max_int_digits=$2 re int frac
    re="^([0-9]{1,${max_int_digits}})(\.([0-9]{1,3}))?$"
    [[ $text =~ $re ]] || return 1
    int=${BASH_REMATCH[1]}
    frac="${BASH_REMATCH[3]}000"
    echo $(( 10#$int * 1000 + 10#${frac:0:3} ))
}

dry_run=0
clear=0
iface=${IFACE:-eth0}
profile=${LINK_PROFILE:-}
rate_mbps=${RATE_MBPS:-}
rtt_ms=${RTT_MS:-}
dst_ip=${DST_IP:-}
python=${PYTHON:-python3}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --clear) clear=1; shift ;;
        --iface) [[ $# -ge 2 ]] || usage; iface=$2; shift 2 ;;
        --dst) [[ $# -ge 2 ]] || usage; dst_ip=$2; shift 2 ;;
        --profile) [[ $# -ge 2 ]] || usage; profile=$2; shift 2 ;;
        --rate-mbps) [[ $# -ge 2 ]] || usage; rate_mbps=$2; shift 2 ;;
        --rtt-ms) [[ $# -ge 2 ]] || usage; rtt_ms=$2; shift 2 ;;
        -h|--help) usage ;;
        *) die "unknown argument: $(printf '%q' "$1")" ;;
    esac
done

[[ $iface =~ ^[a-zA-Z0-9_.-]{1,15}$ ]] || die "interface name must match ^[a-zA-Z0-9_.-]{1,15}\$, got $(printf '%q' "$iface")"

run() {
    if [[ $dry_run -eq 1 ]]; then
        echo "$*"
    else
        "$@"
    fi
}

if [[ $clear -eq 1 ]]; then
    if [[ $dry_run -eq 1 ]]; then
        echo "tc qdisc del dev $iface root"
    else
        tc qdisc del dev "$iface" root 2>/dev/null || true  # nothing to delete is fine
    fi
    exit 0
fi

if [[ -n $profile ]]; then
    [[ -z $rate_mbps && -z $rtt_ms ]] || die "give --profile or --rate-mbps/--rtt-ms, not both"
    [[ $profile =~ ^[a-z0-9][a-z0-9-]{0,31}$ ]] || die "profile name must match ^[a-z0-9][a-z0-9-]{0,31}\$, got $(printf '%q' "$profile")"
    values=$(cd "$repo_root" && "$python" -m popex.link.profiles "$profile") \
        || die "cannot read link profile '$profile' from configs/links.yaml"
    read -r rate_mbps rtt_ms <<<"$values"
fi
[[ -n $rate_mbps && -n $rtt_ms ]] || die "need --profile NAME, or --rate-mbps R and --rtt-ms D"

rate_kbit=$(thousandths "$rate_mbps" 6) \
    || die "rate must be a plain decimal in Mbit/s (at most 3 decimals), got $(printf '%q' "$rate_mbps")"
delay_us=$(thousandths "$rtt_ms" 5) \
    || die "RTT must be a plain decimal in ms (at most 3 decimals), got $(printf '%q' "$rtt_ms")"
(( rate_kbit >= 10 && rate_kbit <= 100000000 )) || die "rate must be in [0.01, 100000] Mbit/s, got $rate_mbps"
(( delay_us <= 60000000 )) || die "RTT must be in [0, 60000] ms, got $rtt_ms"

if [[ -n $dst_ip ]]; then
    # Dotted quad without leading zeros (which some parsers read as octal).
    octet_re='(0|[1-9][0-9]{0,2})'
    ip_re="^${octet_re}\\.${octet_re}\\.${octet_re}\\.${octet_re}\$"
    [[ $dst_ip =~ $ip_re ]] || die "--dst must be an IPv4 address, got $(printf '%q' "$dst_ip")"
    for octet in "${BASH_REMATCH[@]:1}"; do
        (( octet <= 255 )) || die "--dst must be an IPv4 address, got $dst_ip"
    done
fi

# netem holds every packet for the delay: its queue must fit twice the
# bandwidth-delay product (in 1500-byte packets), at least netem's default 1000.
limit_packets=$(( (2 * rate_kbit * delay_us + 11999999) / 12000000 ))
(( limit_packets >= 1000 )) || limit_packets=1000

if [[ -z $dst_ip ]]; then
    run tc qdisc replace dev "$iface" root netem delay "${delay_us}us" rate "${rate_kbit}kbit" limit "$limit_packets"
else
    # Children are added, not replaced: start from the kernel's default root.
    if [[ $dry_run -eq 1 ]]; then
        echo "# tc qdisc del dev $iface root  (first; errors ignored)"
    else
        tc qdisc del dev "$iface" root 2>/dev/null || true
    fi
    run tc qdisc replace dev "$iface" root handle 1: htb
    run tc class add dev "$iface" parent 1: classid 1:10 htb rate "${rate_kbit}kbit" ceil "${rate_kbit}kbit"
    run tc qdisc add dev "$iface" parent 1:10 handle 10: netem delay "${delay_us}us" limit "$limit_packets"
    run tc filter add dev "$iface" parent 1: protocol ip prio 1 u32 match ip dst "$dst_ip/32" flowid 1:10
fi
if [[ $dry_run -eq 0 ]]; then
    echo "apply_link.sh: $iface egress${dst_ip:+ to $dst_ip}: rate ${rate_mbps} Mbit/s, delay ${rtt_ms} ms (full RTT)" >&2
fi
