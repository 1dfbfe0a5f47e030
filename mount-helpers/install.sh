#!/bin/bash
# Installs btfs, the mount(8) helper mount.btfs, the manual pages btfs(1) and
# mount.btfs(8), and the bash and zsh completions. Run as root from a checkout.
#
#   PREFIX      base of the paths below        (default /usr/local)
#   BINDIR      where btfs goes                (default PREFIX/bin)
#   SBINDIR     where mount.btfs goes          (default /sbin; mount(8) looks there)
#   MANDIR      manual pages, under man1, man8 (default PREFIX/share/man)
#   BASHCOMPDIR bash completions               (default PREFIX/share/bash-completion/completions)
#   ZSHCOMPDIR  zsh completions                (default PREFIX/share/zsh/site-functions)
#   DESTDIR     staging root prepended to every path above (packaging); the
#               installed mount.btfs still names BINDIR/btfs without it.
#               With DESTDIR set, root is not required.
#   BTFS_BIN    the binary to install (default target/release/btfs, built
#               first if it is missing or older than the sources)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
BINDIR=${BINDIR:-$PREFIX/bin}
SBINDIR=${SBINDIR:-/sbin}
MANDIR=${MANDIR:-$PREFIX/share/man}
BASHCOMPDIR=${BASHCOMPDIR:-$PREFIX/share/bash-completion/completions}
ZSHCOMPDIR=${ZSHCOMPDIR:-$PREFIX/share/zsh/site-functions}
DESTDIR=${DESTDIR:-}

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs into $BINDIR and $SBINDIR), or set DESTDIR" >&2
    exit 1
fi
bin=${BTFS_BIN:-target/release/btfs}
if [ -z "${BTFS_BIN:-}" ] && { [ ! -x "$bin" ] || [ -n "$(find src crates Cargo.toml Cargo.lock -newer "$bin" -print -quit)" ]; }; then
    cargo build --release --locked
fi
install -d "$DESTDIR$BINDIR" "$DESTDIR$SBINDIR" "$DESTDIR/etc/btfs" \
    "$DESTDIR$MANDIR/man1" "$DESTDIR$MANDIR/man8" "$DESTDIR$BASHCOMPDIR" "$DESTDIR$ZSHCOMPDIR"
install -m 0755 "$bin" "$DESTDIR$BINDIR/btfs.new" && mv -f "$DESTDIR$BINDIR/btfs.new" "$DESTDIR$BINDIR/btfs"
sed "s|^BTFS=.*|BTFS=$BINDIR/btfs|" mount-helpers/mount.btfs > "$DESTDIR$SBINDIR/mount.btfs.new"
chmod 0755 "$DESTDIR$SBINDIR/mount.btfs.new"
mv -f "$DESTDIR$SBINDIR/mount.btfs.new" "$DESTDIR$SBINDIR/mount.btfs"
# A remount (mount -o remount MNT) looks the helper up by the mount's type
# as the kernel shows it, fuse.btfs.
ln -sf mount.btfs "$DESTDIR$SBINDIR/mount.fuse.btfs"

# Pages and completions come from the binary itself (hidden commands), so
# they describe exactly the btfs installed.
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
"$bin" manpages "$gen" 2> /dev/null
install -m 0644 "$gen/btfs.1" "$DESTDIR$MANDIR/man1/btfs.1"
install -m 0644 "$gen/mount.btfs.8" "$DESTDIR$MANDIR/man8/mount.btfs.8"
"$bin" completions bash > "$gen/btfs.bash"
"$bin" completions zsh > "$gen/_btfs"
install -m 0644 "$gen/btfs.bash" "$DESTDIR$BASHCOMPDIR/btfs"
install -m 0644 "$gen/_btfs" "$DESTDIR$ZSHCOMPDIR/_btfs"

echo "installed $DESTDIR$BINDIR/btfs and $DESTDIR$SBINDIR/mount.btfs"
echo "  man pages $DESTDIR$MANDIR/man1/btfs.1, $DESTDIR$MANDIR/man8/mount.btfs.8"
echo "  completions $DESTDIR$BASHCOMPDIR/btfs (bash), $DESTDIR$ZSHCOMPDIR/_btfs (zsh)"
echo "next: btfs keygen /etc/btfs/swarm.key (once per cluster; copy it to every node)"
