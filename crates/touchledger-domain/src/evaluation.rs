//! Calibration / holdout evaluation of the churn model and the churn warnings (issue #13; the
//! model-fit checks follow Fader, Hardie & Lee 2005, "Counting your customers the easy way",
//! Figures 2–4).
//!
//! The caller fits BG/NBD on what had happened by the calibration end T1, evaluates each
//! buyer's churn warning at T1 with that fit, and counts what each buyer did in the holdout
//! (T1, T2]. This module compares the two:
//! * **model fit**: customers by calibration repeat purchases 0 … 7+, predicted (Σ P(X(Tᵢ) = x))
//!   and actual; repeat purchases in the holdout in total and by calibration frequency,
//!   predicted (Σ E[Y(t) | x, tₓ, T]) and actual; the cumulative repeat purchases of the cohort
//!   week by week over both periods ("tracking"), predicted (Σ E[X(s − firstᵢ)]) and actual;
//! * **warnings**: "churned" = no purchase in the holdout. Per level the customers and the share
//!   that churned; per level threshold (level ≥ L flagged) precision, recall and lift; the ROC
//!   AUC of the churn score. Next to them two baselines computed from the same customers: days
//!   since the last purchase alone, and BG/NBD's P(no purchase in the holdout length) alone —
//!   their AUC, and their precision and recall when flagging as many customers as each level
//!   threshold does (their highest-scoring, ties by customer order).
//!
//! Pure: no clock, no I/O; every figure is a function of the inputs.

use serde::{Deserialize, Serialize};

use crate::bgnbd::{self, Params, Rfm};
use crate::event::ChurnLevel;

/// One buyer at the calibration end (customers without a purchase by then are not part of the
/// evaluation: the model describes buyers).
#[derive(Clone, Debug, PartialEq)]
pub struct Buyer {
    /// BG/NBD statistics at the calibration end, in the model's unit.
    pub calibration: Rfm,
    /// Day number of the first purchase.
    pub first_day: i64,
    /// Day numbers of the repeat purchase-days (after the first) up to the holdout end.
    pub repeat_days: Vec<i64>,
    /// Purchase-days in the holdout (T1, T2].
    pub holdout: u32,
    /// The churn warning at the calibration end.
    pub level: ChurnLevel,
    /// Its score (0 … 1).
    pub score: f64,
    /// Days from the last purchase to the calibration end.
    pub days_since_last: i64,
}

/// Customers with `x` repeat purchases in the calibration period (the last bin is "7+").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrequencyBin {
    /// `0` … `6`, `7+`.
    pub repeat_purchases: String,
    /// Buyers with that many.
    pub actual: u64,
    /// Σ P(X(Tᵢ) = x) over the buyers.
    pub predicted: f64,
}

/// Mean holdout purchases of the buyers with `x` calibration repeat purchases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConditionalBin {
    /// `0` … `6`, `7+`.
    pub repeat_purchases: String,
    /// Buyers in the bin.
    pub customers: u64,
    /// Their mean purchase-days in the holdout.
    pub actual_mean: f64,
    /// Their mean E[Y(holdout) | x, tₓ, T].
    pub predicted_mean: f64,
}

/// The cohort's cumulative repeat purchase-days at one week's end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackingPoint {
    /// Day number of the week's last day.
    pub day: i64,
    /// Whether the day is in the holdout.
    pub holdout: bool,
    /// Repeat purchase-days up to and including the day.
    pub actual: u64,
    /// Σ E[X(day − firstᵢ)] over the buyers who had made their first purchase.
    pub predicted: f64,
}

/// Customers at one churn level and the share of them that churned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevelRow {
    /// The level.
    pub level: ChurnLevel,
    /// Buyers at it at the calibration end.
    pub customers: u64,
    /// Of them, no purchase in the holdout.
    pub churned: u64,
    /// `churned / customers` (0 when none).
    pub churned_share: f64,
}

/// How flagging at `level` or above predicts churn, and the two baselines flagging as many.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdRow {
    /// Flagged: level ≥ this.
    pub at_least: ChurnLevel,
    /// Buyers flagged.
    pub flagged: u64,
    /// The warning rules: churned among the flagged / flagged.
    pub rules: Classification,
    /// Days since the last purchase, its `flagged` highest.
    pub recency: Classification,
    /// BG/NBD P(no purchase in the holdout length), its `flagged` highest.
    pub model: Classification,
}

