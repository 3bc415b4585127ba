//! A small pool of threads that stay hot between the products of a forward pass.
//!
//! A one-token product reads a few MB of weights in ~100 µs; waking a sleeping rayon
//! worker for it can cost as much (measured on 2-core VMs: a 2 MB `dot_rows` split over
//! two threads ran at half the speed of one thread). The helpers here spin (yielding) for
//! a while after each job before they sleep, so the products of one step find them awake.
//! A job is a part count and a function of the part index; parts are taken from a shared
//! counter (which thread runs a part never changes what it computes). One job runs at a
//! time; a caller that finds the pool busy runs its parts itself.
//!
//! A forward pass driven from a thread outside rayon (the engine's, a bench's) runs every
//! parallel step here: products, a prompt's elementwise steps (`for_each_row`), experts and
//! attention units (`map_items`, `map`). The driving thread works as one of the pool, and
//! its helpers stay awake from one step to the next. Handing steps to rayon instead (as
//! prompts did before) put the driving thread to sleep and woke it at every step, with
//! rayon's workers and these helpers spinning against each other on the same cores: on a
//! 2-core Zen 5 VM, prefills of 128 tokens (bf16, 3 alternating rounds, medians of 30)
//! read 1609, 1819, 1568 tokens/s through rayon and 1958, 2235, 1910 here (that build also
//! dropped a 1 KB copy from the bf16 tiles' sums, ~4% of the samples of a profile). From a
//! rayon worker, the same steps go to rayon (the worker's siblings already share the cores).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// The function of a job with its borrow erased (see `run`).
type PartFn = *const (dyn Fn(usize) + Sync + 'static);

struct Job {
    f: PartFn,
    parts: usize,
    next: AtomicUsize,
    remaining: AtomicUsize,
    /// A part panicked (its panic is caught where it ran; `run` then panics).
    panicked: AtomicBool,
}

// SAFETY: `f` points to a `Sync` closure that `run` keeps alive until every part has
// finished (it waits for `remaining == 0`); after that no part index is handed out, so the
// pointer is never dereferenced again by a thread holding an old `Job`.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Takes and runs parts until none is left.
    fn work(&self) {
        loop {
            let p = self.next.fetch_add(1, Ordering::Relaxed);
            if p >= self.parts {
                return;
            }
            // SAFETY: part `p` is not finished, so `run` has not returned and `f` is alive.
            let f = unsafe { &*self.f };
            // A panicking part still counts as finished, so that no thread waits forever.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(p))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.remaining.fetch_sub(1, Ordering::Release);
        }
    }
}

struct Pool {
    helpers: usize,
    generation: AtomicUsize,
    job: Mutex<Option<Arc<Job>>>,
    busy: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let helpers = rayon::current_num_threads().saturating_sub(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            helpers,
            generation: AtomicUsize::new(0),
            job: Mutex::new(None),
            busy: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("expertmesh-hot-{i}"))
                .spawn(move || helper(pool));
            if spawned.is_err() {
                // Without helpers the callers run every part themselves.
                break;
            }
        }
        pool
    })
}

