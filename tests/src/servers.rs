//! Servers that name themselves, run inside a namespace: every answer starts
//! with the server's name, so a client knows which backend it reached.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::in_netns;

/// What a server saw: requests answered and the peers that sent them.
#[derive(Default)]
pub struct Seen {
    pub requests: AtomicU64,
    /// Connections that ended with ECONNRESET on the server side.
    pub resets: AtomicU64,
    pub connections: AtomicU64,
    pub peers: Mutex<HashMap<SocketAddr, u64>>,
}

/// TCP line server: answers each line `L` with `NAME L`.
pub struct TcpNameServer {
    pub name: String,
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpNameServer {
    pub fn start(ns: &str, name: &str, bind: SocketAddr) -> anyhow::Result<TcpNameServer> {
        let listener = in_netns(ns, || TcpListener::bind(bind))??;
        TcpNameServer::start_on(listener, name)
    }

    /// Serves on a listener made by the caller (e.g. one with a small
    /// backlog, whose queue was filled before it started accepting).
    pub fn start_on(listener: TcpListener, name: &str) -> anyhow::Result<TcpNameServer> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let (stop2, seen2, name2) = (stop.clone(), seen.clone(), name.to_owned());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        seen2.connections.fetch_add(1, Ordering::Relaxed);
                        *seen2.peers.lock().unwrap_or_else(|e| e.into_inner()).entry(peer).or_default() += 1;
                        let (seen3, name3, stop3) = (seen2.clone(), name2.clone(), stop2.clone());
                        std::thread::spawn(move || serve_tcp(stream, &name3, &seen3, &stop3));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(TcpNameServer { name: name.to_owned(), seen, stop, thread: Some(thread) })
    }

    pub fn connections(&self) -> u64 {
        self.seen.connections.load(Ordering::Relaxed)
    }
}

fn serve_tcp(stream: TcpStream, name: &str, seen: &Seen, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line == "rst\n" => {
                // Abort: close with SO_LINGER 0, so the kernel sends a RST.
                abort(reader.get_ref());
                return;
            }
            Ok(_) if line.ends_with('\n') => {
                seen.requests.fetch_add(1, Ordering::Relaxed);
                if writer.write_all(format!("{name} {line}").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => {
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    seen.resets.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// Makes the socket's close send a RST (SO_LINGER with a zero timeout):
/// it happens when the last descriptor of the socket is dropped.
pub fn abort(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket and option buffer.
    unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&l as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as u32);
    }
}

impl Drop for TcpNameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// UDP server: answers each datagram `D` with `NAME D`.
pub struct UdpNameServer {
    pub name: String,
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpNameServer {
    pub fn start(ns: &str, name: &str, bind: SocketAddr) -> anyhow::Result<UdpNameServer> {
        let sock = in_netns(ns, || UdpSocket::bind(bind))??;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let (stop2, seen2, name2) = (stop.clone(), seen.clone(), name.to_owned());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    seen2.requests.fetch_add(1, Ordering::Relaxed);
                    *seen2.peers.lock().unwrap_or_else(|e| e.into_inner()).entry(peer).or_default() += 1;
                    let mut out = format!("{name2} ").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&out, peer);
                }
            }
        });
        Ok(UdpNameServer { name: name.to_owned(), seen, stop, thread: Some(thread) })
    }
}

impl Drop for UdpNameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP client connection opened from namespace `ns`, with a line protocol.
pub struct LineClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineClient {
    pub fn connect(ns: &str, to: SocketAddr) -> anyhow::Result<LineClient> {
        let stream = in_netns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(LineClient { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }

    /// Sends `msg` and returns the name of the server that answered.
    pub fn ask(&mut self, msg: &str) -> anyhow::Result<String> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        self.answer(msg)
    }

    /// Sends a line without waiting for the answer.
    pub fn send(&mut self, msg: &str) -> std::io::Result<()> {
        self.writer.write_all(format!("{msg}\n").as_bytes())
    }

    /// Reads the answer to `msg` and returns the name of the server.
    pub fn answer(&mut self, msg: &str) -> anyhow::Result<String> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let (name, echoed) = line.trim_end().split_once(' ').ok_or_else(|| anyhow::anyhow!("unexpected answer {line:?}"))?;
        anyhow::ensure!(echoed == msg, "answer {line:?} does not echo {msg:?}");
        Ok(name.to_owned())
    }
}

