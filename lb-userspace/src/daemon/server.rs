//! The daemon's side of the control API: a Unix socket (mode 0600) that
//! takes one JSON request per line and answers one JSON response per line.
//! Requests run on the controller's actor; what waits on something else (a
//! DNS lookup, a walk of the table for `flows`, the kernel for `health`)
//! waits here, not there.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::actor::{Ctl, Handle};
use crate::{
    api::{ErrorCode, LinkLiveness, Liveness, MAX_REQUEST_BYTES, Request, Response},
    controller::ControllerError,
    dataplane::KernelTable,
    dns::{BackendSpec, Resolver},
    model::ServiceId,
};

/// How long the liveness check waits for the controller before calling it
/// unresponsive (keepalived runs its check every second).
pub const LIVENESS_TIMEOUT: Duration = Duration::from_millis(500);

/// What requests need besides the controller.
#[derive(Clone)]
pub struct Context {
    pub ctl: Handle,
    pub resolver: Option<Arc<Resolver>>,
    /// For `flows`: walked here, off the controller.
    pub table: KernelTable,
    /// The forwarding program's kernel id (what `health` looks for).
    pub program_id: u32,
}

fn gone() -> Response {
    Response::err(ErrorCode::Internal, "the controller is stopping")
}

fn answer(r: Result<serde_json::Value, ControllerError>) -> Response {
    match r {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.code(), e.to_string()),
    }
}

/// Executes one request.
pub async fn handle(cx: &Context, req: Request) -> Response {
    match req {
        Request::Health => Response::ok(serde_json::to_value(liveness(cx).await).unwrap_or_default()),
        Request::BackendAdd { service, proto, backend: BackendSpec::Name(name), weight } => {
            let Some(resolver) = &cx.resolver else {
                return Response::err(
                    ErrorCode::BadRequest,
                    format!("backend {name}: backends by DNS name need the daemon's resolver (none could be set up: see its log)"),
                );
            };
            let answer_ = resolver.resolve(&name.host).await;
            let r = cx
                .ctl
                .call(move |c| {
                    c.named_add(service, proto, &name, weight, answer_)
                        .map(|(sid, addrs)| json!({ "service": sid.addr, "proto": sid.proto, "backend": name.to_string(), "addresses": addrs }))
                })
                .await;
            r.map_or_else(gone, answer)
        }
        Request::Flows { service, proto, backend } => {
            let filter = match service {
                Some(s) => match cx.ctl.call(move |c| c.resolve(s, proto)).await {
                    None => return gone(),
                    Some(Err(e)) => return Response::err(e.code(), e.to_string()),
                    Some(Ok(sid)) => Some(sid),
                },
                None => None,
            };
            let Some(backends) = cx.ctl.call(|c| c.backend_refs()).await else { return gone() };
            let table = cx.table.clone();
            let walked = tokio::task::spawn_blocking(move || crate::controller::flows(&table, filter, &backends)).await;
            match walked {
                Ok(Ok(mut flows)) => {
                    if let Some(b) = backend {
                        flows.retain(|f| f.backend == b);
                    }
                    Response::ok(serde_json::to_value(flows).unwrap_or_default())
                }
                Ok(Err(e)) => Response::err(e.code(), e.to_string()),
                Err(e) => Response::err(ErrorCode::Internal, format!("the table walk failed: {e}")),
            }
        }
        req => cx.ctl.call(move |c| dispatch(c, req)).await.map_or_else(gone, answer),
    }
}

/// The liveness check: the controller answers within `LIVENESS_TIMEOUT`,
/// and the kernel runs this daemon's program on every managed interface.
/// Costs the same at a million flows as at none.
pub async fn liveness(cx: &Context) -> Liveness {
    let asked = Instant::now();
    let attachments = cx.ctl.call_within(LIVENESS_TIMEOUT, |c| crate::dataplane::DataPlane::attachments(c.dataplane())).await;
    let controller_ms = asked.elapsed().as_secs_f64() * 1e3;
    let Some(attachments) = attachments else {
        return Liveness {
            healthy: false,
            controller_ms,
            problems: vec![format!("the controller did not answer within {} ms", LIVENESS_TIMEOUT.as_millis())],
            interfaces: Vec::new(),
        };
    };
    let program_id = cx.program_id;
    let checked = tokio::task::spawn_blocking(move || {
        let mut nl = crate::host::neighbours::Netlink::open();
        attachments
            .into_iter()
            .map(|a| {
                let on_link = match nl.as_mut() {
                    Ok(nl) => nl.xdp_program(a.ifindex).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("opening a netlink socket: {e}")),
                };
                let problem = match on_link {
                    Ok(x) if x.program_id == Some(program_id) => None,
                    Ok(x) => Some(match x.program_id {
                        None => "no XDP program on the interface".to_owned(),
                        Some(other) => format!("another XDP program (id {other}) runs on the interface, not xlb's (id {program_id})"),
                    }),
                    Err(e) => Some(e),
                };
                LinkLiveness { iface: a.iface, ifindex: a.ifindex, mode: a.mode, attached: problem.is_none(), problem }
            })
            .collect::<Vec<_>>()
    })
    .await;
    let interfaces = match checked {
        Ok(i) => i,
        Err(e) => {
            return Liveness { healthy: false, controller_ms, problems: vec![format!("checking the interfaces failed: {e}")], interfaces: Vec::new() };
        }
    };
    let mut problems: Vec<String> = interfaces.iter().filter_map(|i| i.problem.as_ref().map(|p| format!("{}: {p}", i.iface))).collect();
    if interfaces.is_empty() {
        problems.push("the program is attached to no interface".into());
    }
    Liveness { healthy: problems.is_empty(), controller_ms, problems, interfaces }
}

