//! The controller as an actor: it lives on a thread of its own and takes
//! work from a bounded mailbox, one closure at a time. Async tasks
//! (`call`) and plain threads (`call_blocking`) send closures and get their
//! results back; nothing else touches the controller, so there is no lock,
//! and no async worker ever waits on a map write.
//!
//! After every closure the actor settles what it left behind, before the
//! caller sees the result: a changed model is saved to the state file (a
//! change the client saw acknowledged survives a restart), reset jobs go to
//! the reset worker, records of removed flows to the flow log and (as
//! master) to the sync peer.

use std::{path::PathBuf, sync::mpsc as std_mpsc, time::Duration};

use tokio::sync::{mpsc, oneshot};

use crate::{controller::Controller, dataplane::KernelDataPlane, resets};

pub type Ctl = Controller<KernelDataPlane>;

type Work = Box<dyn FnOnce(&mut Actor) + Send>;

/// Where the actor sends what the controller left behind.
pub struct Outlets {
    pub state_file: PathBuf,
    pub jobs: std_mpsc::Sender<resets::Job>,
    pub flow_log: Option<super::flowlog::Sender>,
    pub sync: Option<super::sync::Outbound>,
}

pub struct Actor {
    pub ctl: Ctl,
    out: Outlets,
    /// Set by [`Handle::stop`]: the thread ends after this closure.
    stopping: bool,
}

impl Actor {
    /// What the last closure left behind (see the module doc).
    fn settle(&mut self) {
        if self.ctl.take_dirty() {
            super::save_state(&self.out.state_file, &self.ctl);
        }
        for job in self.ctl.take_jobs() {
            if self.out.jobs.send(job).is_err() {
                tracing::error!("the reset worker is gone: a reset job is lost (the data plane still resets those flows on their next packet)");
            }
        }
        let records = self.ctl.take_outbox();
        if records.is_empty() {
            return;
        }
        if let Some(l) = &self.out.flow_log {
            for r in &records {
                l.send(*r);
            }
        }
        if let Some(s) = &self.out.sync {
            s.ended(&records);
        }
    }
}

/// A handle on the actor's mailbox.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Work>,
}

/// Starts the actor thread; it ends at [`Handle::stop`] (or when every
/// handle is dropped) and gives the controller back, for the shutdown.
pub fn spawn(ctl: Ctl, out: Outlets) -> std::io::Result<(Handle, std::thread::JoinHandle<Ctl>)> {
    let (tx, mut rx) = mpsc::channel::<Work>(1024);
    let thread = std::thread::Builder::new().name("xlb-controller".into()).spawn(move || {
        let mut actor = Actor { ctl, out, stopping: false };
        while let Some(work) = rx.blocking_recv() {
            work(&mut actor);
            if actor.stopping {
                break;
            }
        }
        actor.ctl
    })?;
    Ok((Handle { tx }, thread))
}

impl Handle {
    /// Runs `f` on the controller and returns its result (`None`: the
    /// actor is gone, the daemon is stopping).
    pub async fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut Ctl) -> R + Send + 'static) -> Option<R> {
        let (reply, rx) = oneshot::channel();
        let work: Work = Box::new(move |a: &mut Actor| {
            let r = f(&mut a.ctl);
            a.settle();
            let _ = reply.send(r);
        });
        self.tx.send(work).await.ok()?;
        rx.await.ok()
    }

    /// As [`Handle::call`], giving up after `timeout` (a liveness check).
    pub async fn call_within<R: Send + 'static>(&self, timeout: Duration, f: impl FnOnce(&mut Ctl) -> R + Send + 'static) -> Option<R> {
        tokio::time::timeout(timeout, self.call(f)).await.ok().flatten()
    }

    /// As [`Handle::call`], from a plain thread.
    pub fn call_blocking<R: Send + 'static>(&self, f: impl FnOnce(&mut Ctl) -> R + Send + 'static) -> Option<R> {
        let (reply, rx) = oneshot::channel();
        let work: Work = Box::new(move |a: &mut Actor| {
            let r = f(&mut a.ctl);
            a.settle();
            let _ = reply.send(r);
        });
        self.tx.blocking_send(work).ok()?;
        rx.blocking_recv().ok()
    }

    /// Runs `f` on the controller without waiting for it (from a plain
    /// thread).
    pub fn post_blocking(&self, f: impl FnOnce(&mut Ctl) + Send + 'static) {
        let work: Work = Box::new(move |a: &mut Actor| {
            f(&mut a.ctl);
            a.settle();
        });
        let _ = self.tx.blocking_send(work);
    }

    /// Runs `f` on the controller without waiting for it.
    pub async fn post(&self, f: impl FnOnce(&mut Ctl) + Send + 'static) {
        let work: Work = Box::new(move |a: &mut Actor| {
            f(&mut a.ctl);
            a.settle();
        });
        let _ = self.tx.send(work).await;
    }

    /// Ends the actor after the work already queued (what the controller
    /// left behind is settled first). Join its thread for the controller.
    pub async fn stop(&self) {
        let work: Work = Box::new(|a: &mut Actor| {
            a.settle();
            a.stopping = true;
        });
        let _ = self.tx.send(work).await;
    }
}
