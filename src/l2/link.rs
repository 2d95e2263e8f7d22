//! One Redis connection: the client (TLS files and the password file applied), a DNS lookup
//! bounded by the connect timeout, and waits on the socket that a cancel or statement_timeout
//! can interrupt.

use super::{L2Error, ROUND_TRIPS};
use crate::gucs;
use pgrx::pg_sys;
use std::time::{Duration, Instant};

/// A Redis connection and its socket, which this backend waits on itself: the redis crate's
/// blocking reads retry on EINTR, so a cancel or statement_timeout arriving while Redis hangs
/// would wait out the whole read timeout, twice. `poll` is never restarted after a signal.
pub(super) struct Link {
    con: redis::Connection,
    fd: Option<i32>,
}

#[repr(C)]
pub(super) struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    pub(super) fn poll(fds: *mut PollFd, nfds: u64, timeout: i32) -> i32;
}

/// Sockets open in this process: the one a connect adds is the Redis connection's.
pub(super) fn socket_fds() -> std::collections::HashSet<i32> {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a cancel, timeout or termination is waiting to be served here.
pub(super) fn interrupt_pending() -> bool {
    unsafe {
        pg_sys::InterruptPending != 0
            && pg_sys::InterruptHoldoffCount == 0
            && pg_sys::CritSectionCount == 0
    }
}

impl Link {
    /// Waits until the first reply can be read, `deadline` passes, or an interrupt is pending
    /// (where interrupts can be served). The deadline may be shared by several links: a
    /// cluster's pipeline waits on every master it wrote to within one read timeout in all.
    pub(super) fn wait_readable_until(&self, deadline: Instant) -> redis::RedisResult<()> {
        let Some(fd) = self.fd else { return Ok(()) };
        loop {
            if interrupt_pending() {
                return Err(std::io::Error::from(std::io::ErrorKind::Interrupted).into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no reply within twotier.read_timeout_ms",
                )
                .into());
            }
            let mut p = PollFd {
                fd,
                events: 1, // POLLIN
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            let rc = unsafe { poll(&mut p, 1, ms) };
            if rc > 0 {
                return Ok(());
            }
            if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(std::io::Error::last_os_error().into());
            }
        }
    }

    /// Sends `cmds` in one write, without reading their replies.
    pub(super) fn send<'c>(
        &mut self,
        cmds: impl IntoIterator<Item = &'c redis::Cmd>,
    ) -> redis::RedisResult<()> {
        let mut packed = Vec::new();
        for c in cmds {
            c.write_packed_command(&mut packed);
        }
        self.con.send_packed_command(&packed)
    }

    /// Sends `cmds` in one write and reads one reply each. A server error (OOM, READONLY)
    /// is returned after every reply has been read, so the stream stays usable.
    pub(super) fn exchange(
        &mut self,
        cmds: &[redis::Cmd],
    ) -> redis::RedisResult<Vec<redis::Value>> {
        ROUND_TRIPS.with(|n| n.set(n.get() + 1));
        self.send(cmds)?;
        self.receive(cmds.len())
    }

    pub(super) fn receive(&mut self, n: usize) -> redis::RedisResult<Vec<redis::Value>> {
        match self.receive_all(n) {
            (out, None) => Ok(out),
            (_, Some(e)) => Err(e),
        }
    }

    /// `n` replies, a server error's as Nil, and the first error: a server error once every
    /// reply has been read (the stream stays usable), an I/O error at once (it does not).
    pub(super) fn receive_all(
        &mut self,
        n: usize,
    ) -> (Vec<redis::Value>, Option<redis::RedisError>) {
        self.receive_all_until(n, Instant::now() + gucs::read_timeout())
    }

    /// [`receive_all`](Self::receive_all), the first reply awaited until `deadline`.
    pub(super) fn receive_all_until(
        &mut self,
        n: usize,
        deadline: Instant,
    ) -> (Vec<redis::Value>, Option<redis::RedisError>) {
        let mut out = Vec::with_capacity(n);
        let mut error = None;
        if n == 0 {
            return (out, None);
        }
        if let Err(e) = self.wait_readable_until(deadline) {
            return (out, Some(e));
        }
        for _ in 0..n {
            match self.con.recv_response() {
                Ok(reply) => match reply.extract_error() {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        error.get_or_insert(e);
                        out.push(redis::Value::Nil);
                    }
                },
                Err(e) => return (out, Some(e)),
            }
        }
        (out, error)
    }

    /// One command, one typed reply.
    pub(super) fn call<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let mut values = self.exchange(std::slice::from_ref(cmd))?;
        redis::from_owned_redis_value(values.pop().unwrap_or(redis::Value::Nil))
    }
}

