#!/usr/bin/env bash
# Network of one instance on a follower node: its own network namespace, a
# veth pair to the host, an IPv6 /112 of the node's instance range (the
# host side holds <net>::1, the gateway and the node's address towards the
# instance; the instance holds its own address) and a private IPv4 /31 (the
# host side the even address, the instance the odd one).
#
#   instance-net.sh up   NETNS HOSTIF GATEWAY6 ADDRESS6 PREFIXLEN6 GATEWAY4 ADDRESS4
#   instance-net.sh down NETNS HOSTIF
#   instance-net.sh firewall
#   instance-net.sh tap-up TAP GATEWAY6 PREFIXLEN6 GATEWAY4 [OWNER-UID]
#   instance-net.sh tap-down TAP
#
# The node's nftables table (inet $ZW_NFT_TABLE: one per node, so followers
# and tests sharing a host never touch each other's rules) keeps the set of
# its instance interfaces and, for them:
#   input       nothing on the node itself (node API, node-proxy, anything
#               bound on [::] or 0.0.0.0), only replies and neighbour
#               discovery with the gateway;
#   forward     no new connection into an instance (not from another
#               instance, not from outside); out of an instance anything but
#               the blocked destinations ($ZW_BLOCKED4/6: link-local and
#               metadata addresses, the captains), when $ZW_EGRESS is 1;
#   postrouting masquerade of what leaves the node (IPv4 and IPv6).
# The node reaches every instance directly (its own traffic is not
# forwarded). With egress on, `firewall` turns on forwarding in the host
# namespace (IPv6 interfaces that take router advertisements keep taking
# them: accept_ra 2); it stays on. The table is removed with the node's
# last instance interface.
#
# Embedded in the follower with include_str! and run as root. `up` fails if
# the namespace already exists (the caller tears down first); `down` is
# idempotent. With ZW_HOST_NETNS set, the named network namespace plays the
# host (host ends of the veths, the nftables table): for nodes that run in a
# namespace themselves, and for tests.
set -euo pipefail

readonly TABLE=${ZW_NFT_TABLE:-zeitwork}
readonly HOST_NETNS=${ZW_HOST_NETNS:-}
readonly EGRESS=${ZW_EGRESS:-0}
readonly BLOCKED4=${ZW_BLOCKED4:-169.254.0.0/16}
readonly BLOCKED6=${ZW_BLOCKED6:-fe80::/10}

hip() {
    if [ -n "$HOST_NETNS" ]; then ip -n "$HOST_NETNS" "$@"; else ip "$@"; fi
}

hnft() {
    if [ -n "$HOST_NETNS" ]; then ip netns exec "$HOST_NETNS" nft "$@"; else nft "$@"; fi
}

