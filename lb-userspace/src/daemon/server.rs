//! The daemon's side of the control API: a Unix socket (mode 0600) that
//! takes one JSON request per line and answers one JSON response per line.

use std::{path::Path, sync::Arc};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use crate::{
    api::{ErrorCode, Request, Response, MAX_REQUEST_BYTES},
    controller::{Controller, ControllerError, ServiceId},
    dns::BackendSpec,
};

/// Executes one request; a backend given by name is looked up first,
/// without holding the controller (a slow DNS server must not stall the
/// API or the health checks).
pub async fn handle_async(ctl: &Arc<Mutex<Controller>>, req: Request) -> Response {
    let Request::BackendAdd { service, proto, backend: BackendSpec::Name(name), weight } = req else {
        return handle(&mut *ctl.lock().await, req);
    };
    let resolver = match ctl.lock().await.resolver() {
        Ok(r) => r,
        Err(e) => return Response::err(e.code(), e.to_string()),
    };
    let answer = resolver.resolve(&name.host).await;
    let mut c = ctl.lock().await;
    match c.named_add(service, proto, &name, weight, answer) {
        Ok((sid, addrs)) => Response::ok(json!({ "service": sid.addr, "proto": sid.proto, "backend": name.to_string(), "addresses": addrs })),
        Err(e) => Response::err(e.code(), e.to_string()),
    }
}

/// Executes one request against the controller.
pub fn handle(ctl: &mut Controller, req: Request) -> Response {
    match dispatch(ctl, req) {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.code(), e.to_string()),
    }
}

fn svc_json(sid: ServiceId) -> serde_json::Value {
    json!({ "service": sid.addr, "proto": sid.proto })
}

fn dispatch(ctl: &mut Controller, req: Request) -> Result<serde_json::Value, ControllerError> {
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
        // Resolved before the controller is taken (see `resolve_first`).
        Request::BackendAdd { backend: BackendSpec::Name(name), .. } => {
            return Err(ControllerError::BadRequest(format!("backend {name} was not resolved (internal)")));
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
        Request::Flows { service, proto, backend } => {
            let filter = match service {
                Some(s) => Some(ctl.resolve(s, proto)?),
                None => None,
            };
            let mut flows = ctl.flows(filter)?;
            if let Some(b) = backend {
                flows.retain(|f| f.backend == b);
            }
            serde_json::to_value(flows).unwrap_or_default()
        }
    })
}

/// Parses one request line; garbage gets a `bad_request` naming the problem.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    serde_json::from_str(line.trim())
        .map_err(|e| Response::err(ErrorCode::BadRequest, format!("invalid request: {e}")))
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
            anyhow::bail!(
                "another xlb daemon is already serving {}: stop it first or choose another --socket",
                path.display()
            );
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(listener)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, ctl: Arc<Mutex<Controller>>, state_file: std::path::PathBuf) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctl = ctl.clone();
                let state_file = state_file.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, ctl, &state_file).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, ctl: Arc<Mutex<Controller>>, state_file: &std::path::Path) -> std::io::Result<()> {
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
                    tracing::debug!(?req, "request");
                    let resp = handle_async(&ctl, req).await;
                    let mut guard = ctl.lock().await;
                    spawn_pending_resets(&mut guard, &ctl);
                    // Saved before answering: a change the client saw
                    // acknowledged survives a restart.
                    if guard.take_dirty() {
                        crate::daemon::save_state(state_file, &guard);
                    }
                    resp
                }
                Err(r) => r,
            },
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Response::err(ErrorCode::BadRequest, "request is not valid UTF-8")
            }
            Err(e) => return Err(e),
        };
        write_response(&mut wr, &resp).await?;
    }
}

/// Starts the pacing task of every spread reset the controller queued.
pub fn spawn_pending_resets(ctl: &mut Controller, arc: &Arc<Mutex<Controller>>) {
    for job in ctl.take_pending_resets() {
        tokio::spawn(crate::controller::run_spread_reset(arc.clone(), job));
    }
}

async fn write_response(wr: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(r).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    out.push('\n');
    wr.write_all(out.as_bytes()).await
}
