//! Which streams want to hear of which resources, so that a change wakes only them.
//!
//! A stream registers, per partition and type URL, either every resource ([`Wanted::All`],
//! a wildcard subscription) or named ones. [`CacheWriter::apply`](crate::CacheWriter::apply)
//! publishes its snapshot first and then raises the signal of every stream that wants one of
//! the resources the batch changed; a relist of a whole type raises every stream of that type
//! and partition. A raised signal stays raised until the stream looks, so any number of
//! changes coalesce into one wake-up, as they do for the snapshot itself.
//!
//! Without this, every change woke every stream of the server, each to find that nothing it
//! holds had changed: with 10,000 streams, a publish that none of them subscribes to cost the
//! server about 40 % of a push to all of them (docs/benchmarks.md).

use std::{
    collections::HashMap,
    future::poll_fn,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures::task::AtomicWaker;
use parking_lot::Mutex;

use crate::types::{Partition, ResourceName, TypeUrl};

/// What a stream wants of one type in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Every resource: a wildcard subscription.
    All,
    /// The resource of this name, whether it exists yet or not.
    Named(ResourceName),
}

impl Wanted {
    fn name(&self) -> Option<&ResourceName> {
        match self {
            Wanted::All => None,
            Wanted::Named(name) => Some(name),
        }
    }
}

/// One registration: a partition, a type URL and what of it.
pub type Key = (Partition, TypeUrl, Wanted);

/// What one applied update changed.
#[derive(Debug, Clone)]
pub(crate) enum Changed {
    /// One resource, put or deleted.
    Resource(Partition, TypeUrl, ResourceName),
    /// Any resources of a type in a partition (a relist).
    Type(Partition, TypeUrl),
}

/// A stream's wake-up: raised by the writer, lowered by the stream when it looks.
#[derive(Debug, Default)]
struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.raised.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A raise between the first look and the registration woke no one: look again.
        if self.raised.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

type Listeners = HashMap<u64, Arc<Signal>>;

/// The streams that want resources of one type in one partition.
#[derive(Debug, Default)]
struct TypeListeners {
    all: Listeners,
    named: HashMap<ResourceName, Listeners>,
}

impl TypeListeners {
    fn is_empty(&self) -> bool {
        self.all.is_empty() && self.named.is_empty()
    }
}

/// Every registration of every stream, shared by the cache's readers and its writer.
#[derive(Debug, Default)]
pub(crate) struct Index {
    next_id: u64,
    by_type: HashMap<(Partition, TypeUrl), TypeListeners>,
    /// Every live interest's signal, whatever it wants: what [`Index::raise_every`] wakes.
    every: Listeners,
}

impl Index {
    fn add(&mut self, id: u64, (partition, type_url, wanted): &Key, signal: &Arc<Signal>) {
        let listeners = self
            .by_type
            .entry((partition.clone(), type_url.clone()))
            .or_default();
        let set = match wanted {
            Wanted::All => &mut listeners.all,
            Wanted::Named(name) => listeners.named.entry(name.clone()).or_default(),
        };
        set.insert(id, signal.clone());
    }

    fn remove(&mut self, id: u64, (partition, type_url, wanted): &Key) {
        let type_key = (partition.clone(), type_url.clone());
        let Some(listeners) = self.by_type.get_mut(&type_key) else {
            return;
        };
        match wanted {
            Wanted::All => {
                listeners.all.remove(&id);
            }
            Wanted::Named(name) => {
                if let Some(set) = listeners.named.get_mut(name) {
                    set.remove(&id);
                    if set.is_empty() {
                        listeners.named.remove(name);
                    }
                }
            }
        }
        if listeners.is_empty() {
            self.by_type.remove(&type_key);
        }
    }

    /// Raises the signal of every stream that wants something `changed` holds.
    pub(crate) fn notify(&self, changed: &[Changed]) {
        for change in changed {
            let (partition, type_url, name) = match change {
                Changed::Resource(p, t, name) => (p, t, Some(name)),
                Changed::Type(p, t) => (p, t, None),
            };
            let Some(listeners) = self.by_type.get(&(partition.clone(), type_url.clone())) else {
                continue;
            };
            listeners.all.values().for_each(|s| s.raise());
            match name {
                Some(name) => {
                    if let Some(set) = listeners.named.get(name) {
                        set.values().for_each(|s| s.raise());
                    }
                }
                None => listeners
                    .named
                    .values()
                    .flat_map(|set| set.values())
                    .for_each(|s| s.raise()),
            }
        }
    }

