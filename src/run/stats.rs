//! Per-stage statistics: stats.json and the `--stats` table.

use pipe_stages::core::stage::StageStats;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Statistics of one stage over a run (stats.json).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageReport {
    pub stage: String,
    pub kind: String,
    /// Items received and sent.
    pub items_in: u64,
    pub items_out: u64,
    /// Wall time of the stage, seconds.
    pub seconds: f64,
    /// Fractions of that time working, blocked waiting for input, blocked waiting for room
    /// downstream, and (d_step only) waiting for g_step to finish the previous generator step;
    /// they add up to 1. A data-starved d_step shows a high `waiting_for_input`. A stage that
    /// receives and sends on threads of their own (Augment with workers) can wait for both at
    /// once; when its waits add up to more than its wall time they are scaled to share it, and
    /// `busy` is 0.
    pub busy: f64,
    pub waiting_for_input: f64,
    pub waiting_for_output: f64,
    pub waiting_for_handover: f64,
    /// Input queue length seen at each receive: mean and maximum, and the capacity.
    pub queue_mean: f64,
    pub queue_max: u64,
    pub queue_capacity: usize,
}

pub(super) fn stage_stats(all: &[(String, &'static str, Arc<StageStats>)], capacity: &[usize]) -> Vec<StageReport> {
    all.iter()
        .zip(capacity)
        .map(|((name, kind, s), &capacity)| {
            let secs = s.run_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let frac = |ns: u64| if secs > 0.0 { ns as f64 / 1e9 / secs } else { 0.0 };
            let (wi, wo, wh) = (
                frac(s.wait_in_ns.load(Ordering::Relaxed)),
                frac(s.wait_out_ns.load(Ordering::Relaxed)),
                frac(s.wait_handover_ns.load(Ordering::Relaxed)),
            );
            let waits = wi + wo + wh;
            let (wi, wo, wh) = if waits > 1.0 { (wi / waits, wo / waits, wh / waits) } else { (wi, wo, wh) };
            let n_in = s.items_in.load(Ordering::Relaxed);
            StageReport {
                stage: name.clone(),
                kind: kind.to_string(),
                items_in: n_in,
                items_out: s.items_out.load(Ordering::Relaxed),
                seconds: secs,
                busy: (1.0 - wi - wo - wh).max(0.0),
                waiting_for_input: wi,
                waiting_for_output: wo,
                waiting_for_handover: wh,
                queue_mean: s.depth_sum.load(Ordering::Relaxed) as f64 / n_in.max(1) as f64,
                queue_max: s.depth_max.load(Ordering::Relaxed),
                queue_capacity: capacity,
            }
        })
        .collect()
}

/// The per-stage statistics as a table, the busiest stage marked as the bottleneck.
pub fn stats_table(stats: &[StageReport]) -> String {
    let busiest = stats.iter().max_by(|a, b| a.busy.total_cmp(&b.busy)).map(|s| s.stage.clone());
    let mut out = format!(
        "{:<12} {:<13} {:>8} {:>8} {:>6} {:>9} {:>9} {:>10} {:>7}\n",
        "stage", "kind", "in", "out", "busy", "wait in", "wait out", "hand-over", "queue"
    );
    for s in stats {
        out += &format!(
            "{:<12} {:<13} {:>8} {:>8} {:>5.0}% {:>8.0}% {:>8.0}% {:>9.0}% {:>3.1}/{}{}\n",
            s.stage,
            s.kind,
            s.items_in,
            s.items_out,
            100.0 * s.busy,
            100.0 * s.waiting_for_input,
            100.0 * s.waiting_for_output,
            100.0 * s.waiting_for_handover,
            s.queue_mean,
            s.queue_capacity,
            if Some(&s.stage) == busiest.as_ref() { "  ← bottleneck" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(run: u64, wait_in: u64, wait_out: u64, handover: u64) -> Arc<StageStats> {
        let s = StageStats::default();
        s.run_ns.store(run, Ordering::Relaxed);
        s.wait_in_ns.store(wait_in, Ordering::Relaxed);
        s.wait_out_ns.store(wait_out, Ordering::Relaxed);
        s.wait_handover_ns.store(handover, Ordering::Relaxed);
        s.items_in.store(4, Ordering::Relaxed);
        s.depth_sum.store(6, Ordering::Relaxed);
        Arc::new(s)
    }

    #[test]
    fn fractions_add_up_to_one_also_when_two_threads_of_a_stage_wait_at_once() {
        let all = vec![
            // One thread: 2 of 10 s waiting for input, 3 for output, 1 for the hand-over.
            ("d_step".to_string(), "DStep", stats(10_000_000_000, 2_000_000_000, 3_000_000_000, 1_000_000_000)),
            // Augment as CI saw it: a receiving and a sending thread, waits of 0.216 and 0.883
            // of a 0.184 s run (they overlap).
            ("augment".to_string(), "Augment", stats(184_000_000, 39_744_000, 162_472_000, 0)),
        ];
        let r = stage_stats(&all, &[2, 2]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(r[0].busy, 0.4) && close(r[0].waiting_for_input, 0.2) && close(r[0].waiting_for_output, 0.3));
        assert!(close(r[0].waiting_for_handover, 0.1) && close(r[0].queue_mean, 1.5) && close(r[0].seconds, 10.0));
        let a = &r[1];
        assert_eq!(a.busy, 0.0);
        assert!(close(a.waiting_for_input + a.waiting_for_output + a.waiting_for_handover, 1.0), "{a:?}");
        // In the measured proportion, 0.216 : 0.883.
        assert!(close(a.waiting_for_input / a.waiting_for_output, 39_744_000.0 / 162_472_000.0), "{a:?}");
    }
}