/// Precision, recall and lift of one flagged set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// Churned among the flagged, of the flagged (0 when none flagged).
    pub precision: f64,
    /// Churned among the flagged, of all churned (0 when none churned).
    pub recall: f64,
    /// Precision over the base rate (0 when the base rate is 0).
    pub lift: f64,
}

/// The ROC AUC of each ranking of the buyers by risk (`None` when only one class occurs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Auc {
    /// The churn score of the warning rules.
    pub rules_score: Option<f64>,
    /// Days since the last purchase.
    pub recency: Option<f64>,
    /// BG/NBD P(no purchase in the holdout length).
    pub model: Option<f64>,
}

/// The churn warnings against what happened in the holdout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WarningEvaluation {
    /// Buyers with no purchase in the holdout.
    pub churned: u64,
    /// `churned / buyers`.
    pub base_rate: f64,
    /// Per level, none … lost.
    pub levels: Vec<LevelRow>,
    /// Per threshold, watch … lost.
    pub thresholds: Vec<ThresholdRow>,
    /// Ranking quality.
    pub auc: Auc,
}

/// One count model fitted at the calibration end and its holdout predictions, for comparing
/// BG/NBD with Pareto/NBD on the same buyers and holdout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CountModelCheck {
    /// `BG/NBD` or `Pareto/NBD`.
    pub model: String,
    /// The parameters by name (r, alpha, a, b or r, alpha, s, beta).
    pub parameters: Vec<(String, f64)>,
    /// The calibration log-likelihood (higher fits the calibration data better).
    pub log_likelihood: f64,
    /// Σ E[Y(holdout) | x, tₓ, T] over the buyers.
    pub holdout_predicted: f64,
    /// Mean E[Y(holdout)] per calibration-frequency bin (the bins of `conditional`).
    pub conditional_predicted_means: Vec<f64>,
    /// Mean absolute error of those means against the actual ones, weighted by the bins'
    /// buyers (0 is perfect).
    pub conditional_mean_abs_error: f64,
}

impl CountModelCheck {
    /// The check of a model whose per-buyer holdout expectation is `expect` (`None` counts 0).
    pub fn of(
        model: &str,
        parameters: Vec<(String, f64)>,
        log_likelihood: f64,
        buyers: &[Buyer],
        expect: impl Fn(&Rfm) -> Option<f64>,
    ) -> CountModelCheck {
        let (bins, total) = conditional_bins(
            buyers,
            buyers.iter().map(|b| expect(&b.calibration).unwrap_or(0.0)),
        );
        Self::from_conditional(model, parameters, log_likelihood, total, &bins)
    }

    /// The check from a model's holdout total and its means by calibration frequency (an
    /// [`Evaluation`]'s `holdout_predicted` and `conditional`, for the model it was made with).
    pub fn from_conditional(
        model: &str,
        parameters: Vec<(String, f64)>,
        log_likelihood: f64,
        holdout_predicted: f64,
        bins: &[ConditionalBin],
    ) -> CountModelCheck {
        let n = bins.iter().map(|b| b.customers).sum::<u64>().max(1) as f64;
        let error: f64 = bins
            .iter()
            .map(|b| b.customers as f64 * (b.predicted_mean - b.actual_mean).abs())
            .sum();
        CountModelCheck {
            model: model.to_owned(),
            parameters,
            log_likelihood,
            holdout_predicted,
            conditional_predicted_means: bins.iter().map(|b| b.predicted_mean).collect(),
            conditional_mean_abs_error: error / n,
        }
    }
}

