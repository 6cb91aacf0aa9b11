//! The compute threads: a fixed set that runs one closure at a time, all
//! together, and the tiles through which they write one output without
//! overlapping.
//!
//! The thread that calls [`ThreadPool::run`] is thread 0 and works too, so a
//! pool of `n` threads starts `n - 1`. Between runs the helpers spin for a
//! short while (the next operation of a forward pass follows within
//! microseconds), then park, so an idle worker uses no CPU.
//!
//! [`Tiles`] hands each tile of a row-major matrix to exactly one thread
//! (tile indices come from one atomic counter), which is what lets several
//! threads write one `&mut [T]` in safe code outside this module.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

type JobRef = *const (dyn Fn(usize) + Sync);

/// A fixed set of compute threads; see the module documentation.
pub struct ThreadPool {
    inner: Arc<Inner>,
    helpers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads())
            .finish()
    }
}

struct Inner {
    /// The closure of the current run. Written by the caller of `run` only
    /// while every helper waits for the next generation; read by helpers
    /// only after they see that generation.
    job: UnsafeCell<Option<JobRef>>,
    generation: AtomicUsize,
    /// Helpers that have not finished the current run.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is the only field that is not already Sync. It is written by
// `run` (which takes `&mut ThreadPool`, so one writer) only while `pending`
// is zero, i.e. no helper reads it, and each write is published to helpers
// by the SeqCst increment of `generation` that they load before reading it.
unsafe impl Sync for Inner {}
// SAFETY: the raw pointer in `job` refers to a `Sync` closure; sending the
// container between threads moves no closure state.
unsafe impl Send for Inner {}

impl ThreadPool {
    /// A pool of `threads` compute threads in all (at least 1), the caller
    /// of [`run`](Self::run) being one of them.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            job: UnsafeCell::new(None),
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut helpers = Vec::with_capacity(threads - 1);
        for index in 1..threads {
            let shared = Arc::clone(&inner);
            let handle = std::thread::Builder::new()
                .name(format!("compute-{index}"))
                .spawn(move || helper(&shared, index));
            match handle {
                Ok(handle) => helpers.push(handle),
                Err(e) => {
                    let pool = Self { inner, helpers };
                    drop(pool);
                    return Err(e);
                }
            }
        }
        Ok(Self { inner, helpers })
    }

    /// Threads in all, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Run `f(thread_index)` on every thread at once (the caller is index 0)
    /// and return when all calls have returned. A panic on any thread is
    /// raised again here, after every thread has finished.
    pub fn run(&mut self, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() {
            f(0);
            return;
        }
        let inner = &*self.inner;
        let job: *const (dyn Fn(usize) + Sync + '_) = f;
        // Only the lifetime is erased. The pointer is dereferenced by
        // helpers only between the generation bump below and their decrement
        // of `pending`, and `Wait` (also on unwinding) does not let this
        // function return before `pending` is zero, so `f` outlives every use.
        // SAFETY: only the lifetime changes, and `f` outlives every use.
        let job: JobRef = unsafe { std::mem::transmute(job) };
        // `pending` is zero (the previous run waited for it), so no
        // helper reads `job` now; `&mut self` makes this the only writer.
        // SAFETY: no helper reads `job` now and this is its only writer.
        unsafe { *inner.job.get() = Some(job) };
        inner.pending.store(self.helpers.len(), Ordering::Relaxed);
        inner.generation.fetch_add(1, Ordering::SeqCst);
        for (sleeping, handle) in inner.sleeping.iter().zip(&self.helpers) {
            if sleeping.load(Ordering::SeqCst) {
                handle.thread().unpark();
            }
        }
        let wait = Wait(inner);
        f(0);
        drop(wait);
        if inner.panicked.swap(false, Ordering::AcqRel) {
            panic!("a compute thread panicked");
        }
    }
}

/// Waits for the helpers of the current run, also while unwinding.
struct Wait<'a>(&'a Inner);

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let mut spins = 0u32;
        while self.0.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        for handle in &self.helpers {
            handle.thread().unpark();
        }
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}

fn helper(inner: &Inner, index: usize) {
    let sleeping = &inner.sleeping[index - 1];
    let mut seen = 0usize;
    loop {
        let mut idle_since: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            let generation = inner.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            if inner.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < SPIN {
                continue;
            }
            // Announce the sleep, then look once more: `run` bumps the
            // generation before it reads `sleeping` (both SeqCst), so either
            // it sees the flag and unparks, or this load sees the new run.
            sleeping.store(true, Ordering::SeqCst);
            if inner.generation.load(Ordering::SeqCst) == seen
                && !inner.shutdown.load(Ordering::SeqCst)
            {
                std::thread::park();
            }
            sleeping.store(false, Ordering::SeqCst);
        }
        // The generation this helper just saw was published after
        // `job` was written (see `run`), and `run` keeps the closure alive
        // until this helper decrements `pending` below.
        // SAFETY: `job` was published before this generation and lives until `pending` drops.
        let job = unsafe { *inner.job.get() };
        if let Some(job) = job {
            // SAFETY: as above: the closure is alive and `Sync`.
            let f = unsafe { &*job };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index)));
            if result.is_err() {
                inner.panicked.store(true, Ordering::Release);
            }
        }
        inner.pending.fetch_sub(1, Ordering::Release);
    }
}

/// A row-major matrix cut into tiles that threads take one at a time; each
/// tile goes to exactly one caller of [`next`](Self::next), so the tiles'
/// rows can be written from several threads at once.
pub struct Tiles<'a, T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    col_tiles: usize,
    count: usize,
    next: AtomicUsize,
    _data: PhantomData<&'a mut [T]>,
}

