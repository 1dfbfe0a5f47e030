//! The lifecycle of a live torrent: what its content is, and what is under
//! way on it. All its transitions are here, one method per event.

/// Where a live torrent stands: its content, who fetches the whole file in
/// the background, and whether an install started by reads is under way.
///
/// The three parts move independently (a whole-file fetch may start while a
/// follower runs, an install may be queued during either), so each is an
/// enum of its own and every combination is representable.
///
/// Invariants:
/// * Content only moves from [`Content::Partial`] to [`Content::Complete`]
///   ([`installed`](Self::installed)), never back; a torrent added for an
///   object starts complete. The request [`Window`] is fixed when it is
///   added, and only matters while it is partial: a complete torrent
///   requests nothing, and suits any use.
/// * A follower starts ([`sequential_reader`](Self::sequential_reader)) only
///   on partial content with no whole-file fetch and no follower yet. A
///   whole-file fetch starts ([`fetch_started`](Self::fetch_started)) only
///   on partial content, follower or not. Either may outlive the content's
///   completion (`Complete` with a fetch until it returns): transitions
///   never clear one on another's behalf.
/// * At most one install started by reads is queued at a time
///   ([`install_queued`](Self::install_queued)), never for complete content;
///   it stays queued until its task ends, even past the completion it made.
/// * [`busy`](Self::busy): a whole-file fetch or a queued install. A busy
///   torrent is never retired for idleness or to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lifecycle {
    content: Content,
    background: Background,
    install: Install,
}

/// What a live torrent's content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Content {
    /// Pieces are missing (the file is in `bt/partial/`); librqbit requests
    /// them with the window it was added with.
    Partial(Window),
    /// Every piece is here, checked against the content id, and the file is
    /// an object: it is seeded in place.
    Complete,
}

/// The chunk requests librqbit keeps outstanding per peer in a partial
/// torrent (fixed when it is added).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Window {
    /// Added for reads (`READ_REQUEST_WINDOW`).
    Reads,
    /// Added for a whole-file fetch (`PEER_REQUEST_WINDOW`).
    WholeFile,
}

/// Who has the whole file selected in librqbit, fetching it in the
/// background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Background {
    /// Nobody: reads fetch only the pieces they touch.
    Lazy,
    /// A follower fetches ahead of a sequential reader (`Engine::follow`).
    Follower,
    /// A whole-file fetch (`Engine::fetch`).
    Fetch,
    /// A whole-file fetch started while a follower ran. The follower, when
    /// it stops, leaves the file selected for the fetch.
    FetchAndFollower,
}

/// An install into the object store started by reads that saw every piece
/// (`Engine::install_if_whole`). Installs from other paths are serialized
/// by `Live::install_lock`, not tracked here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Install {
    Idle,
    Queued,
}

impl Background {
    fn of(fetch: bool, follower: bool) -> Self {
        match (fetch, follower) {
            (false, false) => Self::Lazy,
            (false, true) => Self::Follower,
            (true, false) => Self::Fetch,
            (true, true) => Self::FetchAndFollower,
        }
    }

    fn fetch(self) -> bool {
        matches!(self, Self::Fetch | Self::FetchAndFollower)
    }

    fn follower(self) -> bool {
        matches!(self, Self::Follower | Self::FetchAndFollower)
    }
}

impl Lifecycle {
    /// A torrent added to the session: for an object here (`complete`), or
    /// partial with the window of a whole-file fetch (`whole`) or of reads.
    /// One added again in place of a followed one (`followed`) keeps its
    /// follower.
    pub(super) fn added(complete: bool, whole: bool, followed: bool) -> Self {
        let content = match (complete, whole) {
            (true, _) => Content::Complete,
            (false, true) => Content::Partial(Window::WholeFile),
            (false, false) => Content::Partial(Window::Reads),
        };
        Self {
            content,
            background: Background::of(false, followed),
            install: Install::Idle,
        }
    }

    // ----- what it is ---------------------------------------------------------

    pub(super) fn is_complete(&self) -> bool {
        self.content == Content::Complete
    }

    /// Whether it serves a use that wants the whole file (`whole`) as it is,
    /// or must be added again with the window of a whole-file fetch.
    pub(super) fn suits(&self, whole: bool) -> bool {
        !whole
            || matches!(
                self.content,
                Content::Complete | Content::Partial(Window::WholeFile)
            )
    }

    /// A whole-file fetch is under way.
    pub(super) fn fetching(&self) -> bool {
        self.background.fetch()
    }

    /// A follower fetches ahead of a sequential reader.
    pub(super) fn followed(&self) -> bool {
        self.background.follower()
    }

    /// Not to be retired: a whole-file fetch or a queued install.
    pub(super) fn busy(&self) -> bool {
        self.fetching() || self.install == Install::Queued
    }

    // ----- events -------------------------------------------------------------

    /// A reader was found sequential. Returns whether a follower is to be
    /// started for it (then it counts as followed): not for complete
    /// content, nor while a whole-file fetch or another follower runs.
    pub(super) fn sequential_reader(&mut self) -> bool {
        if self.is_complete() || self.background != Background::Lazy {
            return false;
        }
        self.background = Background::Follower;
        true
    }

    /// A follower took this torrent over (it may have been added again
    /// since the follower was started).
    pub(super) fn follower_attached(&mut self) {
        self.background = Background::of(self.fetching(), true);
    }

    /// The follower stopped (or failed to start).
    pub(super) fn follower_stopped(&mut self) {
        self.background = Background::of(self.fetching(), false);
    }

    /// A whole-file fetch wants this torrent. Returns whether it is to run:
    /// complete content needs none.
    pub(super) fn fetch_started(&mut self) -> bool {
        if self.is_complete() {
            return false;
        }
        self.background = Background::of(true, self.followed());
        true
    }