/// The buyers' holdout purchases by calibration frequency, actual and `expected` (one value per
/// buyer, in order), and the expected total.
fn conditional_bins(
    buyers: &[Buyer],
    expected: impl Iterator<Item = f64>,
) -> (Vec<ConditionalBin>, f64) {
    let mut sums = [(0u64, 0u64, 0.0f64); LAST_BIN + 1];
    let mut total = 0.0;
    for (b, e) in buyers.iter().zip(expected) {
        total += e;
        let s = &mut sums[bin_of(b.calibration.x)];
        s.0 += 1;
        s.1 += u64::from(b.holdout);
        s.2 += e;
    }
    let bins = sums
        .iter()
        .enumerate()
        .map(|(i, &(n, actual, predicted))| ConditionalBin {
            repeat_purchases: bin_label(i),
            customers: n,
            actual_mean: if n > 0 { actual as f64 / n as f64 } else { 0.0 },
            predicted_mean: if n > 0 { predicted / n as f64 } else { 0.0 },
        })
        .collect();
    (bins, total)
}

/// Everything [`evaluate`] reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Buyers at the calibration end.
    pub customers: u64,
    /// The holdout's length in the model's unit.
    pub holdout_length: f64,
    /// Calibration repeat purchases, predicted and actual (FHL Figure 2).
    pub frequency: Vec<FrequencyBin>,
    /// Repeat purchase-days in the holdout, in total: actual.
    pub holdout_actual: u64,
    /// … and predicted, Σ E[Y(holdout) | x, tₓ, T].
    pub holdout_predicted: f64,
    /// By calibration frequency (FHL Figure 4).
    pub conditional: Vec<ConditionalBin>,
    /// Week by week over both periods (FHL Figure 3).
    pub tracking: Vec<TrackingPoint>,
    /// The warnings.
    pub warnings: WarningEvaluation,
    /// The count models fitted at the calibration end, side by side on the same holdout
    /// (filled by the caller, which fits them; empty from [`evaluate`] alone).
    #[serde(default)]
    pub count_models: Vec<CountModelCheck>,
}

/// The highest frequency bin; it holds every buyer with this many repeat purchases or more.
const LAST_BIN: usize = 7;

fn bin_label(i: usize) -> String {
    if i == LAST_BIN {
        format!("{LAST_BIN}+")
    } else {
        i.to_string()
    }
}

fn bin_of(x: f64) -> usize {
    (x.max(0.0) as usize).min(LAST_BIN)
}

/// Compare `buyers` (every buyer at the calibration end) with the model `params`, fitted in
/// units of `unit_days` days on their calibration statistics. `calibration_end` and
/// `holdout_end` are day numbers (the holdout is the days after the first up to the second).
pub fn evaluate(
    params: &Params,
    unit_days: f64,
    buyers: &[Buyer],
    calibration_end: i64,
    holdout_end: i64,
) -> Evaluation {
    let holdout_length = (holdout_end - calibration_end) as f64 / unit_days;

    // Figure 2: calibration repeat purchases.
    let mut frequency: Vec<FrequencyBin> = (0..=LAST_BIN)
        .map(|i| FrequencyBin {
            repeat_purchases: bin_label(i),
            actual: 0,
            predicted: 0.0,
        })
        .collect();
    for b in buyers {
        frequency[bin_of(b.calibration.x)].actual += 1;
        let mut below = 0.0;
        for (n, bin) in frequency.iter_mut().enumerate().take(LAST_BIN) {
            let p = bgnbd::p_purchases(params, b.calibration.t, n as u32);
            bin.predicted += p;
            below += p;
        }
        frequency[LAST_BIN].predicted += (1.0 - below).max(0.0);
    }

    // The holdout, in total and by calibration frequency (Figure 4).
    let (conditional, holdout_predicted) = conditional_bins(
        buyers,
        buyers.iter().map(|b| {
            bgnbd::expected_purchases(params, &b.calibration, holdout_length).unwrap_or(0.0)
        }),
    );
    let holdout_actual = buyers.iter().map(|b| u64::from(b.holdout)).sum();

    Evaluation {
        customers: buyers.len() as u64,
        holdout_length,
        frequency,
        holdout_actual,
        holdout_predicted,
        conditional,
        tracking: tracking(params, unit_days, buyers, calibration_end, holdout_end),
        warnings: warnings(params, buyers, holdout_length),
        count_models: Vec::new(),
    }
}

