//! What `btfs status` shows of the engine.

use std::sync::{Arc, atomic::Ordering};

use super::{Engine, live::Live};

/// What `btfs status` shows.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub bittorrent_listen: Option<String>,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    pub live_torrents: usize,
    /// (content, member) pairs that members announced holding.
    pub known_holdings: usize,
    /// Members' metainfo requests that brought no torrent up because
    /// `MAX_WARMING` were being brought up already.
    pub warm_refused: u64,
    /// Metainfo from members that failed its checks (bounds, info hash,
    /// content, size).
    pub metainfo_refused: u64,
    /// The cap on live torrents (`EngineConfig::max_live`).
    pub max_live: usize,
    /// Members' handshakes (and metainfo requests) refused because every
    /// live torrent was in use and `max_live` were live.
    pub live_refused: u64,
    /// Peer connections refused because their member had
    /// `MAX_WIRES_PER_MEMBER` open (or their host `MAX_WIRES_PER_HOST` on
    /// the BitTorrent listener).
    pub member_conns_refused: u64,
    /// Members' handshakes refused because their member brought up
    /// torrents faster than `MEMBER_BRING_UP_RATE` a second after a burst of
    /// `MEMBER_BRING_UP_BURST`.
    pub member_bring_ups_refused: u64,
    /// Peer connections closed for moving nothing: no handshake within
    /// `HANDSHAKE_TIMEOUT`, or no byte either way for `BRIDGE_IDLE`.
    pub bridges_idle_closed: u64,
    /// Connections to the loopback SOCKS5 bridge refused for want of the
    /// daemon's secret (local processes other than librqbit).
    pub socks_refused: u64,
    pub fetches: Vec<FetchStatus>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FetchStatus {
    pub path: String,
    pub size: u64,
    pub have: u64,
    pub full: bool,
}

impl Engine {
    pub fn status(&self) -> Status {
        let live: Vec<Arc<Live>> = self.live.lock().values().cloned().collect();
        let mut s = Status {
            bittorrent_listen: self.public.map(|a| a.to_string()),
            bytes_downloaded: self.retired_down.load(Ordering::Relaxed),
            bytes_uploaded: self.retired_up.load(Ordering::Relaxed),
            live_torrents: live.len(),
            known_holdings: self.holders.lock().count(),
            warm_refused: self.warm_refused.load(Ordering::Relaxed),
            metainfo_refused: self.metainfo_refused.load(Ordering::Relaxed),
            max_live: self.cfg.max_live.max(1),
            live_refused: self.limits.live_refused.load(Ordering::Relaxed),
            member_conns_refused: self.limits.member_conns_refused.load(Ordering::Relaxed),
            member_bring_ups_refused: self.limits.member_bring_ups_refused.load(Ordering::Relaxed),
            bridges_idle_closed: self.limits.bridges_idle_closed.load(Ordering::Relaxed),
            socks_refused: self.socks_refused.load(Ordering::Relaxed),
            fetches: Vec::new(),
        };
        for l in live {
            let stats = l.handle.live();
            if let Some(st) = &stats {
                s.bytes_downloaded += st.get_downloaded_bytes();
                s.bytes_uploaded += st.get_uploaded_bytes();
            }
            let state = l.state();
            let fetching = state.fetching();
            if !state.is_complete() && (fetching || l.in_use()) {
                s.fetches.push(FetchStatus {
                    path: l.label.lock().clone(),
                    size: l.meta.size,
                    have: stats.map_or(0, |st| st.get_approx_have_bytes()),
                    full: fetching,
                });
            }
        }
        s
    }
}