/// How each connection ended, observed without sending anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// ECONNRESET after this long.
    Reset(Duration),
    /// Orderly close (FIN) after this long.
    Closed(Duration),
    /// Data arrived (unexpected for idle clients).
    Data,
    /// Nothing happened before the deadline.
    Silent,
}

/// Watches idle connections with poll(2) until each has ended or `timeout`
/// has passed since `start`, and says how each ended.
pub fn watch_idle(streams: &[&TcpStream], start: std::time::Instant, timeout: Duration) -> Vec<Outcome> {
    use std::{io::Read, os::fd::AsRawFd};
    let mut out = vec![Outcome::Silent; streams.len()];
    let mut open: Vec<usize> = (0..streams.len()).collect();
    while !open.is_empty() {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        let mut fds: Vec<libc::pollfd> = open.iter().map(|&i| libc::pollfd { fd: streams[i].as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: valid array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, left.as_millis().min(1000) as i32) };
        if n <= 0 {
            continue;
        }
        let now = start.elapsed();
        let mut still = Vec::new();
        for (slot, &i) in fds.iter().zip(&open) {
            if slot.revents == 0 {
                still.push(i);
                continue;
            }
            let mut buf = [0u8; 64];
            let mut s = streams[i];
            out[i] = match s.read(&mut buf) {
                Ok(0) => Outcome::Closed(now),
                Ok(_) => Outcome::Data,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Outcome::Reset(now),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    still.push(i);
                    continue;
                }
                Err(_) => Outcome::Closed(now),
            };
        }
        open = still;
    }
    out
}