/// `host` resolved within `timeout`: getaddrinfo has no timeout of its own, and a DNS server
/// that does not answer must not hold a cache call longer than `twotier.connect_timeout_ms`.
/// The lookup runs on a short-lived thread that touches nothing of PostgreSQL; if it is late,
/// it is left to finish on its own.
pub(super) fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<std::net::SocketAddr, L2Error> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, port));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::Builder::new()
        .name("twotier-dns".into())
        .spawn(move || {
            let _ = tx.send(
                (name.as_str(), port)
                    .to_socket_addrs()
                    .map(|mut a| a.next()),
            );
        })
        .map_err(|e| L2Error::Redis(redis::RedisError::from(e)))?;
    let failed = |what: String| {
        L2Error::Redis(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "could not resolve the Redis host",
            what,
        )))
    };
    match rx.recv_timeout(timeout) {
        Ok(Ok(Some(addr))) => Ok(addr),
        Ok(Ok(None)) => Err(failed(format!("{host}: no address"))),
        Ok(Err(e)) => Err(failed(format!("{host}: {e}"))),
        Err(_) => Err(failed(format!("{host}: no answer within {timeout:?}"))),
    }
}

/// A client for `url`: rediss:// URLs get the CA and client certificate of the
/// `twotier.redis_tls_*` settings (the system trust store when no CA is set).
pub(crate) fn client_for(url: &str) -> Result<redis::Client, L2Error> {
    let bad = |e: String| L2Error::BadUrl(e);
    let mut info =
        redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| bad(e.to_string()))?;
    // The password never sits in a setting (pg_settings, SHOW and the server log show
    // settings): it comes from a file only the server's OS user reads.
    if let Some(password) = gucs::redis_password().map_err(L2Error::PasswordFile)? {
        info.redis.password = Some(password);
    }
    match info.addr {
        redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(bad(
                "rediss:// with #insecure (no certificate verification) is refused".into(),
            ))
        }
        redis::ConnectionAddr::TcpTls { .. } => {}
        _ => return redis::Client::open(info).map_err(|e| bad(e.to_string())),
    }
    let [ca, cert, key] = gucs::redis_tls_files();
    let read =
        |path: &str| std::fs::read(path).map_err(|e| bad(format!("cannot read {path}: {e}")));
    let client_tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(&cert)?,
            client_key: read(&key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(bad(
                "twotier.redis_tls_cert_file and twotier.redis_tls_key_file go together".into(),
            ))
        }
    };
    let root_cert = ca.map(|ca| read(&ca)).transpose()?;
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| bad(e.to_string()))
}

pub(super) fn connect(url: &str) -> Result<(Link, String), L2Error> {
    connect_at(url, None)
}

/// [`connect`] with `url`'s user, password and TLS settings but another host and port (a
/// cluster's master, as its map names it).
pub(super) fn connect_at(url: &str, at: Option<(&str, u16)>) -> Result<(Link, String), L2Error> {
    let mut client = client_for(url)?;
    if let Some((new_host, new_port)) = at {
        let mut info = client.get_connection_info().clone();
        match &mut info.addr {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                *host = new_host.to_string();
                *port = new_port;
            }
            _ => {
                return Err(L2Error::BadUrl(
                    "a cluster's nodes are reached over TCP".into(),
                ))
            }
        }
        client = redis::Client::open(info).map_err(|e| L2Error::BadUrl(e.to_string()))?;
    }
    if let redis::ConnectionAddr::Tcp(host, port) = &client.get_connection_info().addr {
        let addr = resolve(host, *port, gucs::connect_timeout())?;
        let mut info = client.get_connection_info().clone();
        info.addr = redis::ConnectionAddr::Tcp(addr.ip().to_string(), addr.port());
        client = redis::Client::open(info).map_err(|e| L2Error::BadUrl(e.to_string()))?;
    }
    let before = socket_fds();
    let con = client.get_connection_with_timeout(gucs::connect_timeout())?;
    let after = socket_fds();
    let mut new = after.difference(&before);
    let fd = match (new.next(), new.next()) {
        (Some(fd), None) => Some(*fd),
        // Not exactly one new socket: wait in the crate's read instead (not interruptible).
        _ => None,
    };
    con.set_read_timeout(Some(gucs::read_timeout()))?;
    con.set_write_timeout(Some(gucs::read_timeout()))?;
    let mut link = Link { con, fd };
    let info: String = link.call(redis::cmd("INFO").arg("server"))?;
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().chars().take(12).collect::<String>())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            L2Error::Redis(redis::RedisError::from((
                redis::ErrorKind::ResponseError,
                "INFO server has no run_id",
            )))
        })?;
    Ok((link, run_id))
}