/// Figure 3: cumulative repeat purchase-days of the cohort at the end of each week, from the
/// first purchase of any buyer to the holdout end. The prediction sums E[X(t)] per first-purchase
/// day (buyers sharing a first day share the term).
fn tracking(
    params: &Params,
    unit_days: f64,
    buyers: &[Buyer],
    calibration_end: i64,
    holdout_end: i64,
) -> Vec<TrackingPoint> {
    let Some(start) = buyers.iter().map(|b| b.first_day).min() else {
        return Vec::new();
    };
    let mut firsts: std::collections::BTreeMap<i64, u64> = std::collections::BTreeMap::new();
    for b in buyers {
        *firsts.entry(b.first_day).or_default() += 1;
    }
    let mut repeats: Vec<i64> = buyers
        .iter()
        .flat_map(|b| b.repeat_days.iter().copied())
        .filter(|d| *d <= holdout_end)
        .collect();
    repeats.sort_unstable();
    let mut out = Vec::new();
    let mut day = start + 6;
    loop {
        let day_end = day.min(holdout_end);
        let actual = repeats.partition_point(|d| *d <= day_end) as u64;
        let predicted = firsts
            .range(..=day_end)
            .map(|(&first, &n)| {
                // Purchases are counted by day: a first purchase on `first` has had
                // `day_end - first` days for repeats by the end of `day_end`.
                let t = (day_end - first) as f64 / unit_days;
                n as f64 * bgnbd::expected_transactions(params, t).unwrap_or(0.0)
            })
            .sum();
        out.push(TrackingPoint {
            day: day_end,
            holdout: day_end > calibration_end,
            actual,
            predicted,
        });
        if day_end >= holdout_end {
            break;
        }
        day += 7;
    }
    out
}

/// The warnings' figures alone: the buyers' levels and scores against their holdout purchases,
/// and the two baselines (`holdout_length` in the model's unit).
pub fn warnings(params: &Params, buyers: &[Buyer], holdout_length: f64) -> WarningEvaluation {
    let churned_flags: Vec<bool> = buyers.iter().map(|b| b.holdout == 0).collect();
    let churned = churned_flags.iter().filter(|c| **c).count() as u64;
    let n = buyers.len() as u64;
    let base_rate = if n > 0 {
        churned as f64 / n as f64
    } else {
        0.0
    };
    let levels = [
        ChurnLevel::None,
        ChurnLevel::Watch,
        ChurnLevel::Warning,
        ChurnLevel::Critical,
        ChurnLevel::Lost,
    ];
    let level_rows = levels
        .iter()
        .map(|&level| {
            let (customers, c) = buyers
                .iter()
                .zip(&churned_flags)
                .filter(|(b, _)| b.level == level)
                .fold((0u64, 0u64), |(n, c), (_, ch)| (n + 1, c + u64::from(*ch)));
            LevelRow {
                level,
                customers,
                churned: c,
                churned_share: if customers > 0 {
                    c as f64 / customers as f64
                } else {
                    0.0
                },
            }
        })
        .collect();

    let recency: Vec<f64> = buyers.iter().map(|b| b.days_since_last as f64).collect();
    let model: Vec<f64> = buyers
        .iter()
        .map(|b| bgnbd::p_no_purchase(params, &b.calibration, holdout_length))
        .collect();
    let score: Vec<f64> = buyers.iter().map(|b| b.score).collect();

    let classify = |flagged: &[bool]| -> Classification {
        let hits = flagged
            .iter()
            .zip(&churned_flags)
            .filter(|(f, c)| **f && **c)
            .count() as f64;
        let k = flagged.iter().filter(|f| **f).count() as f64;
        let precision = if k > 0.0 { hits / k } else { 0.0 };
        Classification {
            precision,
            recall: if churned > 0 {
                hits / churned as f64
            } else {
                0.0
            },
            lift: if base_rate > 0.0 {
                precision / base_rate
            } else {
                0.0
            },
        }
    };
    let top = |values: &[f64], k: usize| -> Vec<bool> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        // Highest first; ties in customer order (stable sort).
        order.sort_by(|&i, &j| values[j].total_cmp(&values[i]));
        let mut flagged = vec![false; values.len()];
        for &i in order.iter().take(k) {
            flagged[i] = true;
        }
        flagged
    };
    let thresholds = levels[1..]
        .iter()
        .map(|&at_least| {
            let flagged: Vec<bool> = buyers.iter().map(|b| b.level >= at_least).collect();
            let k = flagged.iter().filter(|f| **f).count();
            ThresholdRow {
                at_least,
                flagged: k as u64,
                rules: classify(&flagged),
                recency: classify(&top(&recency, k)),
                model: classify(&top(&model, k)),
            }
        })
        .collect();
    WarningEvaluation {
        churned,
        base_rate,
        levels: level_rows,
        thresholds,
        auc: Auc {
            rules_score: auc(&score, &churned_flags),
            recency: auc(&recency, &churned_flags),
            model: auc(&model, &churned_flags),
        },
    }
}