/// A minimal HTTP server answering every request with the current status
/// (for health checks), in a namespace.
pub struct HttpStatusServer {
    pub status: Arc<std::sync::atomic::AtomicU16>,
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpStatusServer {
    /// Answers `HTTP/1.1 <status> <name>`: the reason phrase says who answered.
    pub fn start(ns: &str, name: &str, bind: SocketAddr, status: u16) -> anyhow::Result<HttpStatusServer> {
        let name = name.to_owned();
        let listener = in_netns(ns, || TcpListener::bind(bind))??;
        listener.set_nonblocking(true)?;
        let status = Arc::new(std::sync::atomic::AtomicU16::new(status));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, rq, sp) = (status.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut reader = BufReader::new(&s);
                        let mut line = String::new();
                        // Request line and headers, up to the blank line.
                        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line != "\r\n" {
                            line.clear();
                        }
                        rq.fetch_add(1, Ordering::Relaxed);
                        let code = st.load(Ordering::Relaxed);
                        let _ = (&s).write_all(format!("HTTP/1.1 {code} {name}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(HttpStatusServer { status, requests, stop, thread: Some(thread) })
    }
}

impl Drop for HttpStatusServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP bulk server: reads one line `N`, sends `N` bytes of [`bulk_byte`]
/// and closes. Large transfers exercise what small exchanges never do:
/// TSO/GSO, full-size segments, the path MTU.
pub struct BulkServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Byte `i` of a bulk transfer.
pub fn bulk_byte(i: usize) -> u8 {
    (i % 251) as u8
}

impl BulkServer {
    pub fn start(ns: &str, bind: SocketAddr) -> anyhow::Result<BulkServer> {
        let listener = in_netns(ns, || TcpListener::bind(bind))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                            let Ok(mut w) = stream.try_clone() else { return };
                            let mut line = String::new();
                            if BufReader::new(stream).read_line(&mut line).is_err() {
                                return;
                            }
                            let n: usize = line.trim().parse().unwrap_or(0);
                            let data: Vec<u8> = (0..n).map(bulk_byte).collect();
                            let _ = w.write_all(&data);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(BulkServer { stop, thread: Some(thread) })
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Downloads `n` bytes from a [`BulkServer`] at `to`, from namespace `ns`,
/// within `timeout`; checks every byte.
pub fn download(ns: &str, to: SocketAddr, n: usize, timeout: Duration) -> anyhow::Result<()> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    let mut s = in_netns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
    s.write_all(format!("{n}\n").as_bytes())?;
    let mut got = Vec::with_capacity(n);
    let mut buf = vec![0u8; 65536];
    while got.len() < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        anyhow::ensure!(!left.is_zero(), "download from {to} stalled: {} of {n} bytes after {timeout:?}", got.len());
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => anyhow::bail!("download from {to} ended early: {} of {n} bytes", got.len()),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => anyhow::bail!("download from {to}: {e} after {} of {n} bytes", got.len()),
        }
    }
    anyhow::ensure!(got.iter().enumerate().all(|(i, b)| *b == bulk_byte(i)), "download from {to}: corrupted data");
    Ok(())
}

/// A TCP line server that also speaks first, as servers that push
/// (notifications, keepalives, streaming) do: answers each line `L` with
/// `NAME L` and, on [`PushServer::push`], writes `NAME push K` to every
/// connection it holds. One thread, many connections (poll).
pub struct PushServer {
    pub name: String,
    /// Pushes asked for and pushes done (the thread catches up).
    asked: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    /// Connections written to by the latest push.
    last_pushed: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PushServer {
    pub fn start(ns: &str, name: &str, bind: SocketAddr) -> anyhow::Result<PushServer> {
        use std::{io::Read, os::fd::AsRawFd};
        let listener = in_netns(ns, || TcpListener::bind(bind))??;
        listener.set_nonblocking(true)?;
        let asked = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let last_pushed = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, d, lp, cn, sp, nm) = (asked.clone(), done.clone(), last_pushed.clone(), connections.clone(), stop.clone(), name.to_owned());
        let thread = std::thread::spawn(move || {
            // Each connection with what it has read of its current line.
            let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
            while !sp.load(Ordering::Relaxed) {
                while let Ok((s, _)) = listener.accept() {
                    if s.set_nonblocking(true).is_ok() {
                        cn.fetch_add(1, Ordering::Relaxed);
                        conns.push((s, Vec::new()));
                    }
                }
                let want = a.load(Ordering::Relaxed);
                if d.load(Ordering::Relaxed) < want {
                    let line = format!("{nm} push {want}\n");
                    let n = conns.iter().filter(|(s, _)| (&*s).write_all(line.as_bytes()).is_ok()).count();
                    lp.store(n as u64, Ordering::Relaxed);
                    d.store(want, Ordering::Relaxed);
                }
                let mut fds: Vec<libc::pollfd> = conns.iter().map(|(s, _)| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
                fds.push(libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                // SAFETY: valid array of pollfd.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
                if n <= 0 {
                    continue;
                }
                let mut closed = Vec::new();
                for (i, p) in fds[..conns.len()].iter().enumerate() {
                    if p.revents == 0 {
                        continue;
                    }
                    let (s, buf) = &mut conns[i];
                    let mut chunk = [0u8; 4096];
                    loop {
                        match s.read(&mut chunk) {
                            Ok(0) => {
                                closed.push(i);
                                break;
                            }
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                closed.push(i);
                                break;
                            }
                        }
                    }
                    while let Some(j) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=j).collect();
                        let mut out = format!("{nm} ").into_bytes();
                        out.extend_from_slice(&line);
                        let _ = s.write_all(&out);
                    }
                }
                for i in closed.into_iter().rev() {
                    conns.swap_remove(i);
                }
            }
        });
        Ok(PushServer { name: name.to_owned(), asked, done, last_pushed, connections, stop, thread: Some(thread) })
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Writes one push line to every connection the server holds; returns
    /// how many took it.
    pub fn push(&self) -> anyhow::Result<u64> {
        let want = self.asked.fetch_add(1, Ordering::Relaxed) + 1;
        crate::wait_for("the push to be written", Duration::from_secs(10), || (self.done.load(Ordering::Relaxed) >= want).then_some(()))?;
        Ok(self.last_pushed.load(Ordering::Relaxed))
    }
}

impl Drop for PushServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
