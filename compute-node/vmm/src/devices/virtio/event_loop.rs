//! The device thread: waits (epoll) on every queue's ioeventfd and every
//! backend fd (tap), and runs the device work they stand for, so the vCPU
//! threads never block on device I/O when KVM has ioeventfd.

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::pci::VirtioPciDevice;

/// A virtio device shared between vCPU threads and the event loop.
pub type SharedVirtio = Arc<Mutex<VirtioPciDevice>>;

enum Source {
    Stop,
    Queue(SharedVirtio, usize, EventFd),
    Backend(SharedVirtio),
}

/// The running device thread of one boot.
#[derive(Debug)]
pub struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Starting the device thread failed.
#[derive(Debug, thiserror::Error)]
pub enum StartEventLoopError {
    /// epoll or eventfd setup.
    #[error("cannot set up the device event loop")]
    Setup(#[source] io::Error),
}

impl EventLoop {
    /// Watches `devices` from a new thread.
    pub fn start(devices: &[SharedVirtio]) -> Result<Self, StartEventLoopError> {
        let epoll = Epoll::new().map_err(StartEventLoopError::Setup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(StartEventLoopError::Setup)?;
        let mut sources = vec![Source::Stop];
        let add = |fd, events, token: usize| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(events, token as u64),
                )
                .map_err(StartEventLoopError::Setup)
        };
        use std::os::fd::AsRawFd;
        add(stop.as_raw_fd(), EventSet::IN, 0)?;
        for dev in devices {
            let d = dev.lock().unwrap_or_else(|e| e.into_inner());
            for (q, evt) in d.notify_eventfds() {
                add(evt.as_raw_fd(), EventSet::IN, sources.len())?;
                sources.push(Source::Queue(dev.clone(), q, evt));
            }
            if let Some(fd) = d.backend_fd() {
                add(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, sources.len())?;
                sources.push(Source::Backend(dev.clone()));
            }
        }
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .stack_size(256 * 1024)
            .spawn(move || run(epoll, sources))
            .map_err(StartEventLoopError::Setup)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and joins the thread.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(epoll: Epoll, sources: Vec<Source>) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("neph-vmm: device event loop failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match usize::try_from(ev.data()).ok().and_then(|i| sources.get(i)) {
                Some(Source::Stop) | None => return,
                Some(Source::Queue(dev, q, evt)) => {
                    let _ = evt.read();
                    dev.lock().unwrap_or_else(|e| e.into_inner()).notify(*q);
                }
                Some(Source::Backend(dev)) => {
                    dev.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .backend_ready();
                }
            }
        }
    }
}
