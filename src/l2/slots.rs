//! Redis Cluster's arithmetic and its map, without any I/O: the hash slot of a key (CRC16 of
//! its `{tag}`), the masters and their slots as `CLUSTER NODES` reports them, and the
//! fingerprint of that map which L2's trust rests on (docs/design.md, "Redis Cluster").

pub const SLOTS: usize = 16384;
/// A slot no master serves.
pub const NO_OWNER: u16 = u16::MAX;

/// CRC16-CCITT (XMODEM), Redis Cluster's key hash.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: of its hash tag (what lies between the first `{` and the next `}`) when
/// the tag is not empty, else of the whole key.
pub fn slot_of(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub id: String,
    pub host: String,
    pub port: u16,
    /// The config epoch: a failover (even back to this node) or a slot moving to this node
    /// moves it.
    pub config_epoch: u64,
    /// Its slots as `CLUSTER NODES` writes them, migrations included (`[5461->-id]`).
    pub slots: Vec<String>,
}

/// Who serves which slot, as one node saw it.
#[derive(Debug, Clone)]
pub struct Topology {
    pub masters: Vec<Master>,
    /// Per slot, the index in `masters` of the master serving it, or [`NO_OWNER`].
    pub owner: Vec<u16>,
}

/// Parses `CLUSTER NODES`: every master that serves a slot (a master that failed keeps its
/// slots here until its replica is promoted: it is still the one to ask, and it will not
/// answer).
pub fn parse_nodes(text: &str) -> Result<Topology, String> {
    let mut masters = Vec::new();
    let mut owner = vec![NO_OWNER; SLOTS];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(format!("CLUSTER NODES line not understood: {line}"));
        }
        let flags: Vec<&str> = fields[2].split(',').collect();
        if !flags.contains(&"master") || fields.len() == 8 {
            continue;
        }
        // ip:port@cport[,hostname]
        let addr = fields[1].split('@').next().unwrap_or("");
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
            .ok_or_else(|| format!("CLUSTER NODES address not understood: {}", fields[1]))?;
        let config_epoch = fields[6]
            .parse::<u64>()
            .map_err(|_| format!("CLUSTER NODES config epoch not understood: {}", fields[6]))?;
        let index = masters.len() as u16;
        let slots: Vec<String> = fields[8..].iter().map(|s| s.to_string()).collect();
        for s in &slots {
            if s.starts_with('[') {
                // A slot migrating or importing: its owner is the one its range names.
                continue;
            }
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (lo.parse::<usize>(), hi.parse::<usize>()),
                None => (s.parse::<usize>(), s.parse::<usize>()),
            };
            match (lo, hi) {
                (Ok(lo), Ok(hi)) if lo <= hi && hi < SLOTS => {
                    owner[lo..=hi].iter_mut().for_each(|o| *o = index)
                }
                _ => return Err(format!("CLUSTER NODES slot range not understood: {s}")),
            }
        }
        masters.push(Master {
            id: fields[0].to_string(),
            host,
            port,
            config_epoch,
            slots,
        });
    }
    if masters.is_empty() {
        return Err("CLUSTER NODES names no master serving a slot".into());
    }
    Ok(Topology { masters, owner })
}

/// 32 bits that change whenever a master serving a slot changes: its node id, its config
/// epoch (a failover, a slot gained), its slots or a migration of one (the text of its slot
/// list), or its process (`run_ids[i]`, the master's `run_id`, new at every start). An L2
/// epoch carries the fingerprint of the map it trusts in its low 32 bits.
pub fn fingerprint(topology: &Topology, run_ids: &[String]) -> u32 {
    let mut parts: Vec<String> = topology
        .masters
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "{} {} {} {}",
                m.id,
                m.config_epoch,
                run_ids.get(i).map(String::as_str).unwrap_or(""),
                m.slots.join(",")
            )
        })
        .collect();
    parts.sort();
    // FNV-1a: stable across builds and machines (every server must compute the same).
    let mut h: u32 = 0x811c_9dc5;
    for b in parts.join("\n").bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006 slave 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 6 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,host-a myself,master - 0 0 1 connected 0-5460
";

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
    }

    #[test]
    fn nodes_give_masters_and_owners() {
        let t = parse_nodes(NODES).unwrap();
        assert_eq!(t.masters.len(), 3);
        let m = &t.masters[t.owner[0] as usize];
        assert_eq!(
            (m.host.as_str(), m.port, m.config_epoch),
            ("127.0.0.1", 30001, 1)
        );
        assert_eq!(t.masters[t.owner[5461] as usize].port, 30002);
        assert_eq!(t.masters[t.owner[16383] as usize].port, 30003);
        assert!(t.owner.iter().all(|&o| o != NO_OWNER));
    }

    #[test]
    fn fingerprint_moves_with_what_trust_rests_on() {
        let t = parse_nodes(NODES).unwrap();
        let runs: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let fp = fingerprint(&t, &runs);
        // The same map listed in another order is the same map.
        let mut lines: Vec<&str> = NODES.lines().collect();
        lines.reverse();
        assert_eq!(
            fingerprint(&parse_nodes(&lines.join("\n")).unwrap(), &{
                let t2 = parse_nodes(&lines.join("\n")).unwrap();
                t2.masters
                    .iter()
                    .map(|m| runs[t.masters.iter().position(|x| x.id == m.id).unwrap()].clone())
                    .collect::<Vec<_>>()
            }),
            fp
        );
        // A restart (run_id), a failover (config epoch), a migration: another fingerprint.
        assert_ne!(fingerprint(&t, &["a".into(), "b".into(), "x".into()]), fp);
        let failed_over = NODES.replace("master - 0 1426238316232 2", "master - 0 1426238316232 7");
        assert_ne!(fingerprint(&parse_nodes(&failed_over).unwrap(), &runs), fp);
        let migrating = NODES.replace(
            "0-5460",
            "0-5460 [5460->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]",
        );
        assert_ne!(fingerprint(&parse_nodes(&migrating).unwrap(), &runs), fp);
    }
}
