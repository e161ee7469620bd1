//! The pool's threads kept awake for one forward pass: its parallel regions without rayon's
//! sleeping and waking between them.
//!
//! A decode step has about 150 parallel regions (five a layer) and a turn as many, most of them
//! a few tens of microseconds of work. Through rayon each region is a hand-off to the other
//! workers (jobs pushed, stolen and joined), which may have gone to sleep since the last one:
//! waking one (a futex, and in a virtual machine an interrupt to a halted vCPU) costs about as
//! much as a small region's work.
//! [`with_team`] runs a forward pass with the pool's other workers spinning between its regions
//! instead, and [`for_each`] hands a region's items to them: the items cut in order into runs,
//! each thread claims the next unclaimed run, and a thread that is late or slowed (its core
//! busy elsewhere, or its virtual CPU descheduled) takes fewer runs. Items of equal work (a
//! prompt's matmul blocks of rows, a gated activation's rows) are cut into up to
//! [`RUNS_PER_THREAD`] runs a thread, so the threads finish a region within a small run of
//! each other; many small ones (a turn's matmul panels) into runs that shrink as the region
//! goes on ([`Cut::Guided`]); attention's tasks, cut so that one run per thread is equal
//! work, are cut that way ([`Cut::PerThread`]).
//!
//! Measured on Zen 1, 2 threads, SmolLM2 Q4_1, against one run per thread for every region
//! (throwaway loops, the two builds alternated): on an idle machine a decode step after 512
//! tokens is unchanged (medians 19.7-20.2 ms, 19.4-20.7 before; five alternations); with one
//! core kept busy by another process, its median went from 39.5-43.4 to 36.1-37.3 ms (three).
//! Prefilling 1,024 tokens: the threads' waiting fell from 9.0% to 4.0% of `perf` samples,
//! and the prefill took 5.2-5.3 s against 5.2-6.7 (four alternations).
//!
//! Measured on Zen 4, 2 threads, against the same kernels through rayon (a loop of loads and
//! 16-token turns after 2,048 tokens of SmolLM2, and one of decode steps, the two builds
//! alternated five and three times on a quiet host): the turn 46.6 -> 44.8 ms median at
//! AVX-512 and 53.0 -> 51.8 at AVX2, a decode step after 2,048 tokens 9.1 -> 8.6 ms.
//!
//! Which thread computes an item never changes its result (every kernel's result is its own
//! item's, in a fixed order), so a team changes no bit.
//!
//! `unsafe` here, and only here outside the `x86` module: a region's items borrow the caller's
//! stack, and the team's helper threads outlive the region (see [`Team::run`]'s safety
//! argument).

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;

/// A region's items as the helpers see them: the function with its lifetime erased (valid
/// while the region is unfinished, see [`Team::run`]), how the items are cut into runs, and
/// the region's number.
#[derive(Clone, Copy)]
struct Region {
    epoch: u32,
    runs: Runs,
    f: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: the pointee is `Sync` (a shared reference to it may cross threads), and a helper
// only calls it while the region is unfinished (see `Team::run`).
unsafe impl Send for Region {}

/// The state one forward pass's threads share.
struct Team {
    /// Threads in the team, the caller's included.
    threads: usize,
    /// The current region's number (high 32 bits) and its next unclaimed run (low 32).
    /// Claiming is a compare-and-swap of both, so a run is only ever claimed in its region.
    state: AtomicU64,
    /// The current region's items, written by the calling thread before it publishes
    /// `state`.
    region: Mutex<Option<Region>>,
    /// Runs of the current region finished.
    done: AtomicUsize,
    /// Set when the pass ends: helpers return.
    stop: AtomicBool,
    /// The first panic of a helper's run, for the calling thread to resume.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

thread_local! {
    /// The team whose forward pass this thread runs, while [`with_team`] runs it.
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

/// Runs `body` (a forward pass) on a worker of rayon's pool with the pool's other workers as
/// its team: [`for_each`] called from `body` shares its items with them. With one thread, or
/// inside another team's pass, `body` just runs.
pub(crate) fn with_team<R: Send>(body: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || !CURRENT.get().is_null() {
        return rayon::scope(|_| body());
    }
    let team = Team {
        threads: helpers + 1,
        state: AtomicU64::new(0),
        region: Mutex::new(None),
        done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        panic: Mutex::new(None),
    };
    let result = rayon::scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| team.help());
        }
        CURRENT.set(&team);
        let result = panic::catch_unwind(AssertUnwindSafe(body));
        CURRENT.set(std::ptr::null());
        // Before the scope waits for the helpers: they return once they see it.
        team.stop.store(true, Ordering::Release);
        result
    });
    result.unwrap_or_else(|p| panic::resume_unwind(p))
}