fn helper(pool: &'static Pool) {
    let mut seen = pool.generation.load(Ordering::Acquire);
    loop {
        let since = Instant::now();
        let mut spins = 0u32;
        while pool.generation.load(Ordering::Acquire) == seen {
            spins += 1;
            if spins.is_multiple_of(64) {
                if since.elapsed() > SPIN {
                    let guard = pool.sleep.lock().unwrap_or_else(|e| e.into_inner());
                    if pool.generation.load(Ordering::Acquire) == seen {
                        // Bounded, as a guard: `run` notifies under the same lock.
                        let _ = pool.wake.wait_timeout(guard, Duration::from_millis(5));
                    }
                } else {
                    std::thread::yield_now();
                }
            } else {
                std::hint::spin_loop();
            }
        }
        seen = pool.generation.load(Ordering::Acquire);
        let job = pool.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

/// Runs `f(0)`, …, `f(parts - 1)` on this thread and the hot helpers, returning when all
/// are done. A part that panics leaves the pool usable, and this call then panics too (as a
/// rayon fork would).
pub fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    // A rayon worker shares the cores with its siblings already: waking a helper too would
    // put more threads than cores on them (and leave the helper spinning after).
    if parts <= 1 || pool.helpers == 0 || !off_rayon() || pool.busy.swap(true, Ordering::Acquire) {
        (0..parts).for_each(f);
        return;
    }
    // SAFETY: only the lifetime is erased; this function does not return before every
    // part has run (`remaining == 0` below), and `Job::work` hands out no part after that.
    let erased: PartFn = unsafe {
        std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), PartFn>(
            f as *const (dyn Fn(usize) + Sync),
        )
    };
    let job = Arc::new(Job {
        f: erased,
        parts,
        next: AtomicUsize::new(0),
        remaining: AtomicUsize::new(parts),
        panicked: AtomicBool::new(false),
    });
    *pool.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
    pool.generation.fetch_add(1, Ordering::Release);
    // A helper between its check and its wait holds `sleep`: taking it here means every
    // helper either sees the new generation or is waiting and gets the notification.
    drop(pool.sleep.lock().unwrap_or_else(|e| e.into_inner()));
    pool.wake.notify_all();
    job.work();
    let mut spins = 0u32;
    while job.remaining.load(Ordering::Acquire) != 0 {
        spins += 1;
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    *pool.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    pool.busy.store(false, Ordering::Release);
    if job.panicked.load(Ordering::Relaxed) {
        panic!("a part of a parallel product panicked");
    }
}

/// `f(0)`, …, `f(parts - 1)` through `run`, in part order.
pub fn map<T: Send>(parts: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..parts).map(|_| Mutex::new(None)).collect();
    run(parts, &|p| {
        let value = f(p);
        *slots[p].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every part ran")
        })
        .collect()
}

/// `f` over `items`, in order: a single item runs on this thread (a rayon fork from
/// outside the pool would wake a worker and block this thread for it); more go to the hot
/// helpers from the driving thread, to rayon from a rayon worker.
pub fn map_items<I: Send, R: Send>(items: Vec<I>, f: impl Fn(I) -> R + Sync + Send) -> Vec<R> {
    use rayon::prelude::*;
    match items.len() {
        0 | 1 => items.into_iter().map(f).collect(),
        n if off_rayon() => {
            let items: Vec<Mutex<Option<I>>> =
                items.into_iter().map(|i| Mutex::new(Some(i))).collect();
            map(n, |p| {
                let item = items[p].lock().unwrap_or_else(|e| e.into_inner()).take();
                f(item.expect("each part takes its own item once"))
            })
        }
        _ => items.into_par_iter().map(f).collect(),
    }
}

/// `a` and `b`, each free to split over the cores: one after the other on the driving thread
/// (each then has the hot helpers to itself), side by side from a rayon worker.
pub fn join<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    match off_rayon() {
        true => (a(), b()),
        false => rayon::join(a, b),
    }
}

/// The fewest values an elementwise step over many tokens' rows (a norm, an activation,
/// RoPE) must hold before its rows go over the cores rather than run in place: a
/// prompt's steps are worth the fork, a decode step's are not.
pub const SPLIT_VALUES_MIN: usize = 1 << 16;

