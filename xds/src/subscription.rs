//! What one stream asked for, per type: the resource-name set both protocol variants share.
//!
//! The rules, from the xDS protocol document ("How the client specifies what resources to
//! return"):
//! - a first request with no names is a *legacy wildcard* subscription; it stays wildcard
//!   while the client keeps sending empty lists;
//! - `*` subscribes to the wildcard explicitly, beside any named resources;
//! - once a client has named resources (SotW) or subscribed names (Delta), an empty list no
//!   longer means wildcard: in SotW it unsubscribes everything.

use std::collections::BTreeSet;

use crate::types::{ResourceName, WILDCARD};

/// The resources one stream is subscribed to within one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    wildcard: bool,
    /// Whether `wildcard` came from an empty first request rather than an explicit `*`.
    legacy_wildcard: bool,
    names: BTreeSet<ResourceName>,
}

impl Subscription {
    /// A subscription to every resource of the type.
    pub fn wildcard() -> Self {
        Self {
            wildcard: true,
            legacy_wildcard: false,
            names: BTreeSet::new(),
        }
    }

    /// A subscription to the named resources only (a `*` among them adds the wildcard).
    pub fn named<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut sub = Self::default();
        for name in names {
            sub.add(name.as_ref());
        }
        sub
    }

    /// The subscription after a State-of-the-World request that lists `names`.
    ///
    /// `first` is true for the first request of this type on the stream.
    pub fn sotw_next(&self, names: &[String], first: bool) -> Self {
        if names.is_empty() {
            if first || self.legacy_wildcard {
                return Self {
                    wildcard: true,
                    legacy_wildcard: true,
                    names: BTreeSet::new(),
                };
            }
            return Self::default();
        }
        Self::named(names)
    }

    /// Whether a later State-of-the-World request listing `names` leaves this subscription
    /// as it is, decided without building the next one: the names are this subscription's,
    /// in its order, and it has no wildcard. An ACK usually repeats its names that way, and
    /// a client that lists them in another order takes [`sotw_next`](Self::sotw_next).
    pub fn sotw_repeats(&self, names: &[String]) -> bool {
        !self.wildcard
            && names.len() == self.names.len()
            && names
                .iter()
                .zip(&self.names)
                .all(|(name, held)| name == held.as_str())
    }

    /// Applies a Delta request's subscribe and unsubscribe lists.
    ///
    /// `first` is true for the first request of this type on the stream: an empty subscribe
    /// list then means the legacy wildcard.
    pub fn apply_delta(&mut self, subscribe: &[String], unsubscribe: &[String], first: bool) {
        if first && subscribe.is_empty() {
            self.wildcard = true;
            self.legacy_wildcard = true;
        } else if self.legacy_wildcard && !subscribe.is_empty() {
            // Naming resources ends the legacy wildcard; `*` keeps it explicitly.
            self.wildcard = false;
            self.legacy_wildcard = false;
        }
        for name in subscribe {
            self.add(name);
        }
        for name in unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
                self.legacy_wildcard = false;
            } else {
                self.names.remove(name.as_str());
            }
        }
    }

    fn add(&mut self, name: &str) {
        if name == WILDCARD {
            self.wildcard = true;
            self.legacy_wildcard = false;
        } else {
            self.names.insert(ResourceName::new(name));
        }
    }

    /// Whether a resource of this name is wanted.
    pub fn matches(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Whether every resource of the type is wanted.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The explicitly named resources.
    pub fn names(&self) -> &BTreeSet<ResourceName> {
        &self.names
    }

    /// Whether nothing is wanted.
    pub fn is_empty(&self) -> bool {
        !self.wildcard && self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn sotw_legacy_wildcard_lasts_until_names() {
        let first = Subscription::default().sotw_next(&[], true);
        assert!(first.is_wildcard());
        let again = first.sotw_next(&[], false);
        assert!(again.is_wildcard(), "empty list keeps the legacy wildcard");
        let named = again.sotw_next(&s(&["a"]), false);
        assert!(!named.is_wildcard());
        assert!(named.matches("a") && !named.matches("b"));
        let emptied = named.sotw_next(&[], false);
        assert!(
            emptied.is_empty(),
            "after names, an empty list unsubscribes all"
        );
    }

    #[test]
    fn sotw_explicit_wildcard_with_names() {
        let sub = Subscription::default().sotw_next(&s(&["*", "a"]), true);
        assert!(sub.is_wildcard());
        assert!(sub.names().contains("a"));
        assert!(sub.sotw_next(&[], false).is_empty());
    }

    proptest::proptest! {
        /// When a request repeats a subscription, the subscription it would build is that one.
        #[test]
        fn a_repeated_sotw_request_builds_the_same_subscription(
            before in proptest::collection::vec("[ab*]{1,2}", 0..4),
            first_empty in proptest::bool::ANY,
            names in proptest::collection::vec("[ab*]{1,2}", 0..4),
        ) {
            let first: Vec<String> = if first_empty { Vec::new() } else { before };
            let sub = Subscription::default().sotw_next(&first, true);
            if sub.sotw_repeats(&names) {
                proptest::prop_assert_eq!(sub.sotw_next(&names, false), sub.clone());
            }
            let held: Vec<String> = sub.names().iter().map(|n| n.to_string()).collect();
            proptest::prop_assert_eq!(sub.sotw_repeats(&held), !sub.is_wildcard());
        }

        /// A later Delta request with nothing to subscribe or unsubscribe changes nothing, so
        /// an ACK can skip applying it.
        #[test]
        fn an_empty_later_delta_request_changes_nothing(
            subscribe in proptest::collection::vec("[ab*]{1,2}", 0..4),
            unsubscribe in proptest::collection::vec("[ab*]{1,2}", 0..4),
            first in proptest::bool::ANY,
        ) {
            let mut sub = Subscription::default();
            sub.apply_delta(&subscribe, &unsubscribe, first);
            let before = sub.clone();
            sub.apply_delta(&[], &[], false);
            proptest::prop_assert_eq!(sub, before);
        }
    }

    #[test]
    fn delta_rules() {
        let mut sub = Subscription::default();
        sub.apply_delta(&[], &[], true);
        assert!(sub.is_wildcard());
        sub.apply_delta(&s(&["a"]), &[], false);
        assert!(
            !sub.is_wildcard(),
            "naming a resource ends the legacy wildcard"
        );
        sub.apply_delta(&s(&["*"]), &[], false);
        assert!(sub.is_wildcard() && sub.matches("zzz"));
        sub.apply_delta(&s(&["b"]), &[], false);
        assert!(sub.is_wildcard(), "explicit wildcard survives more names");
        sub.apply_delta(&[], &s(&["*", "a"]), false);
        assert!(!sub.is_wildcard() && !sub.matches("a") && sub.matches("b"));
        let mut named_first = Subscription::default();
        named_first.apply_delta(&s(&["x"]), &[], true);
        assert!(!named_first.is_wildcard());
    }
}