impl<T> std::fmt::Debug for Tiles<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiles")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("tile_rows", &self.tile_rows)
            .field("tile_cols", &self.tile_cols)
            .finish_non_exhaustive()
    }
}

// SAFETY: `Tiles` hands out disjoint parts of a `&mut [T]`, each to one
// thread (see `next`); sharing it is sharing that slice's elements one owner
// each, which needs `T: Send`, as `&mut [T]` does.
unsafe impl<T: Send> Sync for Tiles<'_, T> {}
// SAFETY: as for Sync: it is a `&mut [T]` in parts.
unsafe impl<T: Send> Send for Tiles<'_, T> {}

impl<'a, T> Tiles<'a, T> {
    /// Tiles of `tile_rows` x `tile_cols` over the first `rows * cols`
    /// elements of `data` (rows of `cols`); edge tiles are smaller. Tiles are
    /// numbered row-major: all column tiles of the first row tile, then the next.
    pub fn new(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        tile_rows: usize,
        tile_cols: usize,
    ) -> Self {
        let needed = rows.checked_mul(cols).expect("matrix size overflows");
        assert!(data.len() >= needed, "{} < {rows} x {cols}", data.len());
        let tile_rows = tile_rows.clamp(1, rows.max(1));
        let tile_cols = tile_cols.clamp(1, cols.max(1));
        let col_tiles = cols.div_ceil(tile_cols);
        let count = if rows == 0 || cols == 0 {
            0
        } else {
            rows.div_ceil(tile_rows) * col_tiles
        };
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            tile_rows,
            tile_cols,
            col_tiles,
            count,
            next: AtomicUsize::new(0),
            _data: PhantomData,
        }
    }

    /// The next tile no one has taken, or `None` when all are taken.
    pub fn next(&self) -> Option<Tile<'_, T>> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= self.count {
            // Keep the counter from creeping towards a wrap-around.
            self.next.store(self.count, Ordering::Relaxed);
            return None;
        }
        let (row_tile, col_tile) = (index / self.col_tiles, index % self.col_tiles);
        let r0 = row_tile * self.tile_rows;
        let c0 = col_tile * self.tile_cols;
        Some(Tile {
            tiles: self,
            rows: r0..(r0 + self.tile_rows).min(self.rows),
            cols: c0..(c0 + self.tile_cols).min(self.cols),
        })
    }
}

/// One tile of a [`Tiles`], owned by the thread that took it.
pub struct Tile<'t, T> {
    tiles: &'t Tiles<'t, T>,
    rows: Range<usize>,
    cols: Range<usize>,
}

impl<T> std::fmt::Debug for Tile<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tile")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl<T> Tile<'_, T> {
    /// The matrix rows the tile covers.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// The matrix columns the tile covers.
    pub fn cols(&self) -> Range<usize> {
        self.cols.clone()
    }

    /// The tile's part of matrix row `row` (a row the tile covers).
    pub fn row(&mut self, row: usize) -> &mut [T] {
        assert!(
            self.rows.contains(&row),
            "row {row} outside {:?}",
            self.rows
        );
        let start = row * self.tiles.cols + self.cols.start;
        // `start..start + cols.len()` lies inside the slice `Tiles`
        // borrowed (row < rows, cols within cols), and inside this tile. The
        // counter gives each tile index to one `Tile` only, tiles are
        // disjoint, and the returned borrow ties up `&mut self`, so no other
        // reference to these elements exists while it lives.
        // SAFETY: in bounds, and no other reference to these elements exists.
        unsafe { std::slice::from_raw_parts_mut(self.tiles.ptr.add(start), self.cols.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_once_per_run_and_the_caller_is_thread_zero() {
        for threads in [1, 2, 3, 5] {
            let mut pool = ThreadPool::new(threads).expect("pool");
            for _ in 0..200 {
                let seen: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
                let caller = std::thread::current().id();
                pool.run(&|t| {
                    seen[t].fetch_add(1, Ordering::Relaxed);
                    if t == 0 {
                        assert_eq!(std::thread::current().id(), caller);
                    }
                });
                assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn tiles_cover_the_matrix_once_across_threads() {
        let mut pool = ThreadPool::new(3).expect("pool");
        for (rows, cols, tr, tc) in [
            (7, 33, 2, 16),
            (1, 100, 1, 7),
            (64, 64, 64, 1),
            (5, 5, 9, 9),
        ] {
            let mut data = vec![0u32; rows * cols];
            let tiles = Tiles::new(&mut data, rows, cols, tr, tc);
            pool.run(&|_| {
                while let Some(mut tile) = tiles.next() {
                    for r in tile.rows() {
                        for v in tile.row(r) {
                            *v += 1;
                        }
                    }
                }
            });
            assert!(
                data.iter().all(|&v| v == 1),
                "{rows}x{cols} tiles {tr}x{tc}"
            );
        }
    }

    #[test]
    fn a_panic_on_a_helper_is_raised_in_the_caller_after_all_finish() {
        let mut pool = ThreadPool::new(2).expect("pool");
        let done = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|t| {
                if t == 1 {
                    panic!("helper fails");
                }
                std::thread::sleep(Duration::from_millis(20));
                done.fetch_add(1, Ordering::Relaxed);
            });
        }));
        assert!(result.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 1);
        // The pool still works afterwards.
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn parked_helpers_wake_for_the_next_run() {
        let mut pool = ThreadPool::new(2).expect("pool");
        std::thread::sleep(SPIN * 3);
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