/// Runs `f` on each `dim`-long row of `x` with the row's index, over the cores where `x`
/// holds at least `SPLIT_VALUES_MIN` values (the driving thread would otherwise run a
/// prompt's norms and activations while the other cores wait). Each row's result depends on
/// that row alone, so the split never changes a bit.
pub fn for_each_row(x: &mut [f32], dim: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    use rayon::prelude::*;
    if x.is_empty() {
        // No rows (a batch of no tokens): nothing to run, whatever `dim` is.
        return;
    }
    if x.len() >= SPLIT_VALUES_MIN && off_rayon() {
        // Runs of rows, a few a thread, taken from the hot helpers' counter.
        let rows = x.len() / dim;
        let per_part = rows.div_ceil(4 * threads()).max(1);
        let parts: Vec<Mutex<&mut [f32]>> = x.chunks_mut(per_part * dim).map(Mutex::new).collect();
        run(parts.len(), &|p| {
            let mut part = parts[p].lock().unwrap_or_else(|e| e.into_inner());
            for (i, row) in part.chunks_exact_mut(dim).enumerate() {
                f(p * per_part + i, row);
            }
        });
    } else if x.len() >= SPLIT_VALUES_MIN {
        x.par_chunks_exact_mut(dim)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        x.chunks_exact_mut(dim)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
}

/// The threads that `run` would spread parts over from this thread: every core from the
/// driving thread, only itself from a rayon worker (which runs its parts in place).
pub fn threads() -> usize {
    match off_rayon() {
        true => rayon::current_num_threads(),
        false => 1,
    }
}

/// Whether this thread drives the work itself (it is no rayon worker): small parallel
/// steps then go to the hot helpers; a rayon worker already shares the cores with its
/// siblings and runs them in place.
pub fn off_rayon() -> bool {
    rayon::current_thread_index().is_none()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// Below and past the split, every row is visited once, with its own index.
    #[test]
    fn for_each_row_visits_every_row_once_with_its_index() {
        for_each_row(&mut [], 0, |_, _| unreachable!("no rows"));
        for rows in [3, SPLIT_VALUES_MIN / 64 + 5] {
            let mut x = vec![0.0f32; rows * 64];
            for_each_row(&mut x, 64, |i, row| {
                row.iter_mut().for_each(|v| *v += i as f32)
            });
            for (i, row) in x.chunks_exact(64).enumerate() {
                assert!(row.iter().all(|&v| v == i as f32), "row {i} of {rows}");
            }
        }
    }

    /// A panicking part reaches the caller, and the pool keeps serving jobs.
    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_pool_goes_on() {
        let caught = std::panic::catch_unwind(|| {
            run(4, &|p| {
                if p == 3 {
                    panic!("part 3");
                }
            })
        });
        assert!(caught.is_err());
        let done = AtomicU64::new(0);
        run(4, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 4);
    }

    /// `map_items` and `join` give each item's result in order, from the driving thread
    /// (the hot helpers) and from a rayon worker (rayon).
    #[test]
    fn map_items_and_join_keep_order_on_either_side() {
        let check = || {
            let items: Vec<String> = (0..37).map(|i| format!("{i}")).collect();
            let lens = map_items(items.clone(), |s| s.parse::<usize>().expect("a number"));
            assert_eq!(lens, (0..37).collect::<Vec<_>>());
            assert_eq!(map_items(vec![7], |i| i + 1), vec![8]);
            assert!(map_items(Vec::<u8>::new(), |i| i).is_empty());
            assert_eq!(join(|| 1, || "b"), (1, "b"));
        };
        check();
        rayon::scope(|s| s.spawn(|_| check()));
    }

    #[test]
    fn map_keeps_part_order() {
        assert_eq!(map(5, |p| p * p), vec![0, 1, 4, 9, 16]);
        assert!(map(0, |p| p).is_empty());
    }

    /// Every part runs exactly once, from one caller or several at once (the pool then
    /// serves one and the others run their own parts).
    #[test]
    fn every_part_runs_once() {
        std::thread::scope(|s| {
            for c in 0..3u64 {
                s.spawn(move || {
                    for round in 0..200u64 {
                        let parts = 1 + (round % 7) as usize;
                        let hits: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
                        run(parts, &|p| {
                            hits[p].fetch_add(c + 1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == c + 1));
                    }
                });
            }
        });
    }
}
