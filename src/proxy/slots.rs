//! The `--max-connections` cap, without letting unauthenticated clients lock a session.
//!
//! Every accepted connection takes a slot. A connection is *pending* until it passes the
//! token check of a websocket upgrade (reading its request head, being served static
//! files); after that it is an authenticated console session. When every slot is taken,
//! a new connection evicts the oldest pending one instead of being refused: otherwise
//! sixteen silent sockets from anyone who can reach the port would keep the console's
//! real user out. Only when every slot holds an authenticated session is the new
//! connection refused (503). Authenticated sessions are never evicted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The slots of one proxy.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Connections that hold a slot, evicted ones included until they end.
    open: usize,
    /// Pending connections by connection number (oldest first), with their eviction signal.
    pending: BTreeMap<u64, Arc<Notify>>,
}

/// Why a connection got no slot.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    /// Every slot holds an authenticated session.
    Authenticated,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max: max.max(1),
            inner: Mutex::default(),
        })
    }

    /// A slot for connection `n`, evicting the oldest pending connection if all are taken.
    /// Evicted connections give their slot back as soon as they notice, which is at once;
    /// until then at most `2 * max` connections are open.
    pub fn admit(self: &Arc<Self>, n: u64) -> Result<Slot, Full> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.open >= self.max {
            if inner.open >= 2 * self.max {
                return Err(Full::Authenticated);
            }
            let Some((_, oldest)) = inner.pending.pop_first() else {
                return Err(Full::Authenticated);
            };
            oldest.notify_one();
        }
        inner.open += 1;
        let evict = Arc::new(Notify::new());
        inner.pending.insert(n, evict.clone());
        Ok(Slot {
            slots: self.clone(),
            n,
            evict,
        })
    }

    /// Connections holding a slot now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.open)
    }
}

/// One connection's slot; given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    n: u64,
    evict: Arc<Notify>,
}

impl Slot {
    /// Resolves when a newer connection evicted this one (only while it is pending).
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// Marks the connection authenticated, so it can no longer be evicted. `false` if it
    /// was evicted already (it must then end).
    pub fn authenticated(&self) -> bool {
        let mut inner = self.slots.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pending.remove(&self.n).is_some()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.open = inner.open.saturating_sub(1);
        inner.pending.remove(&self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_oldest_pending_connection_makes_room_and_authenticated_ones_stay() {
        let slots = Slots::new(2);
        let a = slots.admit(1).expect("slot");
        let b = slots.admit(2).expect("slot");
        assert!(b.authenticated());
        // Full: the new connection evicts `a`, the only pending one.
        let c = slots.admit(3).expect("slot by eviction");
        tokio::time::timeout(Duration::from_secs(1), a.evicted())
            .await
            .expect("a was evicted");
        assert!(
            !a.authenticated(),
            "an evicted connection cannot authenticate"
        );
        drop(a);
        assert_eq!(slots.open(), 2);
        assert!(c.authenticated());
        // Every slot authenticated: refused.
        assert_eq!(slots.admit(4).err(), Some(Full::Authenticated));
        drop(b);
        let d = slots.admit(5).expect("a slot freed");
        assert_eq!(slots.open(), 2);
        drop((c, d));
        assert_eq!(slots.open(), 0);
    }
}
