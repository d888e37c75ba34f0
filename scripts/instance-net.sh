#!/usr/bin/env bash
# Network of one instance on a follower node: its own network namespace, a
# veth pair to the host, and an IPv6 /112 of the node's instance range:
# the host side holds <net>::1 (the gateway and the node's address towards
# the instance), the instance holds its own address. Forwarding between
# instance interfaces is dropped by nftables, so instances reach the node
# and nothing else through it; the node reaches every instance directly.
#
#   instance-net.sh up   NETNS HOSTIF GATEWAY ADDRESS PREFIXLEN
#   instance-net.sh down NETNS HOSTIF
#   instance-net.sh firewall
#
# Embedded in the follower with include_str! and run as root. `up` fails if
# the namespace already exists (the caller tears down first); `down` is
# idempotent. With ZW_HOST_NETNS set, the named network namespace plays the
# host (host ends of the veths, the nftables table): for nodes that run in
# a namespace themselves.
set -euo pipefail

readonly TABLE=zeitwork_instances
readonly HOST_NETNS=${ZW_HOST_NETNS:-}

hip() {
    if [ -n "$HOST_NETNS" ]; then ip -n "$HOST_NETNS" "$@"; else ip "$@"; fi
}

hnft() {
    if [ -n "$HOST_NETNS" ]; then ip netns exec "$HOST_NETNS" nft "$@"; else nft "$@"; fi
}

firewall() {
    # One table shared by every follower on the host; interface names of
    # instances all start with "zwi". Created once; concurrent creators only
    # duplicate identical rules.
    if hnft list table inet "$TABLE" >/dev/null 2>&1; then
        return 0
    fi
    hnft -f - <<NFT
table inet $TABLE {
    chain forward {
        type filter hook forward priority filter - 10; policy accept;
        iifname "zwi*" drop
        oifname "zwi*" drop
    }
}
NFT
}

up() {
    local ns=$1 hostif=$2 gw=$3 addr=$4 plen=$5
    firewall
    ip netns add "$ns"
    if ! {
        hip link add "$hostif" type veth peer name eth0 netns "$ns" &&
            hip -6 addr add "$gw/$plen" dev "$hostif" nodad &&
            hip link set "$hostif" up &&
            ip -n "$ns" link set lo up &&
            ip -n "$ns" -6 addr add "$addr/$plen" dev eth0 nodad &&
            ip -n "$ns" link set eth0 up &&
            ip -n "$ns" -6 route add default via "$gw" dev eth0
    }; then
        down "$ns" "$hostif"
        echo "instance-net: setting up $ns ($addr) failed" >&2
        return 1
    fi
}

down() {
    local ns=$1 hostif=$2
    # Deleting the namespace destroys its end of the veth and with it the
    # pair; the explicit link delete covers a pair left without namespace.
    ip netns del "$ns" 2>/dev/null || true
    hip link del "$hostif" 2>/dev/null || true
}

cmd=${1:-}
shift || true
case $cmd in
up) [ $# -eq 5 ] || { echo "usage: $0 up NETNS HOSTIF GATEWAY ADDRESS PREFIXLEN" >&2; exit 2; }
    up "$@" ;;
down) [ $# -eq 2 ] || { echo "usage: $0 down NETNS HOSTIF" >&2; exit 2; }
    down "$@" ;;
firewall) firewall ;;
*) echo "usage: $0 up|down|firewall ..." >&2; exit 2 ;;
esac
