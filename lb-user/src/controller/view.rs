//! The cluster's load as the request path reads it: one lock-free snapshot of the mean
//! scraped load over the routable backends, rebuilt by whichever request finds it older
//! than [`REFRESH`] (or built from another backend set), so that deciding whether a
//! workflow may stay at its home costs O(1) whatever the number of backends.
//!
//! Scraped loads change once per scrape interval (hundreds of milliseconds), so a view a
//! couple of milliseconds old is as fresh as the data behind it; what it can miss for up
//! to [`REFRESH`] is a backend turning unroutable, which only shifts the mean the load
//! bound is taken against (the home itself is always checked live). A change of any
//! backend's models makes it stale at once ([`crate::model::models_epoch`]).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

use super::policies::workflow::load_of;
use crate::model::{Backend, models_epoch};

/// How old the view may be before a request rebuilds it.
pub const REFRESH: Duration = Duration::from_millis(2);

/// One view.
#[derive(Debug)]
struct LoadView {
    /// The backend snapshot it was built from (its address: only compared).
    snap: usize,
    /// [`models_epoch`] when built.
    models: u64,
    at: Instant,
    /// Mean scraped load over the routable backends (0 when none is).
    mean: f64,
    /// Every backend lists the same models (or none knows its models yet, and each then
    /// serves any), so the routable backends are the candidates of any request
    /// (otherwise the mean is per model: no view).
    uniform: bool,
}

impl LoadView {
    fn build(snap: &Arc<Vec<Arc<Backend>>>) -> Self {
        let models = models_epoch();
        let first = snap.first().map(|b| b.models.load_full());
        let uniform = first
            .as_ref()
            .is_some_and(|f| snap.iter().all(|b| **b.models.load() == **f));
        let (mut sum, mut n) = (0.0, 0usize);
        for b in snap.iter().filter(|b| b.routable()) {
            sum += load_of(b);
            n += 1;
        }
        Self {
            snap: Arc::as_ptr(snap) as usize,
            models,
            at: Instant::now(),
            mean: if n == 0 { 0.0 } else { sum / n as f64 },
            uniform,
        }
    }
}

/// The shared view.
#[derive(Debug)]
pub struct ClusterLoad {
    view: ArcSwap<LoadView>,
}

impl Default for ClusterLoad {
    fn default() -> Self {
        Self {
            view: ArcSwap::from_pointee(LoadView {
                snap: 0,
                models: u64::MAX,
                at: Instant::now(),
                mean: 0.0,
                uniform: false,
            }),
        }
    }
}

/// What a request reads of the view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// Mean scraped load over the routable backends (0 when none is).
    pub mean: f64,
    /// Every backend serves the same models: one backend's answer to "serves this
    /// model?" is every backend's, and `mean` is over any request's candidates.
    pub uniform: bool,
}

impl ClusterLoad {
    /// The view of `snap`, rebuilt when older than [`REFRESH`], built from another set, or
    /// a backend's models changed since.
    pub fn view(&self, snap: &Arc<Vec<Arc<Backend>>>) -> View {
        let v = self.view.load();
        if v.snap == Arc::as_ptr(snap) as usize
            && v.models == models_epoch()
            && v.at.elapsed() < REFRESH
        {
            return View {
                mean: v.mean,
                uniform: v.uniform,
            };
        }
        drop(v);
        let v = LoadView::build(snap);
        let out = View {
            mean: v.mean,
            uniform: v.uniform,
        };
        self.view.store(Arc::new(v));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{controller::policies::test_backends, model::BackendLoad};

    /// The mean when the view has one, as the O(1) decision reads it.
    fn mean(c: &ClusterLoad, snap: &Arc<Vec<Arc<Backend>>>) -> Option<f64> {
        let v = c.view(snap);
        v.uniform.then_some(v.mean)
    }

    fn with_models(n: usize, models: &[&str]) -> Arc<Vec<Arc<Backend>>> {
        let v = test_backends(n);
        for b in &v {
            b.set_models(models.iter().map(|m| (*m).to_owned()).collect());
        }
        Arc::new(v)
    }

    #[test]
    fn mean_over_routable_backends_and_rebuilt_for_another_set() {
        let snap = with_models(4, &["m"]);
        for (i, b) in snap.iter().enumerate() {
            b.set_load(BackendLoad {
                waiting: i as f64 * 2.0,
                ..BackendLoad::default()
            });
        }
        let c = ClusterLoad::default();
        assert_eq!(mean(&c, &snap), Some(3.0));
        // Another snapshot (a backend went unroutable and the set changed): rebuilt.
        snap[3]
            .healthy
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let other = Arc::new((*snap).clone());
        assert_eq!(mean(&c, &other), Some(2.0), "mean of 0, 2, 4");
    }

    #[test]
    fn no_view_when_backends_serve_different_models() {
        let c = ClusterLoad::default();
        let snap = with_models(2, &["a"]);
        snap[1].set_models(vec!["b".to_owned()]);
        assert_eq!(mean(&c, &snap), None);
        let unknown = Arc::new(test_backends(2));
        assert_eq!(
            mean(&c, &unknown),
            Some(0.0),
            "models unknown: each serves any"
        );
        unknown[0].set_models(vec!["a".to_owned()]);
        assert_eq!(
            mean(&c, &Arc::new((*unknown).clone())),
            None,
            "one known, one not"
        );
    }
}
