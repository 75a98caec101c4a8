//! The device thread: waits (epoll) on every queue's ioeventfd and every
//! backend fd (tap), and runs the device work they stand for, so the vCPU
//! threads never block on device I/O when KVM has ioeventfd. It can be
//! paused (no device touches guest memory until resumed) and stopped.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::pci::VirtioPciDevice;

/// A virtio device shared between vCPU threads and the event loop.
pub type SharedVirtio = Arc<Mutex<VirtioPciDevice>>;

enum Source {
    Control,
    Queue(SharedVirtio, usize, EventFd),
    Backend(SharedVirtio),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct Control {
    state: Mutex<(Wanted, bool)>,
    changed: Condvar,
}

/// The running device thread of one boot.
#[derive(Debug)]
pub struct EventLoop {
    wake: EventFd,
    control: Arc<Control>,
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
        let wake = EventFd::new(EFD_NONBLOCK).map_err(StartEventLoopError::Setup)?;
        let mut sources = vec![Source::Control];
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
        add(wake.as_raw_fd(), EventSet::IN, 0)?;
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
        let control = Arc::new(Control {
            state: Mutex::new((Wanted::Run, false)),
            changed: Condvar::new(),
        });
        let wake_loop = wake.try_clone().map_err(StartEventLoopError::Setup)?;
        let ctl = control.clone();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .stack_size(256 * 1024)
            .spawn(move || run(epoll, sources, wake_loop, ctl))
            .map_err(StartEventLoopError::Setup)?;
        Ok(Self {
            wake,
            control,
            thread: Some(thread),
        })
    }

    fn set(&self, w: Wanted) {
        self.control
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0 = w;
        self.control.changed.notify_all();
        let _ = self.wake.write(1);
    }

    /// Stops device work and waits until the thread is parked.
    pub fn pause(&self) {
        self.set(Wanted::Pause);
        let mut st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        while !st.1 && self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            st = self
                .control
                .changed
                .wait_timeout(st, std::time::Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets device work continue.
    pub fn resume(&self) {
        self.set(Wanted::Run);
    }

    /// Stops and joins the thread.
    pub fn stop(mut self) {
        self.set(Wanted::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Handles a control wake-up; false when the loop must end.
fn control(wake: &EventFd, ctl: &Control, sources: &[Source]) -> bool {
    let _ = wake.read();
    let mut st = ctl.state.lock().unwrap_or_else(|e| e.into_inner());
    if st.0 != Wanted::Pause {
        return st.0 != Wanted::Stop;
    }
    st.1 = true;
    ctl.changed.notify_all();
    while st.0 == Wanted::Pause {
        st = ctl.changed.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.1 = false;
    let go_on = st.0 != Wanted::Stop;
    drop(st);
    if go_on {
        // A backend edge may have been taken with the wake-up: look again.
        for s in sources {
            if let Source::Backend(dev) = s {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .backend_ready();
            }
        }
    }
    go_on
}

fn run(epoll: Epoll, sources: Vec<Source>, wake: EventFd, ctl: Arc<Control>) {
    crate::sandbox::seccomp::install_or_exit(crate::sandbox::seccomp::ThreadKind::Devices);
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
        let batch = &events[..n];
        // Control first: after a pause, the rest of the batch waits for the
        // resume.
        if batch.iter().any(|e| e.data() == 0) && !control(&wake, &ctl, &sources) {
            return;
        }
        for ev in batch {
            match usize::try_from(ev.data()).ok().and_then(|i| sources.get(i)) {
                Some(Source::Control) | None => {}
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