# hsysctl KEY VALUE: writes /proc/sys of the host namespace.
hsysctl() {
    local path=/proc/sys/${1//.//}
    if [ -n "$HOST_NETNS" ]; then
        ip netns exec "$HOST_NETNS" bash -c 'echo "$2" >"$1"' _ "$path" "$2"
    else
        echo "$2" >"$path"
    fi
}

hread() {
    local path=/proc/sys/${1//.//}
    if [ -n "$HOST_NETNS" ]; then ip netns exec "$HOST_NETNS" cat "$path"; else cat "$path"; fi
}

# "add element" of the space-separated list $2 to set $1 (nothing if empty).
elements() {
    local out="" x
    for x in $2; do out+="${out:+, }$x"; done
    [ -z "$out" ] || echo "add element inet $TABLE $1 { $out }"
}

firewall() {
    local egress_rule=drop nat=""
    if [ "$EGRESS" = 1 ]; then
        egress_rule=accept
        nat="add rule inet $TABLE postrouting iifname @ifaces oifname != @ifaces masquerade"
    fi
    # One transaction: the interface set survives, everything else is
    # replaced, so a changed block list applies at the next `up`.
    hnft -f - <<NFT
add table inet $TABLE
add set inet $TABLE ifaces { type ifname; }
add set inet $TABLE blocked4 { type ipv4_addr; flags interval; auto-merge; }
add set inet $TABLE blocked6 { type ipv6_addr; flags interval; auto-merge; }
flush set inet $TABLE blocked4
flush set inet $TABLE blocked6
$(elements blocked4 "$BLOCKED4")
$(elements blocked6 "$BLOCKED6")
add chain inet $TABLE input { type filter hook input priority filter - 10; policy accept; }
add chain inet $TABLE forward { type filter hook forward priority filter - 10; policy accept; }
add chain inet $TABLE postrouting { type nat hook postrouting priority srcnat; policy accept; }
flush chain inet $TABLE input
flush chain inet $TABLE forward
flush chain inet $TABLE postrouting
add rule inet $TABLE input iifname @ifaces ct state established,related accept
add rule inet $TABLE input iifname @ifaces icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
add rule inet $TABLE input iifname @ifaces drop
add rule inet $TABLE forward oifname @ifaces ct state established,related accept
add rule inet $TABLE forward oifname @ifaces drop
add rule inet $TABLE forward iifname @ifaces ip daddr @blocked4 drop
add rule inet $TABLE forward iifname @ifaces ip6 daddr @blocked6 drop
add rule inet $TABLE forward iifname @ifaces $egress_rule
$nat
NFT
    if [ "$EGRESS" = 1 ]; then
        if [ "$(hread net.ipv6.conf.all.forwarding)" != 1 ]; then
            local conf
            for conf in $(hip -o link show | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
                if [ "$(hread "net.ipv6.conf.$conf.accept_ra" 2>/dev/null)" = 1 ]; then
                    hsysctl "net.ipv6.conf.$conf.accept_ra" 2 || true
                fi
            done
            hsysctl net.ipv6.conf.all.forwarding 1
        fi
        [ "$(hread net.ipv4.ip_forward)" = 1 ] || hsysctl net.ipv4.ip_forward 1
    fi
}

# Rules and interface set change under one host-wide lock, so the last
# instance going (which removes the table) never races a new one coming.
lock() {
    exec 9>>"${ZW_LOCK_DIR:-/run/lock}/zeitwork-net.lock"
    flock 9
}

unlock() { exec 9>&-; }

# enlist IFACE: (re)writes the node's rules and applies them to IFACE.
enlist() {
    lock
    firewall && hnft add element inet "$TABLE" ifaces "{ $1 }"
    local rc=$?
    unlock
    return $rc
}

# delist IFACE; the node's table goes with its last interface.
delist() {
    lock
    hnft delete element inet "$TABLE" ifaces "{ $1 }" 2>/dev/null || true
    # Deleted only on a listing that worked and shows no element (a dump
    # interrupted by a concurrent change fails, and then nothing is done).
    local set
    if set=$(hnft list set inet "$TABLE" ifaces 2>/dev/null) &&
        [[ $set == *"type ifname"* ]] && [[ $set != *"elements ="* ]]; then
        hnft delete table inet "$TABLE" 2>/dev/null || true
    fi
    unlock
}

up() {
    local ns=$1 hostif=$2 gw=$3 addr=$4 plen=$5 gw4=$6 addr4=$7
    # The rules hold for the interface before it exists.
    enlist "$hostif" || return 1
    ip netns add "$ns" || { delist "$hostif"; return 1; }
    if ! {
        hip link add "$hostif" type veth peer name eth0 netns "$ns" &&
            hip -6 addr add "$gw/$plen" dev "$hostif" nodad &&
            hip addr add "$gw4/31" dev "$hostif" &&
            hip link set "$hostif" up &&
            ip -n "$ns" link set lo up &&
            ip -n "$ns" -6 addr add "$addr/$plen" dev eth0 nodad &&
            ip -n "$ns" addr add "$addr4/31" dev eth0 &&
            ip -n "$ns" link set eth0 up &&
            ip -n "$ns" -6 route add default via "$gw" dev eth0 &&
            ip -n "$ns" route add default via "$gw4" dev eth0 &&
            # The network namespace belongs to the host's user namespace, so
            # an instance's root (in a user namespace of its own) has no
            # CAP_NET_BIND_SERVICE there: ports below 1024 are opened to it.
            ip netns exec "$ns" bash -c 'echo 0 >/proc/sys/net/ipv4/ip_unprivileged_port_start'
    }; then
        down "$ns" "$hostif"
        echo "instance-net: setting up $ns ($addr, $addr4) failed" >&2
        return 1
    fi
}

down() {
    local ns=$1 hostif=$2
    # Deleting the namespace destroys its end of the veth and with it the
    # pair; the explicit link delete covers a pair left without namespace.
    ip netns del "$ns" 2>/dev/null || true
    hip link del "$hostif" 2>/dev/null || true
    delist "$hostif"
}

# The host side of a microVM's network: a tap the VMM attaches the guest's
# virtio-net to, under the same rules. Replaces a leftover tap of the same
# name (it can only belong to a dead VM of the same instance).
tap_up() {
    local tap=$1 gw=$2 plen=$3 gw4=$4 owner=${5:-}
    enlist "$tap" || return 1
    hip link del "$tap" 2>/dev/null || true
    if ! {
        hip tuntap add dev "$tap" mode tap ${owner:+user "$owner"} &&
            hip -6 addr add "$gw/$plen" dev "$tap" nodad &&
            hip addr add "$gw4/31" dev "$tap" &&
            hip link set "$tap" up
    }; then
        tap_down "$tap"
        echo "instance-net: setting up tap $tap ($gw/$plen) failed" >&2
        return 1
    fi
}

tap_down() {
    hip link del "$1" 2>/dev/null || true
    delist "$1"
}

cmd=${1:-}
shift || true
case $cmd in
up) [ $# -eq 7 ] || { echo "usage: $0 up NETNS HOSTIF GATEWAY6 ADDRESS6 PREFIXLEN6 GATEWAY4 ADDRESS4" >&2; exit 2; }
    up "$@" ;;
down) [ $# -eq 2 ] || { echo "usage: $0 down NETNS HOSTIF" >&2; exit 2; }
    down "$@" ;;
tap-up) [ $# -eq 4 ] || [ $# -eq 5 ] || { echo "usage: $0 tap-up TAP GATEWAY6 PREFIXLEN6 GATEWAY4 [OWNER-UID]" >&2; exit 2; }
    tap_up "$@" ;;
tap-down) [ $# -eq 1 ] || { echo "usage: $0 tap-down TAP" >&2; exit 2; }
    tap_down "$@" ;;
firewall) lock; firewall ;;
*) echo "usage: $0 up|down|tap-up|tap-down|firewall ..." >&2; exit 2 ;;
esac