fn svc_json(sid: ServiceId) -> serde_json::Value {
    json!({ "service": sid.addr, "proto": sid.proto })
}

/// Executes a request that needs nothing but the controller (on its actor).
pub fn dispatch(ctl: &mut Ctl, req: Request) -> Result<serde_json::Value, ControllerError> {
    Ok(match req {
        Request::ServiceAdd { service, proto, options } => svc_json(ctl.service_add(service, proto, &options)?),
        Request::ServiceSet { service, proto, options } => {
            let (sid, settings) = ctl.service_set(service, proto, &options)?;
            json!({ "service": sid.addr, "proto": sid.proto, "settings": settings })
        }
        Request::ServiceRemove { service, proto } => svc_json(ctl.service_remove(service, proto)?),
        Request::BackendAdd { service, proto, backend: BackendSpec::Addr(backend), weight } => {
            let (sid, id) = ctl.backend_add(service, proto, backend, weight)?;
            json!({ "service": sid.addr, "proto": sid.proto, "backend": backend, "id": id })
        }
        Request::BackendRemove { service, proto, backend } => {
            let (sid, policy, flows) = match &backend {
                BackendSpec::Addr(a) => ctl.backend_remove(service, proto, *a)?,
                BackendSpec::Name(n) => ctl.named_remove(service, proto, n)?,
            };
            json!({ "service": sid.addr, "proto": sid.proto, "backend": backend, "policy": policy, "active_flows": flows })
        }
        Request::BackendSet { service, proto, backend, weight } => {
            let (sid, old) = match &backend {
                BackendSpec::Addr(a) => ctl.backend_set(service, proto, *a, weight)?,
                BackendSpec::Name(n) => ctl.named_set(service, proto, n, weight)?,
            };
            json!({ "service": sid.addr, "proto": sid.proto, "backend": backend, "old_weight": old, "weight": weight })
        }
        Request::Export => serde_json::to_value(ctl.export()).unwrap_or_default(),
        Request::Apply { config, dry_run } => {
            let changes = ctl.apply(&config, dry_run)?;
            json!({ "dry_run": dry_run, "changes": changes })
        }
        Request::Status => serde_json::to_value(ctl.status()?).unwrap_or_default(),
        Request::Role { role } => {
            let old = ctl.set_role(role)?;
            json!({ "role": role, "previous": old })
        }
        // Answered off the controller (see `handle`).
        Request::Health | Request::Flows { .. } | Request::BackendAdd { backend: BackendSpec::Name(_), .. } => {
            return Err(ControllerError::Refused(crate::model::Refusal::BadRequest("this request is not answered by the controller (internal)".into())));
        }
    })
}

/// Parses one request line; garbage gets a `bad_request` naming the problem.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    serde_json::from_str(line.trim()).map_err(|e| Response::err(ErrorCode::BadRequest, format!("invalid request: {e}")))
}

/// Binds the socket with mode 0600 (creating its directory).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another xlb daemon is already serving {}: stop it first or choose another --socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    // Bind under a restrictive umask so the socket is never briefly open to others.
    // SAFETY: umask has no failure mode.
    let old = unsafe { libc::umask(0o177) };
    let res = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = res.with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(listener)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, cx: Context) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let cx = cx.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &cx).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, cx: &Context) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = String::new();
        let n = (&mut rd).take(MAX_REQUEST_BYTES as u64 + 1).read_line(&mut line).await;
        let resp = match n {
            Ok(0) => return Ok(()),
            Ok(_) if line.len() > MAX_REQUEST_BYTES => {
                let r = Response::err(ErrorCode::BadRequest, format!("request longer than {MAX_REQUEST_BYTES} bytes"));
                write_response(&mut wr, &r).await?;
                return Ok(());
            }
            Ok(_) => match parse_request(&line) {
                Ok(req) => {
                    if line.len() < 4096 {
                        tracing::debug!(?req, "request");
                    }
                    // A change is saved to the state file by the actor before
                    // this answer: what the client saw acknowledged survives
                    // a restart.
                    handle(cx, req).await
                }
                Err(r) => r,
            },
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Response::err(ErrorCode::BadRequest, "request is not valid UTF-8"),
            Err(e) => return Err(e),
        };
        write_response(&mut wr, &resp).await?;
    }
}

async fn write_response(wr: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(r).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    out.push('\n');
    wr.write_all(out.as_bytes()).await
}