/// Runs a team's thread claims a region's items in, at most, for items of equal work: small
/// enough that a thread slowed for part of a region leaves the other threads little to wait
/// for, few enough that claiming them (an atomic operation on a line the threads share) costs
/// nothing measurable against a region's tens of microseconds.
const RUNS_PER_THREAD: usize = 4;

/// How a region's items are cut into the runs a team's threads claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Items of about equal work: up to [`RUNS_PER_THREAD`] runs a thread.
    Equal,
    /// Items cut so that one run a thread, in order, is equal work (a decode step's or a
    /// turn's attention tasks): one run a thread.
    PerThread,
    /// Many small items of about equal work (a quantized matmul's panels of a few weight
    /// rows): runs that shrink as the region goes on, each a `2 * threads`-th of the items
    /// left, so that the threads finish within about one item of each other after a few
    /// claims each (see `matmul::dequant_parts`, which uses them).
    Guided,
}

/// How a region's items `0..items` are cut, in order, into the runs threads claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runs {
    /// `count` runs of equal length (to within one item).
    Equal { items: usize, count: usize },
    /// Each run a `parts`-th of the items not in an earlier run (at least one).
    Guided { items: usize, parts: usize },
}

impl Runs {
    fn new(items: usize, threads: usize, cut: Cut) -> Runs {
        match cut {
            Cut::Equal => Runs::Equal {
                items,
                count: (threads * RUNS_PER_THREAD).min(items),
            },
            Cut::PerThread => Runs::Equal {
                items,
                count: threads.min(items),
            },
            Cut::Guided => Runs::Guided {
                items,
                parts: 2 * threads,
            },
        }
    }

    /// The number of runs.
    fn count(self) -> usize {
        match self {
            Runs::Equal { count, .. } => count,
            Runs::Guided { items, parts } => {
                let (mut start, mut runs) = (0, 0);
                while start < items {
                    start = guided_end(start, items, parts);
                    runs += 1;
                }
                runs
            }
        }
    }

    /// The items of run `r`.
    fn run(self, r: usize) -> std::ops::Range<usize> {
        match self {
            Runs::Equal { items, count } => r * items / count..(r + 1) * items / count,
            Runs::Guided { items, parts } => {
                let start = (0..r).fold(0, |s, _| guided_end(s, items, parts));
                start..guided_end(start, items, parts)
            }
        }
    }
}

/// The end of the guided run that starts at `start` (see [`Runs::Guided`]).
fn guided_end(start: usize, items: usize, parts: usize) -> usize {
    start + (items - start).div_ceil(parts).max(1)
}

/// Calls `f(i)` for every `i` in `0..items`, in parallel: on the current team when this
/// thread runs one's pass, else on rayon's pool. Returns when every call has returned; a
/// panic in one is resumed here. The items are cut in order into runs as `cut` says,
/// claimed as threads come free.
pub(crate) fn for_each(items: usize, cut: Cut, f: impl Fn(usize) + Sync) {
    let team = CURRENT.get();
    if team.is_null() {
        (0..items).into_par_iter().for_each(&f);
        return;
    }
    // SAFETY: `CURRENT` holds a team only while `with_team`, which owns it, runs its body on
    // this thread.
    let team = unsafe { &*team };
    team.run(Runs::new(items, team.threads, cut), &f);
}

