#!/usr/bin/env bash
# Host side of the network of one microVM (qemu runtime): a tap device the
# VMM attaches the guest's virtio-net to. The tap holds the gateway address
# of the instance's /112, so the host has a directly connected route to the
# instance's own address (configured inside the guest by zw-init).
# Forwarding from or to any instance interface ("zwi*", taps included) is
# dropped by the nftables table that instance-net.sh also maintains, so an
# instance reaches the node and nothing else through it.
#
#   guest-tap.sh up   TAP GATEWAY PREFIXLEN
#   guest-tap.sh down TAP
#
# Embedded in the follower with include_str! and run as root. `up` replaces
# a leftover tap of the same name (it can only belong to a dead VM of the
# same instance); `down` is idempotent.
set -euo pipefail

readonly TABLE=zeitwork_instances

firewall() {
    # Same table and rules as instance-net.sh (whichever runs first creates
    # it); keep the two in step.
    if nft list table inet "$TABLE" >/dev/null 2>&1; then
        return 0
    fi
    nft -f - <<NFT
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
    local tap=$1 gw=$2 plen=$3
    firewall
    ip link del "$tap" 2>/dev/null || true
    if ! {
        ip tuntap add dev "$tap" mode tap &&
            ip -6 addr add "$gw/$plen" dev "$tap" nodad &&
            ip link set "$tap" up
    }; then
        ip link del "$tap" 2>/dev/null || true
        echo "guest-tap: setting up $tap ($gw/$plen) failed" >&2
        return 1
    fi
}

down() {
    ip link del "$1" 2>/dev/null || true
}

cmd=${1:-}
shift || true
case $cmd in
up) [ $# -eq 3 ] || { echo "usage: $0 up TAP GATEWAY PREFIXLEN" >&2; exit 2; }
    up "$@" ;;
down) [ $# -eq 1 ] || { echo "usage: $0 down TAP" >&2; exit 2; }
    down "$@" ;;
*) echo "usage: $0 up|down ..." >&2; exit 2 ;;
esac
