//! L2 on a Redis Cluster: a small router over one [`Link`] per master. The map comes from
//! `CLUSTER NODES` of the first seed that answers; every command goes to the master of its
//! key's slot, all masters' shares of a pipeline are sent before any reply is read (one round
//! trip however many masters), and a redirect (`MOVED`, `ASK`), `TRYAGAIN` or `CLUSTERDOWN` is
//! never followed: the call is a miss and the map is built again on the next one. Reads are
//! trusted only while the map's fingerprint is the one the L2 epoch carries (docs/design.md,
//! "Redis Cluster"), so a read can only ever come from a master of the trusted map.

use super::link::{connect_at, Link};
use super::slots::{self, Topology, NO_OWNER};
use super::{L2Error, ROUND_TRIPS};

pub(super) struct Router {
    topology: Topology,
    links: Vec<Link>,
    pub fingerprint: u32,
}

/// The key a command acts on, where the router must send it; None for TIME, PUBLISH, INFO...
fn key_of(cmd: &redis::Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(b) => Some(b),
        redis::Arg::Cursor => None,
    });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVAL") || name.eq_ignore_ascii_case(b"EVALSHA") {
        // EVAL script numkeys key...: its first key (all of a call's keys share a slot).
        args.nth(2)
    } else if [&b"GET"[..], b"SET", b"PTTL", b"DEL", b"EXISTS"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
    {
        args.next()
    } else {
        None
    }
}

/// Where each command of a pipeline goes, given its key's master (None: keyless): a keyless
/// command goes with the keyed one before it, or with the first keyed one if none is.
fn routes(owners: &[Option<u16>]) -> Vec<u16> {
    let mut route = owners.iter().find_map(|o| *o).unwrap_or(0);
    owners
        .iter()
        .map(|owner| {
            if let Some(owner) = owner {
                route = *owner;
            }
            route
        })
        .collect()
}

fn cluster_error(detail: String) -> L2Error {
    L2Error::Redis(redis::RedisError::from((
        redis::ErrorKind::ClusterDown,
        "the Redis Cluster's map is not usable",
        detail,
    )))
}