/// [`for_each`] over the chunks of `data` (`size` long, the last shorter), items of about
/// equal work: `f(c, chunk)`.
pub(crate) fn for_each_chunk<T: Send>(
    data: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    for_each_chunk_cut(data, size, Cut::Equal, f);
}

/// [`for_each_chunk`] with the chunks cut into runs as `cut` says.
pub(crate) fn for_each_chunk_cut<T: Send>(
    data: &mut [T],
    size: usize,
    cut: Cut,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunks: Vec<Mutex<&mut [T]>> = data.chunks_mut(size.max(1)).map(Mutex::new).collect();
    for_each(chunks.len(), cut, |c| f(c, &mut lock(&chunks[c])));
}

/// [`for_each_chunk`] over two slices cut alike into as many chunks: `f(c, a_chunk,
/// b_chunk)` for the chunks both have.
pub(crate) fn for_each_chunk2<T: Send, U: Send>(
    a: &mut [T],
    a_size: usize,
    b: &mut [U],
    b_size: usize,
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    let chunks: Vec<Mutex<(&mut [T], &mut [U])>> = a
        .chunks_mut(a_size.max(1))
        .zip(b.chunks_mut(b_size.max(1)))
        .map(Mutex::new)
        .collect();
    for_each(chunks.len(), Cut::Equal, |c| {
        let mut pair = lock(&chunks[c]);
        let (a, b) = &mut *pair;
        f(c, a, b)
    });
}

/// [`for_each`] over blocks of columns of `y`, a row-major matrix `n` wide, cut as
/// [`Cut::Guided`]: `f(c, columns)` for each block `c` of `blocks` (in order, none
/// overlapping), whose columns only that call writes. For outputs whose items are column
/// blocks of every row (a matmul's panels of weight rows), which chunks of `y` cannot hand
/// out.
///
/// # Panics
/// If `y` is not a whole number of rows, or the blocks are out of order, overlap or reach
/// past `n`.
pub(crate) fn for_each_columns(
    y: &mut [f32],
    n: usize,
    blocks: &[std::ops::Range<usize>],
    f: impl Fn(usize, Columns<'_>) + Sync,
) {
    let m = y.len().checked_div(n).unwrap_or(0);
    assert_eq!(y.len(), m * n, "column blocks of a matrix {n} wide");
    let mut end = 0;
    for b in blocks {
        assert!(
            end <= b.start && b.start <= b.end,
            "column blocks in order, apart"
        );
        end = b.end;
    }
    assert!(end <= n, "column blocks inside the matrix");
    let base = SharedRows(y.as_mut_ptr());
    let base = &base;
    for_each(blocks.len(), Cut::Guided, move |c| {
        f(
            c,
            Columns {
                base: base.0,
                m,
                n,
                start: blocks[c].start,
                width: blocks[c].len(),
                _rows: std::marker::PhantomData,
            },
        )
    });
}

/// The start of a matrix whose column blocks are written by several threads (see
/// [`for_each_columns`]).
struct SharedRows(*mut f32);

// SAFETY: the threads that share it write disjoint column blocks (see `Columns::write`).
unsafe impl Sync for SharedRows {}

/// Columns `start..start + width` of every row of an `[m, n]` row-major matrix, which only the
/// holder of this value writes while [`for_each_columns`] runs.
pub(crate) struct Columns<'a> {
    base: *mut f32,
    m: usize,
    n: usize,
    start: usize,
    width: usize,
    _rows: std::marker::PhantomData<&'a mut [f32]>,
}

