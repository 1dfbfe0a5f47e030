#!/bin/bash
# Installs btfs and the mount(8) helper mount.btfs. Run as root from a checkout.
#
#   BINDIR  where btfs goes        (default /usr/local/bin)
#   SBINDIR where mount.btfs goes  (default /sbin; mount(8) looks there)
#
# Builds target/release/btfs first if it is missing or older than the sources.
set -euo pipefail
cd "$(dirname "$0")/.."
BINDIR=${BINDIR:-/usr/local/bin}
SBINDIR=${SBINDIR:-/sbin}

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs into $BINDIR and $SBINDIR)" >&2
    exit 1
fi
bin=target/release/btfs
if [ ! -x "$bin" ] || [ -n "$(find src crates Cargo.toml Cargo.lock -newer "$bin" -print -quit)" ]; then
    cargo build --release --locked
fi
install -d "$BINDIR" "$SBINDIR" /etc/btfs
install -m 0755 "$bin" "$BINDIR/btfs.new" && mv -f "$BINDIR/btfs.new" "$BINDIR/btfs"
sed "s|^BTFS=.*|BTFS=$BINDIR/btfs|" mount-helpers/mount.btfs > "$SBINDIR/mount.btfs.new"
chmod 0755 "$SBINDIR/mount.btfs.new"
mv -f "$SBINDIR/mount.btfs.new" "$SBINDIR/mount.btfs"
echo "installed $BINDIR/btfs and $SBINDIR/mount.btfs"
echo "next: btfs keygen /etc/btfs/swarm.key (once per cluster; copy it to every node)"