    /// Raises the signal of every live interest, registered for anything or not: a server
    /// closing its streams wakes each of them this way, so a stream's wait needs no second
    /// source of wake-ups (and no shared lock to poll) for the server's shutdown.
    pub(crate) fn raise_every(&self) {
        self.every.values().for_each(|s| s.raise());
    }

    /// How many interests are alive.
    #[cfg(test)]
    pub(crate) fn interests(&self) -> usize {
        self.every.len()
    }

    /// How many (partition, type URL) pairs anyone listens to.
    #[cfg(test)]
    pub(crate) fn types(&self) -> usize {
        self.by_type.len()
    }
}

/// One stream's registration for the resources it wants; dropping it unregisters.
///
/// A new interest wants nothing: [`Interest::set`] says what, and may be called again
/// whenever the stream's subscriptions change.
#[derive(Debug)]
pub struct Interest {
    id: u64,
    signal: Arc<Signal>,
    index: Arc<Mutex<Index>>,
    registered: Vec<Key>,
}

impl Interest {
    pub(crate) fn new(index: Arc<Mutex<Index>>) -> Self {
        let signal = Arc::<Signal>::default();
        let id = {
            let mut index = index.lock();
            index.next_id += 1;
            let id = index.next_id;
            index.every.insert(id, signal.clone());
            id
        };
        Self {
            id,
            signal,
            index,
            registered: Vec::new(),
        }
    }

    /// Whether `wanted` is what is registered, in the same order.
    pub fn is<'a>(
        &self,
        wanted: impl IntoIterator<Item = (&'a Partition, &'a TypeUrl, Option<&'a ResourceName>)>,
    ) -> bool {
        let mut registered = self.registered.iter();
        let mut wanted = wanted.into_iter();
        loop {
            match (registered.next(), wanted.next()) {
                (None, None) => return true,
                (Some((p, t, w)), Some((wp, wt, wn))) if p == wp && t == wt && w.name() == wn => {}
                _ => return false,
            }
        }
    }

    /// Registers what `wanted()` lists, borrowed from the stream's subscriptions, unless it is
    /// registered already: the usual request (an ACK) changes nothing and copies nothing.
    pub fn want<'a, I>(&mut self, wanted: impl Fn() -> I)
    where
        I: Iterator<Item = (&'a Partition, &'a TypeUrl, Option<&'a ResourceName>)>,
    {
        if self.is(wanted()) {
            return;
        }
        let keys = wanted()
            .map(|(partition, type_url, name)| {
                let wanted = name.map_or(Wanted::All, |name| Wanted::Named(name.clone()));
                (partition.clone(), type_url.clone(), wanted)
            })
            .collect();
        self.set(keys);
    }

    /// Replaces what this stream wants. The signal is raised once afterwards, so a change
    /// applied after the stream last looked at the cache and before this registration is
    /// not missed.
    pub fn set(&mut self, wanted: Vec<Key>) {
        if wanted == self.registered {
            return;
        }
        {
            let mut index = self.index.lock();
            for key in &self.registered {
                index.remove(self.id, key);
            }
            for key in &wanted {
                index.add(self.id, key, &self.signal);
            }
        }
        self.registered = wanted;
        self.signal.raise();
    }

    /// Waits until a wanted resource may have changed; the caller then reads the cache's
    /// current snapshot, which holds the change. Cancel-safe: a wake-up is consumed only when
    /// this returns.
    pub async fn changed(&mut self) {
        poll_fn(|cx| self.signal.poll(cx)).await;
    }

    /// Whether the stream was woken since it last looked, lowering the signal.
    #[cfg(test)]
    pub(crate) fn woken(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.signal.poll(&mut cx).is_ready()
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut index = self.index.lock();
        for key in &self.registered {
            index.remove(self.id, key);
        }
        index.every.remove(&self.id);
    }
}