impl Columns<'_> {
    /// The first column.
    pub(crate) fn start(&self) -> usize {
        self.start
    }

    /// The number of columns.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Writes `block`, `[rows, width]` row-major, into the columns.
    ///
    /// # Panics
    /// If `block` is not `rows * width` long.
    pub(crate) fn write(&mut self, block: &[f32]) {
        assert_eq!(block.len(), self.m * self.width, "a column block's values");
        for (i, row) in block.chunks_exact(self.width).enumerate() {
            // SAFETY: `i < m` and `start + width <= n`, so the run is inside the `[m, n]`
            // matrix `for_each_columns` borrows mutably until every block is written; the
            // blocks do not overlap (checked there) and each is written through its own
            // `Columns` only (one per item, and each item is called once), so no two threads
            // write the same values and nothing reads them meanwhile; `row` is in another
            // buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    row.as_ptr(),
                    self.base.add(i * self.n + self.start),
                    self.width,
                );
            }
        }
    }
}

/// A chunk's lock: each is taken once, by the item that owns it, so it is never contended;
/// poisoned only if that item panicked, whose panic is resumed anyway.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Team {
    /// Runs the items of `f` on the team, this thread included, cut into `runs`.
    fn run(&self, schedule: Runs, f: &(dyn Fn(usize) + Sync)) {
        let runs = schedule.count();
        if runs <= 1 {
            (0..runs).flat_map(|r| schedule.run(r)).for_each(f);
            return;
        }
        let epoch = (self.state.load(Ordering::Relaxed) >> 32) as u32 + 1;
        // SAFETY: only the lifetime is erased. A helper calls `f` only in a run it claimed in
        // this region (`claim` checks the region's number and the run count in one
        // compare-and-swap), and this function returns only once every run of the region has
        // been claimed and finished (`done == runs`, below), so no call of `f` outlives this
        // frame; after that no claim of this region can succeed (its next run is `runs`), and
        // the next region has another number.
        let f_static: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        *lock(&self.region) = Some(Region {
            epoch,
            runs: schedule,
            f: f_static,
        });
        self.done.store(0, Ordering::Relaxed);
        self.state.store(u64::from(epoch) << 32, Ordering::Release);
        let mut panicked = None;
        while let Some(r) = self.claim(epoch, runs) {
            if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| schedule.run(r).for_each(f))) {
                panicked.get_or_insert(p);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
        while self.done.load(Ordering::Acquire) < runs {
            std::hint::spin_loop();
        }
        let helper_panic = lock(&self.panic).take();
        if let Some(p) = panicked.or(helper_panic) {
            panic::resume_unwind(p);
        }
    }

    /// Claims the next run of region `epoch`, if that is still the region and a run is left.
    fn claim(&self, epoch: u32, runs: usize) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let next = (s & u64::from(u32::MAX)) as usize;
            if (s >> 32) as u32 != epoch || next >= runs {
                return None;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(next),
                Err(now) => s = now,
            }
        }
    }

    /// A helper: spins until a region is published, takes runs until none is left, and
    /// again, until the pass ends.
    fn help(&self) {
        let mut finished = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            let epoch = (self.state.load(Ordering::Acquire) >> 32) as u32;
            if epoch == finished {
                std::hint::spin_loop();
                continue;
            }
            let Some(region) = *lock(&self.region) else {
                continue;
            };
            if region.epoch == epoch {
                let runs = region.runs.count();
                while let Some(r) = self.claim(epoch, runs) {
                    // SAFETY: claimed in its region, which is unfinished until this call
                    // returns and `done` counts it (see `run`).
                    let f = unsafe { &*region.f };
                    let items = region.runs.run(r);
                    if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| items.for_each(f))) {
                        lock(&self.panic).get_or_insert(p);
                    }
                    self.done.fetch_add(1, Ordering::AcqRel);
                }
            }
            finished = epoch;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
    }

    #[test]
    fn every_item_runs_once_in_every_region() {
        for threads in [1, 2, 4] {
            pool(threads).install(|| {
                let counts: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
                let threads_seen = Mutex::new(std::collections::HashSet::new());
                with_team(|| {
                    // Many regions of several sizes, as a forward pass runs them.
                    for round in 0..300 {
                        let items = [0, 1, 2, 8, 97][round % 5];
                        for_each(items, Cut::Equal, |i| {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                            lock(&threads_seen).insert(std::thread::current().id());
                        });
                    }
                });
                let want = |i: usize| (0..300).filter(|r| i < [0, 1, 2, 8, 97][r % 5]).count();
                for (i, c) in counts.iter().enumerate() {
                    assert_eq!(
                        c.load(Ordering::Relaxed),
                        want(i),
                        "{threads} threads, item {i}"
                    );
                }
                assert!(lock(&threads_seen).len() <= threads);
            });
        }
    }

    #[test]
    fn chunks_are_handed_out_whole_and_once() {
        pool(3).install(|| {
            let mut data = vec![0u32; 1000];
            let mut other = vec![0u8; 70];
            with_team(|| {
                for_each_chunk(&mut data, 64, |c, chunk| {
                    for (j, v) in chunk.iter_mut().enumerate() {
                        *v += (c * 64 + j) as u32;
                    }
                });
                for_each_chunk2(&mut data, 100, &mut other, 7, |c, a, b| {
                    a.iter_mut().for_each(|v| *v += 1);
                    b.iter_mut().for_each(|v| *v = c as u8);
                });
            });
            assert!(data.iter().enumerate().all(|(i, &v)| v == i as u32 + 1));
            assert!(other.iter().enumerate().all(|(i, &v)| v == (i / 7) as u8));
        });
    }

    #[test]
    fn a_panicking_item_reaches_the_caller_and_the_team_stops() {
        for threads in [2, 4] {
            pool(threads).install(|| {
                for bad in [0, 13, 63] {
                    let ran = AtomicUsize::new(0);
                    let result = panic::catch_unwind(AssertUnwindSafe(|| {
                        with_team(|| {
                            for_each(64, Cut::Equal, |i| {
                                ran.fetch_add(1, Ordering::Relaxed);
                                assert_ne!(i, bad, "item {i} fails");
                            });
                        })
                    }));
                    let message = result.expect_err("the item's panic");
                    let text = message.downcast_ref::<String>().map(String::as_str);
                    assert!(text.is_some_and(|t| t.contains(&format!("item {bad} fails"))));
                    // The region's other runs finished before the panic came back.
                    assert!(ran.load(Ordering::Relaxed) > bad % 32);
                }
                // The pool is free again: a new pass runs.
                let sum = AtomicUsize::new(0);
                with_team(|| for_each(10, Cut::Equal, |i| _ = sum.fetch_add(i, Ordering::Relaxed)));
                assert_eq!(sum.load(Ordering::Relaxed), 45);
            });
        }
    }

    #[test]
    fn a_slowed_thread_takes_fewer_runs_of_equal_items() {
        pool(2).install(|| {
            let by_slow = AtomicUsize::new(0);
            with_team(|| {
                let caller = std::thread::current().id();
                for_each(8, Cut::Equal, |_| {
                    if std::thread::current().id() == caller {
                        by_slow.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                });
            });
            // One run a thread would have given the pass's own thread four of the eight.
            let n = by_slow.load(Ordering::Relaxed);
            assert!((1..4).contains(&n), "the slowed thread ran {n} of 8 items");
        });
    }

    #[test]
    fn per_thread_items_are_cut_into_one_run_a_thread() {
        pool(2).install(|| {
            let mut ran_on = vec![None; 6];
            with_team(|| {
                for_each_chunk_cut(&mut ran_on, 1, Cut::PerThread, |_, t| {
                    t[0] = Some(std::thread::current().id());
                });
            });
            // Runs 0..3 and 3..6, each on one thread.
            assert!(ran_on[..3].iter().all(|t| *t == ran_on[0]), "{ran_on:?}");
            assert!(ran_on[3..].iter().all(|t| *t == ran_on[3]), "{ran_on:?}");
        });
    }

    #[test]
    fn guided_runs_shrink_and_cover_every_item_once() {
        for (items, threads) in [(0, 2), (1, 2), (7, 2), (171, 2), (1000, 4), (5, 8)] {
            let runs = Runs::new(items, threads, Cut::Guided);
            let ranges: Vec<_> = (0..runs.count()).map(|r| runs.run(r)).collect();
            let mut next = 0;
            for r in &ranges {
                assert_eq!(
                    r.start, next,
                    "{items} items, {threads} threads: {ranges:?}"
                );
                assert!(
                    !r.is_empty(),
                    "{items} items, {threads} threads: {ranges:?}"
                );
                next = r.end;
            }
            assert_eq!(next, items, "{items} items, {threads} threads: {ranges:?}");
            // Each run a `2 * threads`-th of what is left: never longer than the one before.
            assert!(
                ranges.windows(2).all(|w| w[0].len() >= w[1].len()),
                "{ranges:?}"
            );
            if items >= 4 * threads {
                assert_eq!(ranges[0].len(), items.div_ceil(2 * threads), "{ranges:?}");
                assert_eq!(ranges.last().map(|r| r.len()), Some(1), "{ranges:?}");
            }
        }
        pool(2).install(|| {
            let counts: Vec<AtomicUsize> = (0..171).map(|_| AtomicUsize::new(0)).collect();
            with_team(|| {
                for _ in 0..50 {
                    for_each(171, Cut::Guided, |i| {
                        _ = counts[i].fetch_add(1, Ordering::Relaxed)
                    });
                }
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 50));
        });
    }

    #[test]
    fn column_blocks_are_written_whole_and_alone() {
        pool(3).install(|| {
            let (m, n) = (5, 40);
            let mut y = vec![-1.0f32; m * n];
            // Blocks of 12 with a gap at columns 24..26, and a narrower last one.
            let blocks = [0..12, 12..24, 26..38, 38..40];
            with_team(|| {
                for_each_columns(&mut y, n, &blocks, |c, mut cols| {
                    assert_eq!(
                        (cols.start(), cols.width()),
                        (blocks[c].start, blocks[c].len())
                    );
                    let block: Vec<f32> = (0..m * cols.width())
                        .map(|v| (v / cols.width() * 100 + cols.start() + v % cols.width()) as f32)
                        .collect();
                    cols.write(&block);
                });
            });
            for i in 0..m {
                for j in 0..n {
                    let want = if (24..26).contains(&j) {
                        -1.0
                    } else {
                        (i * 100 + j) as f32
                    };
                    assert_eq!(y[i * n + j], want, "row {i} column {j}");
                }
            }
        });
    }

    #[test]
    #[should_panic(expected = "column blocks in order, apart")]
    fn overlapping_column_blocks_are_refused() {
        let mut y = vec![0.0f32; 2 * 10];
        for_each_columns(&mut y, 10, &[0..6, 5..10], |_, _| {});
    }

    #[test]
    #[should_panic(expected = "column blocks inside the matrix")]
    fn column_blocks_past_the_matrix_are_refused() {
        let mut y = vec![0.0f32; 2 * 10];
        for_each_columns(&mut y, 10, &[0..6, 6..11], |_, _| {});
    }

    #[test]
    fn outside_a_pass_and_inside_a_nested_one_items_still_run() {
        pool(2).install(|| {
            let sum = AtomicUsize::new(0);
            for_each(10, Cut::Equal, |i| _ = sum.fetch_add(i, Ordering::Relaxed));
            with_team(|| {
                with_team(|| for_each(10, Cut::Equal, |i| _ = sum.fetch_add(i, Ordering::Relaxed)))
            });
            assert_eq!(sum.load(Ordering::Relaxed), 90);
        });
    }
}
