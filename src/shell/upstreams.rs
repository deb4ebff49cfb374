//! The addresses of each upstream instance, looked up by the instance's
//! name. The core numbers instances and keeps an instance's number across a
//! reload that keeps its name, so the shell never goes by position in the
//! configured list: after every change of the list it asks the core which
//! number each name has now.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::core::{InstanceId, InstanceStats};

/// Each instance's resolved addresses, by its number.
#[derive(Default)]
pub(super) struct Upstreams {
    /// Index `number - 1`; `None` for a number the core does not use.
    by_instance: Vec<Option<Arc<[SocketAddr]>>>,
}

impl Upstreams {
    /// The addresses the core's instance `instance` is reached at.
    pub(super) fn addrs(&self, instance: InstanceId) -> Option<Arc<[SocketAddr]>> {
        let index = usize::try_from(instance.0).ok()?.checked_sub(1)?;
        self.by_instance.get(index)?.clone()
    }

    /// Addresses known over every instance, for the reload's log line.
    pub(super) fn address_count(&self) -> usize {
        self.by_instance
            .iter()
            .flatten()
            .map(|addrs| addrs.len())
            .sum()
    }

    /// Puts `resolved` (each configured name with what it resolved to) in
    /// force for the core's `instances`. An instance whose name is no longer
    /// configured (a reload removed it; it drains) keeps the addresses it
    /// had, for a client it still takes on its way out. A client already
    /// connecting keeps walking the list it started on.
    pub(super) fn update(
        &mut self,
        resolved: impl IntoIterator<Item = (String, Vec<SocketAddr>)>,
        instances: &[InstanceStats],
    ) {
        let mut by_name: HashMap<String, Arc<[SocketAddr]>> = resolved
            .into_iter()
            .map(|(name, addrs)| (name, addrs.into()))
            .collect();
        let mut by_instance = Vec::new();
        for instance in instances {
            let Some(index) = usize::try_from(instance.id)
                .ok()
                .and_then(|id| id.checked_sub(1))
            else {
                continue;
            };
            let addrs = by_name
                .remove(&instance.upstream)
                .or_else(|| self.addrs(InstanceId(instance.id)));
            if by_instance.len() <= index {
                by_instance.resize(index + 1, None);
            }
            by_instance[index] = addrs;
        }
        self.by_instance = by_instance;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: u32, upstream: &str) -> InstanceStats {
        InstanceStats {
            id,
            upstream: upstream.to_string(),
            ..InstanceStats::default()
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn ports(upstreams: &Upstreams, id: u32) -> Option<Vec<u16>> {
        upstreams
            .addrs(InstanceId(id))
            .map(|addrs| addrs.iter().map(SocketAddr::port).collect())
    }

    #[test]
    fn addresses_follow_the_name_not_the_position() {
        let mut upstreams = Upstreams::default();
        upstreams.update(
            [
                ("a:1".to_string(), vec![addr(1)]),
                ("b:2".to_string(), vec![addr(2)]),
            ],
            &[instance(1, "a:1"), instance(2, "b:2")],
        );
        assert_eq!(ports(&upstreams, 1), Some(vec![1]));
        assert_eq!(ports(&upstreams, 2), Some(vec![2]));
        assert_eq!(ports(&upstreams, 0), None);
        assert_eq!(ports(&upstreams, 3), None);
        // A reload drops a:1 and adds c:3 before b:2; the core keeps b:2 as
        // 2, gives c:3 the free number 3 while 1 drains.
        upstreams.update(
            [
                ("c:3".to_string(), vec![addr(3)]),
                ("b:2".to_string(), vec![addr(22)]),
            ],
            &[instance(1, "a:1"), instance(2, "b:2"), instance(3, "c:3")],
        );
        assert_eq!(
            ports(&upstreams, 1),
            Some(vec![1]),
            "the removed one keeps its"
        );
        assert_eq!(ports(&upstreams, 2), Some(vec![22]), "resolved anew");
        assert_eq!(ports(&upstreams, 3), Some(vec![3]));
        // Once 1 is gone its number has no addresses.
        upstreams.update(
            [
                ("c:3".to_string(), vec![addr(3)]),
                ("b:2".to_string(), vec![addr(2)]),
            ],
            &[instance(2, "b:2"), instance(3, "c:3")],
        );
        assert_eq!(ports(&upstreams, 1), None);
        assert_eq!(ports(&upstreams, 3), Some(vec![3]));
    }
}
