//! A small pool of parked worker threads owned by one cache (no global pool): the engine's
//! `n_threads` budget is the calling thread plus `n_threads - 1` workers, for attention and for
//! the quantization of flushed groups. A call hands every worker the same closure with its
//! thread index; workers spin briefly after a call (layers come back to back) and then park on a
//! condition variable.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(50);

type JobFn = dyn Fn(usize) + Sync;

#[derive(Clone, Copy)]
struct JobRef {
    /// Lifetime erased: [`Pool::run`] waits until every worker is done with it.
    f: *const JobFn,
    threads: usize,
}

// SAFETY: the closure is Sync and outlives every use (see `Pool::run`).
unsafe impl Send for JobRef {}

struct Slot {
    generation: usize,
    job: Option<JobRef>,
    shutdown: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    cv: Condvar,
    /// Mirrors `slot.generation` for spinning without the lock.
    generation: AtomicUsize,
    /// Workers still running the current call.
    pending: AtomicUsize,
    panicked: AtomicBool,
}

pub(crate) struct Pool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool of `workers` threads (thread indices `1..=workers`; the caller is index 0).
    /// `workers` parked threads, or the error of the first that could not be started.
    pub fn new(workers: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot { generation: 0, job: None, shutdown: false }),
            cv: Condvar::new(),
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        let mut pool = Pool { shared, handles: Vec::with_capacity(workers) };
        for tid in 1..=workers {
            let sh = pool.shared.clone();
            // On failure, dropping `pool` stops the threads already started.
            pool.handles
                .push(std::thread::Builder::new().name(format!("kivi-worker-{tid}")).spawn(move || worker(&sh, tid))?);
        }
        Ok(pool)
    }

    /// Threads a call may use: the workers and the caller.
    pub fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `f(0)` on the calling thread and `f(1)`..`f(threads - 1)` on workers, returning when
    /// all are done. Panics (after every thread is done) if any of them panicked.
    pub fn run<'f>(&self, threads: usize, f: &'f (dyn Fn(usize) + Sync + 'f)) {
        let threads = threads.clamp(1, self.threads());
        if threads == 1 {
            f(0);
            return;
        }
        let sh = &*self.shared;
        sh.pending.store(threads - 1, Ordering::SeqCst);
        // SAFETY: only the lifetime is changed; `Wait` below keeps `f` borrowed until every
        // worker that received it has finished (also when `f(0)` unwinds).
        let erased: *const JobFn = unsafe { std::mem::transmute::<&'f (dyn Fn(usize) + Sync + 'f), &'static JobFn>(f) };
        {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.generation = slot.generation.wrapping_add(1);
            slot.job = Some(JobRef { f: erased, threads });
            sh.generation.store(slot.generation, Ordering::Release);
        }
        sh.cv.notify_all();
        struct Wait<'a>(&'a Shared);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                // Spin while the workers finish their last items; yield after SPIN in case a
                // worker waits for this core (a machine busier than its thread budget).
                let t0 = Instant::now();
                let mut n = 0u32;
                while self.0.pending.load(Ordering::Acquire) != 0 {
                    n = n.wrapping_add(1);
                    if n % 64 != 0 || t0.elapsed() < SPIN {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
        let wait = Wait(sh);
        f(0);
        drop(wait);
        if sh.panicked.swap(false, Ordering::AcqRel) {
            panic!("a kivi worker thread panicked");
        }
    }
}

fn worker(sh: &Shared, tid: usize) {
    let mut seen = 0usize;
    loop {
        let t0 = Instant::now();
        let mut n = 0u32;
        while sh.generation.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            n += 1;
            if n % 64 == 0 && t0.elapsed() > SPIN {
                break;
            }
        }
        let job = {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            while slot.generation == seen && !slot.shutdown {
                slot = sh.cv.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
            if slot.shutdown {
                return;
            }
            seen = slot.generation;
            slot.job
        };
        if let Some(job) = job {
            if tid < job.threads {
                // SAFETY: `Pool::run` keeps the closure alive until `pending` reaches 0.
                let f = unsafe { &*job.f };
                if catch_unwind(AssertUnwindSafe(|| f(tid))).is_err() {
                    sh.panicked.store(true, Ordering::Release);
                }
                sh.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.shutdown = true;
        }
        self.shared.cv.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
