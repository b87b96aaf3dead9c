//! Routing for clients that watch some devices: each committed event is offered only to the
//! inboxes of the clients whose filter (device list or token scope, and event types) takes
//! it, so a client is woken and does work only for events it will send. An index by device
//! serves `device=` filters; clients that watch every device their token's globs allow are
//! grouped by those globs, and each group remembers which devices its globs match, so no
//! glob is matched per event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::{Event, Kinds};

/// Most bytes of frames an inbox may hold when a new batch reaches it: a client further
/// behind is cut off and resumes from storage. One batch always fits, however large.
pub const INBOX_MAX_BYTES: usize = 1 << 20;
/// Devices a scope group remembers the glob answer for, before it starts over.
const SEEN_MAX: usize = 65_536;

/// One routed client's queue of events, in log order.
pub struct Inbox {
    kinds: Kinds,
    /// Most events it may hold (the feed's ring capacity).
    capacity: usize,
    queue: Mutex<Queue>,
    /// Woken when the queue goes from empty to not, or overflows.
    pub(super) notify: Notify,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    bytes: usize,
    /// The last batch that checked this queue's size.
    batch: u64,
    overflowed: bool,
}

/// What draining an inbox gave.
pub(super) struct Drained {
    /// Whether the inbox overflowed (the client lagged).
    pub lagged: bool,
    /// Whether it is now empty.
    pub empty: bool,
}

impl Inbox {
    fn new(kinds: Kinds, capacity: usize) -> Inbox {
        Inbox {
            kinds,
            capacity,
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `e` unless the client does not take its kind, or has already lagged.
    fn offer(&self, e: &Event, batch: u64) {
        if !self.kinds.has(e.kind) {
            return;
        }
        let mut q = self.lock();
        if q.overflowed {
            return;
        }
        if q.batch != batch {
            q.batch = batch;
            if q.bytes > INBOX_MAX_BYTES {
                q.overflow();
                drop(q);
                self.notify.notify_one();
                return;
            }
        }
        if q.events.len() >= self.capacity {
            q.overflow();
            drop(q);
            self.notify.notify_one();
            return;
        }
        let was_empty = q.events.is_empty();
        q.bytes += e.frame.len();
        q.events.push_back(e.clone());
        drop(q);
        // A queue that was not empty has a wake-up pending already.
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Moves queued events to `out` through `take` (which gets each event and says whether
    /// to go on), oldest first.
    pub(super) fn drain(&self, mut take: impl FnMut(&Event) -> bool) -> Drained {
        let mut q = self.lock();
        if q.overflowed {
            return Drained {
                lagged: true,
                empty: true,
            };
        }
        while let Some(e) = q.events.pop_front() {
            q.bytes -= e.frame.len();
            if !take(&e) {
                break;
            }
        }
        // A burst's queue is not kept at its largest for the rest of the connection.
        if q.events.is_empty() && q.events.capacity() > 64 {
            q.events = VecDeque::new();
        }
        Drained {
            lagged: false,
            empty: q.events.is_empty(),
        }
    }

    /// Whether the inbox has overflowed since it was last cleared.
    pub(super) fn lagged(&self) -> bool {
        self.lock().overflowed
    }

    /// Empties the inbox and takes events again, for a client that resumes from storage.
    pub(super) fn clear(&self) {
        let mut q = self.lock();
        *q = Queue::default();
    }
}

impl Queue {
    fn overflow(&mut self) {
        self.overflowed = true;
        self.events = VecDeque::new();
        self.bytes = 0;
    }
}

/// Which devices a routed client watches.
#[derive(Clone)]
pub enum Watch {
    /// These devices (the token may see each).
    Devices(Arc<[Arc<str>]>),
    /// Every device the globs match.
    Scope(Arc<Vec<String>>),
}

/// Clients that watch every device a set of globs allows.
struct ScopeGroup {
    globs: Arc<Vec<String>>,
    members: Vec<Arc<Inbox>>,
    /// Whether each device seen so far matches the globs.
    seen: Mutex<HashMap<Arc<str>, bool>>,
}

impl ScopeGroup {
    fn matches(&self, device: &Arc<str>) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = seen.get(device) {
            return *m;
        }
        if seen.len() >= SEEN_MAX {
            seen.clear();
        }
        let m = self
            .globs
            .iter()
            .any(|g| crate::auth::glob_match(g, device));
        seen.insert(device.clone(), m);
        m
    }
}

#[derive(Default)]
struct Routes {
    by_device: HashMap<Arc<str>, Vec<Arc<Inbox>>>,
    scoped: Vec<ScopeGroup>,
}

/// The index from devices (and scopes) to the inboxes that take their events.
#[derive(Default)]
pub struct Router {
    routes: RwLock<Routes>,
    /// Batches routed so far: an inbox checks its size once per batch.
    batches: AtomicU64,
}

impl Router {
    /// Adds a client watching `watch`, for events of `kinds`.
    pub(super) fn add(&self, watch: &Watch, kinds: Kinds, capacity: usize) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox::new(kinds, capacity));
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        match watch {
            Watch::Devices(devices) => {
                for d in devices.iter() {
                    routes
                        .by_device
                        .entry(d.clone())
                        .or_default()
                        .push(inbox.clone());
                }
            }
            Watch::Scope(globs) => match routes.scoped.iter_mut().find(|g| g.globs == *globs) {
                Some(group) => group.members.push(inbox.clone()),
                None => routes.scoped.push(ScopeGroup {
                    globs: globs.clone(),
                    members: vec![inbox.clone()],
                    seen: Mutex::new(HashMap::new()),
                }),
            },
        }
        inbox
    }

    /// Removes a client added with `watch`.
    pub(super) fn remove(&self, watch: &Watch, inbox: &Arc<Inbox>) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let forget = |list: &mut Vec<Arc<Inbox>>| {
            if let Some(i) = list.iter().position(|x| Arc::ptr_eq(x, inbox)) {
                list.swap_remove(i);
            }
        };
        match watch {
            Watch::Devices(devices) => {
                for d in devices.iter() {
                    if let Some(list) = routes.by_device.get_mut(d) {
                        forget(list);
                        if list.is_empty() {
                            routes.by_device.remove(d);
                        }
                    }
                }
            }
            Watch::Scope(globs) => {
                if let Some(i) = routes.scoped.iter().position(|g| g.globs == *globs) {
                    forget(&mut routes.scoped[i].members);
                    if routes.scoped[i].members.is_empty() {
                        routes.scoped.swap_remove(i);
                    }
                }
            }
        }
    }

    /// Offers each event to the inboxes that take it, in order.
    pub(super) fn route(&self, events: &[Event]) {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        if routes.by_device.is_empty() && routes.scoped.is_empty() {
            return;
        }
        let batch = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        for e in events {
            if let Some(list) = routes.by_device.get(&e.device) {
                for inbox in list {
                    inbox.offer(e, batch);
                }
            }
            for group in &routes.scoped {
                if group.matches(&e.device) {
                    for inbox in &group.members {
                        inbox.offer(e, batch);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
impl Router {
    /// Whether no client is routed to.
    pub(super) fn is_empty(&self) -> bool {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.by_device.is_empty() && routes.scoped.is_empty()
    }
}

/// The distinct devices of a filter, in the order given.
pub fn distinct(devices: &[String]) -> Arc<[Arc<str>]> {
    let mut seen = HashSet::new();
    devices
        .iter()
        .filter(|d| seen.insert(d.as_str()))
        .map(|d| Arc::<str>::from(d.as_str()))
        .collect()
}