/// The ROC AUC of `scores` (higher = more likely positive) for the labels `positive`: the
/// probability that a random positive scores above a random negative, ties counting one half
/// (the Mann–Whitney statistic with average ranks). `None` without both classes.
pub fn auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let pos = positive.iter().filter(|p| **p).count();
    let neg = positive.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[i].total_cmp(&scores[j]));
    // Average ranks (1-based) over runs of equal scores.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if positive[k] {
                rank_sum_pos += avg;
            }
        }
        i = j + 1;
    }
    let (pos, neg) = (pos as f64, neg as f64);
    Some((rank_sum_pos - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_pairs_and_halves_ties() {
        // Perfect, reversed, and all tied.
        assert_eq!(auc(&[0.9, 0.8, 0.1], &[true, true, false]), Some(1.0));
        assert_eq!(auc(&[0.1, 0.2, 0.9], &[true, true, false]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5, 0.5], &[true, false, false]), Some(0.5));
        // Pairs (pos, neg): (0.8, 0.3) win, (0.8, 0.9) lose, (0.3, 0.3) tie, (0.3, 0.9) lose
        // → (1 + 0 + 0.5 + 0) / 4.
        assert_eq!(
            auc(&[0.8, 0.3, 0.3, 0.9], &[true, true, false, false]),
            Some(0.375)
        );
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
    }

    fn buyer(x: f64, t_x: f64, t: f64, holdout: u32, level: ChurnLevel, score: f64) -> Buyer {
        Buyer {
            calibration: Rfm { x, t_x, t },
            first_day: 0,
            repeat_days: Vec::new(),
            holdout,
            level,
            score,
            days_since_last: ((t - t_x) * 7.0) as i64,
        }
    }

    #[test]
    fn thresholds_count_precision_recall_and_lift() {
        let p = Params {
            r: 0.24,
            alpha: 4.4,
            a: 0.79,
            b: 2.4,
        };
        let buyers = vec![
            buyer(0.0, 0.0, 30.0, 0, ChurnLevel::Lost, 1.0),
            buyer(1.0, 5.0, 30.0, 0, ChurnLevel::Warning, 0.6),
            buyer(3.0, 28.0, 30.0, 2, ChurnLevel::Warning, 0.55),
            buyer(5.0, 29.0, 30.0, 4, ChurnLevel::None, 0.1),
        ];
        let e = evaluate(&p, 7.0, &buyers, 210, 483);
        let w = &e.warnings;
        assert_eq!(w.churned, 2);
        assert_eq!(w.base_rate, 0.5);
        // Warning or above: 3 flagged, 2 of them churned → precision 2/3, recall 1, lift 4/3.
        let t = w
            .thresholds
            .iter()
            .find(|t| t.at_least == ChurnLevel::Warning)
            .expect("row");
        assert_eq!(t.flagged, 3);
        assert!((t.rules.precision - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(t.rules.recall, 1.0);
        assert!((t.rules.lift - 4.0 / 3.0).abs() < 1e-12);
        // Lost: 1 flagged, churned.
        let t = w.thresholds.last().expect("lost");
        assert_eq!(
            (t.flagged, t.rules.precision, t.rules.recall),
            (1, 1.0, 0.5)
        );
        assert_eq!(w.auc.rules_score, Some(1.0));
        assert_eq!(e.holdout_actual, 6);
        assert_eq!(e.frequency.iter().map(|b| b.actual).sum::<u64>(), 4);
        let predicted: f64 = e.frequency.iter().map(|b| b.predicted).sum();
        assert!((predicted - 4.0).abs() < 1e-9, "{predicted}");
    }
}
