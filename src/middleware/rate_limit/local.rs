//! The local backend: one theoretical arrival time (TAT) per key in a sharded hash table
//! of at most `max_keys` entries.
//!
//! A request hashes its borrowed key once (SipHash with a random seed: keys come from
//! clients), that hash picks the shard and the slot, and only a key seen for the first time
//! is copied into the table. Each shard is a short mutex-guarded critical section (a lookup
//! and a store), so workers on different shards never meet.
//!
//! The bound: when a new key finds its shard full, entries whose TAT is in the past are
//! dropped first (their bucket is full, which is what an absent key means, so nothing is
//! lost); if every key is still active, the one whose bucket is closest to full goes (it
//! regains at most what it was missing). New clients are never refused for lack of room,
//! and an attacker rotating addresses only churns the table, never grows it.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use hashbrown::HashTable;

use super::{Gcra, KeyRef, Outcome};

/// An owned key, as stored.
#[derive(Debug)]
enum Key {
    Ip(IpAddr),
    Text(Box<[u8]>),
    Shared,
}

impl Key {
    fn as_ref(&self) -> KeyRef<'_> {
        match self {
            Key::Ip(ip) => KeyRef::Ip(*ip),
            Key::Text(t) => KeyRef::Text(t),
            Key::Shared => KeyRef::Shared,
        }
    }

    fn from_ref(key: KeyRef<'_>) -> Key {
        match key {
            KeyRef::Ip(ip) => Key::Ip(ip),
            KeyRef::Text(t) => Key::Text(t.into()),
            KeyRef::Shared => Key::Shared,
        }
    }
}

/// A cache line of its own per shard, so neighbouring locks do not share one.
#[repr(align(128))]
struct Shard(Mutex<HashTable<(Key, u64)>>);

/// Every key's TAT, for one limiter; shared across reloads through the registry in `mod.rs`.
pub(super) struct Store {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Entries one shard may hold: `max_keys / shards`, so the total stays within `max_keys`.
    per_shard: usize,
}

impl Store {
    pub(super) fn new(max_keys: usize) -> Store {
        // Up to 64 shards, each big enough (256+) that hash imbalance wastes little room.
        let shards = (max_keys / 256).next_power_of_two().min(64);
        Store {
            shards: (0..shards)
                .map(|_| Shard(Mutex::new(HashTable::new())))
                .collect(),
            hasher: RandomState::new(),
            per_shard: max_keys / shards,
        }
    }

    /// Decides one request for `key` at `now` (microseconds) and records it.
    pub(super) fn decide(&self, key: KeyRef<'_>, now: u64, gcra: &Gcra) -> Outcome {
        let hash = self.hasher.hash_one(key);
        // Bits the table uses least (it takes the low ones for slots, the top 7 for tags).
        let shard = &self.shards[(hash >> 40) as usize & (self.shards.len() - 1)];
        let mut table = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, tat)) = table.find_mut(hash, |(k, _)| k.as_ref() == key) {
            let out = gcra.decide(*tat, now);
            *tat = out.tat;
            return out;
        }
        let out = gcra.decide(0, now);
        if table.len() >= self.per_shard {
            make_room(&mut table, self.per_shard, now);
        }
        table.insert_unique(hash, (Key::from_ref(key), out.tat), |(k, _)| {
            self.hasher.hash_one(k.as_ref())
        });
        out
    }

    /// Keys held now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Frees at least one entry of a full shard: every idle key, else the one closest to full.
fn make_room(table: &mut HashTable<(Key, u64)>, per_shard: usize, now: u64) {
    table.retain(|(_, tat)| *tat > now);
    if table.len() < per_shard {
        return;
    }
    let oldest = table.iter().map(|(_, tat)| *tat).min().unwrap_or(0);
    let mut evicted = false;
    table.retain(|(_, tat)| {
        let keep = evicted || *tat != oldest;
        evicted |= !keep;
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcra() -> Gcra {
        // 1 request per second, burst 2.
        Gcra {
            interval: 1_000_000,
            tolerance: 2_000_000,
        }
    }

    #[test]
    fn keys_are_kept_apart_and_missing_is_its_own_bucket() {
        let store = Store::new(1000);
        let g = gcra();
        for key in [
            KeyRef::Ip([10, 0, 0, 1].into()),
            KeyRef::Text(b"a"),
            KeyRef::Text(b""),
            KeyRef::Shared,
        ] {
            assert!(store.decide(key, 0, &g).allowed);
            assert!(store.decide(key, 0, &g).allowed);
            assert!(!store.decide(key, 0, &g).allowed, "{key:?}");
        }
        assert!(
            store
                .decide(KeyRef::Ip([10, 0, 0, 2].into()), 0, &g)
                .allowed
        );
        assert_eq!(store.len(), 5);
    }

    #[test]
    fn never_holds_more_than_max_keys_and_evicts_idle_keys_first() {
        let g = gcra();
        let store = Store::new(1000);
        for i in 0..20_000u32 {
            store.decide(KeyRef::Text(&i.to_be_bytes()), u64::from(i), &g);
            assert!(store.len() <= 1000);
        }
        // Still exact for a key it holds.
        let key = KeyRef::Text(b"late");
        let now = 20_000;
        assert!(store.decide(key, now, &g).allowed);
        assert!(store.decide(key, now, &g).allowed);
        assert!(!store.decide(key, now, &g).allowed);

        // Idle keys go before active ones: once the early keys are idle, a full store of
        // them makes room without touching the active one.
        let small = Store::new(2);
        let busy = KeyRef::Text(b"busy");
        small.decide(busy, 0, &g);
        small.decide(busy, 0, &g);
        small.decide(KeyRef::Text(b"idle"), 0, &g);
        small.decide(KeyRef::Text(b"new"), 1_000_000, &g);
        // A forgotten key would have a full bucket (remaining 1) again.
        assert_eq!(
            small.decide(busy, 1_000_000, &g).remaining,
            0,
            "busy was kept"
        );
        assert_eq!(small.len(), 2);
    }
}
