# The lab's BitTorrent baseline: one libtorrent-rasterbar session (Debian's
# python3-libtorrent), a client nobody on this project wrote.
#
#   swarm.py seed|leech TORRENT DIR LISTEN_IP PORT [PEER_IP ...]
#
# DHT, local peer discovery, UPnP, NAT-PMP and uTP are off; the peers are
# given by hand. It prints READY once the torrent is added, waits for a line
# on standard input, connects to every peer, and (leech) prints DONE when it
# holds the whole file. It seeds until killed.
import sys
import time

import libtorrent as lt

role, torrent, save, ip, port = sys.argv[1:6]
peers = sys.argv[6:]
session = lt.session(
    {
        "listen_interfaces": f"{ip}:{port}",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "alert_mask": 0,
    }
)
params = {"ti": lt.torrent_info(torrent), "save_path": save}
if role == "seed":
    params["flags"] = lt.torrent_flags.seed_mode
handle = session.add_torrent(params)
print("READY", flush=True)
sys.stdin.readline()
for p in peers:
    handle.connect_peer((p, int(port)))
if role == "leech":
    while not handle.status().is_seeding:
        time.sleep(0.02)
    print("DONE", flush=True)
while True:
    time.sleep(1)
