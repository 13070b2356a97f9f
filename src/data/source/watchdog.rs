//! The watchdog: third-party code run on a thread of its own ([`call_watched`] for one call,
//! [`Watched`] for an iterator), so that a stall or a panic becomes an error instead of a hang or a crash.

/// An iterator's items pulled on a thread of their own, so that third-party code that stalls or
/// panics on corrupt input becomes an error for the caller instead of a hang or a crash. A stalled
/// thread cannot be stopped; it is abandoned (the process ends on the error it leads to).
pub(super) struct Watched<T> {
    rx: std::sync::mpsc::Receiver<std::result::Result<Option<T>, String>>,
}

/// Why [`Watched::next`] gave no item.
#[derive(Debug, PartialEq)]
pub(super) enum WatchStop {
    /// No item (and no end) within the stall limit.
    Stalled,
    /// The iterator panicked, with this message.
    Panicked(String),
}

impl<T: Send + 'static> Watched<T> {
    pub(super) fn spawn<I: Iterator<Item = T> + Send + 'static>(
        name: &str,
        mut iter: I,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name(name.to_string()).spawn(move || {
            loop {
                let next = catch_panic_quietly(|| iter.next());
                let more = matches!(next, Ok(Some(_)));
                if tx.send(next).is_err() || !more {
                    break;
                }
            }
        })?;
        Ok(Watched { rx })
    }

    /// The next item (None at the end), waiting at most `stall` for it.
    pub(super) fn next(&self, stall: std::time::Duration) -> std::result::Result<Option<T>, WatchStop> {
        received(self.rx.recv_timeout(stall))
    }
}

/// `f()` run on a thread of its own, waited for at most `stall`: [`Watched`] for a single call.
pub(super) fn call_watched<T: Send + 'static>(
    name: &str,
    stall: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::result::Result<T, WatchStop>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        // The receiver is gone only when the caller stopped waiting; nothing is left to tell.
        let _ = tx.send(catch_panic_quietly(f));
    })?;
    Ok(received(rx.recv_timeout(stall)))
}

/// What a watched thread sent: its value, its panic, or nothing in time.
fn received<T>(
    message: std::result::Result<std::result::Result<T, String>, std::sync::mpsc::RecvTimeoutError>,
) -> std::result::Result<T, WatchStop> {
    match message {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(what)) => Err(WatchStop::Panicked(what)),
        Err(_) => Err(WatchStop::Stalled),
    }
}

/// Runs `f`, turning a panic inside it into `Err(message)` without printing it: the panic hook
/// is swapped for a silent one while `f` runs (the hook is process-wide; loaders run before any
/// training threads start, so nothing else is expected to panic meanwhile). For third-party code
/// that panics on corrupt input (the parquet crate); our own code does not rely on this.
fn catch_panic_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::{WatchStop, Watched, call_watched};
    use std::time::Duration;

    #[test]
    fn watched_items_arrive_in_order_then_the_end() {
        let w = Watched::spawn("t", [1, 2, 3].into_iter()).unwrap();
        let got: Vec<_> = (0..4).map(|_| w.next(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got, [Some(1), Some(2), Some(3), None]);
    }

    #[test]
    fn a_stalling_iterator_is_reported_not_waited_for() {
        let slow = std::iter::once(()).map(|_| std::thread::sleep(Duration::from_millis(500)));
        let w = Watched::spawn("t", slow).unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(w.next(Duration::from_millis(50)), Err(WatchStop::Stalled));
        assert!(t0.elapsed() < Duration::from_millis(400), "waited {:?}", t0.elapsed());
    }

    #[test]
    fn a_panicking_iterator_is_an_error_with_its_message() {
        let boom = std::iter::once(()).map(|_| -> u8 { panic!("boom at page 3") });
        let w = Watched::spawn("t", boom).unwrap();
        assert_eq!(w.next(Duration::from_secs(5)), Err(WatchStop::Panicked("boom at page 3".into())));
    }

    #[test]
    fn a_watched_call_gives_its_value_its_panic_or_stalled() {
        let quick = Duration::from_secs(5);
        assert_eq!(call_watched("t", quick, || 7).unwrap(), Ok(7));
        assert_eq!(
            call_watched("t", quick, || -> u8 { panic!("bad footer") }).unwrap(),
            Err(WatchStop::Panicked("bad footer".into()))
        );
        let started = std::time::Instant::now();
        let stalled =
            call_watched("t", Duration::from_millis(100), || std::thread::sleep(Duration::from_secs(3)));
        assert_eq!(stalled.unwrap(), Err(WatchStop::Stalled));
        assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());
    }
}