    /// The whole-file fetch returned (done or not).
    pub(super) fn fetch_ended(&mut self) {
        self.background = Background::of(false, self.followed());
    }

    /// Reads saw every piece. Returns whether to start an install: not for
    /// complete content, nor while one is queued already.
    pub(super) fn install_queued(&mut self) -> bool {
        if self.is_complete() || self.install == Install::Queued {
            return false;
        }
        self.install = Install::Queued;
        true
    }

    /// The install started by reads ended (installed or not).
    pub(super) fn install_ended(&mut self) {
        self.install = Install::Idle;
    }

    /// The content was checked and moved into the object store.
    pub(super) fn installed(&mut self) {
        self.content = Content::Complete;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial_for_reads() -> Lifecycle {
        Lifecycle::added(false, false, false)
    }

    #[test]
    fn added_torrents_start_from_what_is_here() {
        let object = Lifecycle::added(true, false, false);
        assert!(object.is_complete());
        assert_eq!(object, Lifecycle::added(true, true, false));
        let reads = partial_for_reads();
        assert_eq!(reads.content, Content::Partial(Window::Reads));
        let whole = Lifecycle::added(false, true, false);
        assert_eq!(whole.content, Content::Partial(Window::WholeFile));
        for l in [object, reads, whole] {
            assert_eq!(l.background, Background::Lazy);
            assert!(!l.busy());
        }
        // Added again in place of a followed one: still followed.
        let again = Lifecycle::added(false, true, true);
        assert!(again.followed());
        assert!(!again.busy());
    }

    #[test]
    fn a_whole_file_use_needs_the_whole_window_or_complete_content() {
        let mut reads = partial_for_reads();
        assert!(reads.suits(false));
        assert!(!reads.suits(true));
        assert!(Lifecycle::added(false, true, false).suits(true));
        reads.installed();
        assert!(reads.suits(true), "complete content suits any use");
    }

    #[test]
    fn a_sequential_reader_is_followed_once_and_only_on_partial_content() {
        let mut l = partial_for_reads();
        assert!(l.sequential_reader());
        assert_eq!(l.background, Background::Follower);
        assert!(!l.sequential_reader(), "followed already");
        assert!(!l.busy(), "a follower alone does not keep it live");
        l.follower_stopped();
        assert_eq!(l.background, Background::Lazy);
        assert!(l.sequential_reader(), "followed again once stopped");

        let mut fetched = partial_for_reads();
        assert!(fetched.fetch_started());
        assert!(
            !fetched.sequential_reader(),
            "a fetch takes the whole file already"
        );
        assert_eq!(fetched.background, Background::Fetch);

        let mut complete = Lifecycle::added(true, false, false);
        assert!(!complete.sequential_reader());
        assert_eq!(complete.background, Background::Lazy);
    }

    #[test]
    fn a_fetch_may_join_a_follower_and_each_leaves_the_other() {
        let mut l = partial_for_reads();
        assert!(l.sequential_reader());
        assert!(l.fetch_started());
        assert_eq!(l.background, Background::FetchAndFollower);
        assert!(l.busy());
        // The follower stops: it sees the fetch, the fetch goes on.
        l.follower_stopped();
        assert_eq!(l.background, Background::Fetch);
        assert!(l.fetching() && l.busy());
        l.fetch_ended();
        assert_eq!(l.background, Background::Lazy);
        assert!(!l.busy());

        // The other order: the follower is kept when the fetch ends.
        assert!(l.sequential_reader());
        assert!(l.fetch_started());
        l.fetch_ended();
        assert_eq!(l.background, Background::Follower);

        // A follower that takes over a torrent being fetched.
        let mut f = partial_for_reads();
        assert!(f.fetch_started());
        f.follower_attached();
        assert_eq!(f.background, Background::FetchAndFollower);
        f.follower_attached();
        assert_eq!(f.background, Background::FetchAndFollower);
    }

    #[test]
    fn fetches_run_only_on_partial_content_and_may_outlive_its_completion() {
        let mut complete = Lifecycle::added(true, true, false);
        assert!(!complete.fetch_started());
        assert!(!complete.busy());

        let mut l = Lifecycle::added(false, true, false);
        assert!(l.fetch_started());
        l.installed();
        assert!(l.is_complete());
        assert!(l.busy(), "busy until the fetch returns");
        l.fetch_ended();
        assert!(!l.busy());
        assert!(l.is_complete(), "complete stays complete");
    }

    #[test]
    fn one_install_is_queued_at_a_time_and_it_outlives_the_completion_it_makes() {
        let mut l = partial_for_reads();
        assert!(l.install_queued());
        assert!(l.busy());
        assert!(!l.install_queued(), "queued already");
        l.installed();
        assert!(l.busy(), "busy until its task ends");
        assert!(!l.install_queued(), "complete");
        l.install_ended();
        assert!(!l.busy());
        assert!(
            !l.install_queued(),
            "complete content is not installed again"
        );

        // One that failed can be queued again.
        let mut failed = partial_for_reads();
        assert!(failed.install_queued());
        failed.install_ended();
        assert!(failed.install_queued());
    }

    #[test]
    fn completion_keeps_what_is_under_way() {
        let mut l = partial_for_reads();
        assert!(l.sequential_reader());
        assert!(l.install_queued());
        l.installed();
        assert!(l.followed(), "the follower ends by itself");
        assert_eq!(l.install, Install::Queued);
        l.follower_stopped();
        l.install_ended();
        assert_eq!(l, {
            let mut done = partial_for_reads();
            done.installed();
            done
        });
    }
}