impl Router {
    /// Reads the map from the first seed that answers and connects to every master serving a
    /// slot (its `run_id` goes into the fingerprint). A master that does not answer fails the
    /// whole router: its slots would be misses, and the map cannot be fingerprinted without it.
    pub fn connect(seeds: &[String]) -> Result<Router, L2Error> {
        let mut last = None;
        for seed in seeds {
            let topology = match connect_at(seed, None).and_then(|(mut link, _)| {
                let text: String = link.call(redis::cmd("CLUSTER").arg("NODES"))?;
                slots::parse_nodes(&text).map_err(cluster_error)
            }) {
                Ok(t) => t,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let mut links = Vec::with_capacity(topology.masters.len());
            let mut run_ids = Vec::with_capacity(topology.masters.len());
            for m in &topology.masters {
                let (link, run_id) = connect_at(seed, Some((&m.host, m.port)))?;
                links.push(link);
                run_ids.push(run_id);
            }
            let fingerprint = if crate::gucs::test_cluster_any_map() {
                0
            } else {
                slots::fingerprint(&topology, &run_ids)
            };
            return Ok(Router {
                fingerprint,
                topology,
                links,
            });
        }
        Err(last.unwrap_or_else(|| L2Error::BadUrl("no seed node in twotier.redis_url".into())))
    }

    fn owner(&self, cmd: &redis::Cmd) -> Option<u16> {
        key_of(cmd).map(|k| self.topology.owner[slots::slot_of(k) as usize])
    }

    /// Sends every master its share of `cmds`, then reads each share's replies: one round
    /// trip. A keyless command goes with the keyed one before it (the first keyed one's
    /// master if none is before it): a read's TIME is then its own master's clock, the clock
    /// its fill will be judged by. A server error is returned after every reply has been
    /// read, so that the streams stay usable.
    pub fn exchange(&mut self, cmds: &[redis::Cmd]) -> redis::RedisResult<Vec<redis::Value>> {
        ROUND_TRIPS.with(|n| n.set(n.get() + 1));
        let owners: Vec<Option<u16>> = cmds.iter().map(|c| self.owner(c)).collect();
        let mut shares: Vec<Vec<usize>> = vec![Vec::new(); self.links.len()];
        for (i, owner) in routes(&owners).into_iter().enumerate() {
            if owner == NO_OWNER {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::ClusterDown,
                    "no master serves the key's slot",
                )));
            }
            shares[owner as usize].push(i);
        }
        for (m, share) in shares.iter().enumerate() {
            if !share.is_empty() {
                self.links[m].send(share.iter().map(|&i| &cmds[i]))?;
            }
        }
        let mut out = vec![redis::Value::Nil; cmds.len()];
        let mut first_error = None;
        // One read timeout for the whole exchange, however many masters it waits on.
        let deadline = std::time::Instant::now() + crate::gucs::read_timeout();
        for (m, share) in shares.iter().enumerate() {
            if share.is_empty() {
                continue;
            }
            let (replies, error) = self.links[m].receive_all_until(share.len(), deadline);
            for (&i, v) in share.iter().zip(replies) {
                out[i] = v;
            }
            if let Some(e) = error {
                // An I/O error leaves the stream unusable: stop here.
                let io = e.is_io_error() || e.is_timeout();
                first_error.get_or_insert(e);
                if io {
                    break;
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Each master's own connection: SCAN walks every master's keys.
    pub fn masters(&mut self) -> &mut [Link] {
        &mut self.links
    }
}

/// A backend's L2 connection: one server's link, or a cluster's router.
pub(super) enum Conn {
    Single(Link),
    Cluster(Router),
}

impl Conn {
    /// The master (its index in the map) a keyed command goes to; 0 for one server.
    pub fn master_of(&self, cmd: &redis::Cmd) -> u16 {
        match self {
            Conn::Single(_) => 0,
            Conn::Cluster(router) => router.owner(cmd).unwrap_or(0),
        }
    }

    pub fn exchange(&mut self, cmds: &[redis::Cmd]) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Conn::Single(link) => link.exchange(cmds),
            Conn::Cluster(router) => router.exchange(cmds),
        }
    }

    /// One command, one typed reply.
    pub fn call<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(link) => link.call(cmd),
            Conn::Cluster(router) => {
                let mut values = router.exchange(std::slice::from_ref(cmd))?;
                redis::from_owned_redis_value(values.pop().unwrap_or(redis::Value::Nil))
            }
        }
    }

    /// Every master's own link (one for a single server): where SCAN must run.
    pub fn masters(&mut self) -> &mut [Link] {
        match self {
            Conn::Single(link) => std::slice::from_mut(link),
            Conn::Cluster(router) => router.masters(),
        }
    }

    /// The cluster map's fingerprint; None for a single server.
    pub fn fingerprint(&self) -> Option<u32> {
        match self {
            Conn::Single(_) => None,
            Conn::Cluster(router) => Some(router.fingerprint),
        }
    }
}

/// Whether a reply says the map this backend holds is not the cluster's any more.
pub(super) fn is_redirect(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Moved
            | redis::ErrorKind::Ask
            | redis::ErrorKind::TryAgain
            | redis::ErrorKind::ClusterDown
            | redis::ErrorKind::MasterDown
            | redis::ErrorKind::CrossSlot
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_where_their_key_lives() {
        let mut get = redis::cmd("GET");
        get.arg("a{b}c");
        assert_eq!(key_of(&get), Some(&b"a{b}c"[..]));
        let mut eval = redis::cmd("EVAL");
        eval.arg("return 1").arg(2).arg("k1").arg("k2").arg("argv");
        assert_eq!(key_of(&eval), Some(&b"k1"[..]));
        assert_eq!(key_of(&redis::cmd("TIME")), None);
        let mut publish = redis::cmd("PUBLISH");
        publish.arg("chan").arg("msg");
        assert_eq!(key_of(&publish), None);
    }

    #[test]
    fn a_keyless_command_goes_with_the_keyed_one_before_it() {
        // A two-entry read on a cluster: GET, PTTL, TIME per entry, each on its own master.
        let owners = [Some(2), Some(2), None, Some(0), Some(0), None];
        assert_eq!(routes(&owners), vec![2, 2, 2, 0, 0, 0]);
        // Nothing keyed before it: the first keyed command's master.
        assert_eq!(routes(&[None, Some(1), None]), vec![1, 1, 1]);
        assert_eq!(routes(&[None]), vec![0]);
    }
}
