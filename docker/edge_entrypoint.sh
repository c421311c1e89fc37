#!/usr/bin/env bash
# Entrypoint of the edge container: shape the uplink, then run the command as
# the unprivileged user "popex".
#
# Environment:
#   POPEX_LINK_PROFILE      a profile of configs/links.yaml (default: none = no shaping)
#   POPEX_LINK_IFACE        the egress interface to shape (default: eth0)
#   POPEX_LINK_CLOUD_HOST   shape only traffic to this host's IPv4 address
#                           (default: cloud); "all" shapes every packet leaving
#                           the interface, answers to the edge's clients included
#
# The profile is applied with docker/apply_link.sh (tc netem: the full RTT as
# delay plus the rate, on the edge's egress). The command then runs as "popex"
# with two ambient capabilities and nothing else: CAP_NET_ADMIN, so that the
# edge (and the tc it calls to change the profile at run time) can still shape
# the link, and CAP_NET_RAW for the uplink monitor's ICMP echo. If shaping fails the container exits: an
# experiment on an unshaped link would be silently wrong.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
profile=${POPEX_LINK_PROFILE:-none}
iface=${POPEX_LINK_IFACE:-eth0}
cloud_host=${POPEX_LINK_CLOUD_HOST:-cloud}

if [[ $profile != none ]]; then
    dst_args=()
    if [[ $cloud_host != all ]]; then
        [[ $cloud_host =~ ^[a-zA-Z0-9.-]{1,253}$ ]] || { echo "edge_entrypoint.sh: bad POPEX_LINK_CLOUD_HOST" >&2; exit 2; }
        cloud_ip=""
        for _ in $(seq 1 30); do  # the cloud's name resolves once its container is up
            read -r cloud_ip _ < <(getent ahostsv4 "$cloud_host" || true) || true
            [[ -n $cloud_ip ]] && break
            sleep 1
        done
        [[ -n $cloud_ip ]] || { echo "edge_entrypoint.sh: cannot resolve $cloud_host" >&2; exit 1; }
        dst_args=(--dst "$cloud_ip")
    fi
    "$here/apply_link.sh" --iface "$iface" --profile "$profile" "${dst_args[@]}"
fi

if [[ $(id -u) -eq 0 ]] && id popex >/dev/null 2>&1; then
    exec setpriv --reuid=popex --regid=popex --init-groups \
        --inh-caps=-all,+net_admin,+net_raw --ambient-caps=-all,+net_admin,+net_raw \
        --bounding-set=-all,+net_admin,+net_raw \
        -- "$@"
fi
exec "$@"
