//! Conversions of the read-model views (`touchledger_domain::{satisfaction, loyalty, churn,
//! population}`) into their protobuf messages (`proto/touchledger/v1/views.proto`).
//!
//! Class names are the domain's serde names (snake_case), so JSON and protobuf consumers see
//! the same words.

use serde::Serialize;
use touchledger_domain::churn::ChurnView;
use touchledger_domain::facts::{AsOf, Axis};
use touchledger_domain::loyalty::LoyaltyView;
use touchledger_domain::population::PopulationView;
use touchledger_domain::satisfaction::{Reason, SatisfactionView};

use crate::{leaving_to, level_to, to_pb_time, v1};

/// The stable name of a class (its serde name).
pub fn name<T: Serialize>(t: &T) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn axis(a: AsOf) -> i32 {
    (match a.axis {
        Axis::Business => v1::Axis::Business,
        Axis::Knowledge => v1::Axis::Knowledge,
    }) as i32
}

/// The domain axis of a wire axis (unspecified = business).
pub fn axis_from(raw: i32) -> Axis {
    match v1::Axis::try_from(raw) {
        Ok(v1::Axis::Knowledge) => Axis::Knowledge,
        _ => Axis::Business,
    }
}

fn reasons(r: &[Reason]) -> Vec<v1::Reason> {
    r.iter()
        .map(|r| v1::Reason {
            code: r.code.clone(),
            evidence: r.evidence.clone(),
            threshold: r.threshold.clone(),
        })
        .collect()
}

fn money(m: &std::collections::BTreeMap<String, i64>) -> Vec<v1::Money> {
    m.iter()
        .map(|(c, v)| v1::Money {
            currency: c.clone(),
            amount_minor: *v,
        })
        .collect()
}

/// A customer's satisfaction view.
pub fn satisfaction(customer: &str, v: &SatisfactionView) -> v1::SatisfactionView {
    v1::SatisfactionView {
        customer_id: customer.to_owned(),
        as_of: Some(to_pb_time(v.as_of.at)),
        axis: axis(v.as_of),
        last_c: v.last_c.as_ref().map(|c| c.c),
        last_c_class: v
            .last_c
            .as_ref()
            .map(|c| name(&c.class))
            .unwrap_or_default(),
        c_mean: v.c_mean,
        c_mean_before: v.c_mean_before,
        trend: name(&v.trend),
        csat_mean: v.csat_mean,
        last_nps: v.last_nps.map(|n| n.0),
        last_nps_category: v.last_nps.map(|n| name(&n.1)).unwrap_or_default(),
        complaints_total: v.complaints.total,
        complaints_open: v.complaints.open,
        complaints_recent: v.complaints.recent,
        complaints_resolved: v.complaints.resolved,
        complaints_recovered: v.complaints.recovered,
        mean_resolution_hours: v.complaints.mean_resolution_hours(),
        reasons: reasons(&v.reasons),
    }
}

/// A customer's loyalty view.
pub fn loyalty(customer: &str, v: &LoyaltyView) -> v1::LoyaltyView {
    let b = &v.behaviour;
    v1::LoyaltyView {
        customer_id: customer.to_owned(),
        as_of: Some(to_pb_time(v.as_of.at)),
        axis: axis(v.as_of),
        attitude: v.attitude,
        purchase_days: b.purchase_days,
        repeat_days: b.repeat_days,
        recency_days: b.recency_days,
        frequency_window: b.frequency_window,
        monetary: money(&b.monetary),
        monetary_window: money(&b.monetary_window),
        tenure_days: b.tenure_days,
        mean_interval_days: b.mean_interval_days,
        dick_basu: name(&v.dick_basu),
        knox: name(&v.knox),
        other_suppliers: v.other_suppliers,
        stage: name(&v.stage),
        stage_history: v
            .stage_history
            .iter()
            .map(|(t, s)| v1::StageChange {
                at: Some(to_pb_time(*t)),
                stage: name(s),
            })
            .collect(),
        reasons: reasons(&v.reasons),
        value: v.value.as_ref().map(|c| v1::CustomerValue {
            currency: c.currency.clone(),
            expected_average_value_minor: c.expected_average_value_minor,
            expected_purchases: c.expected_purchases,
            clv_minor: c.clv_minor,
            horizon_months: c.horizon_months,
            monthly_discount: c.monthly_discount,
            model_version: c.model_version.clone(),
        }),
    }
}

/// A customer's churn-warning view.
pub fn churn(customer: &str, v: &ChurnView) -> v1::ChurnView {
    v1::ChurnView {
        customer_id: customer.to_owned(),
        as_of: Some(to_pb_time(v.as_of.at)),
        axis: axis(v.as_of),
        level: level_to(v.level),
        score: v.score,
        reasons: v.reasons.iter().map(crate::risk_reason_to).collect(),
        probable_cause: leaving_to(v.probable_cause),
        since: v.since.map(to_pb_time),
        expected_next_purchase: v.expected_next_purchase.map(to_pb_time),
        value_at_risk_minor: v.value_at_risk_minor,
        currency: v.currency.clone(),
        p_active: v.p_active,
        model_version: v.model_version.clone().unwrap_or_default(),
        p_alive: v.p_alive,
        expected_purchases: v.expected_purchases,
        expected_purchases_days: v.expected_purchases_days,
    }
}

fn counts<K: Serialize>(m: &std::collections::BTreeMap<K, u64>) -> Vec<v1::Count> {
    m.iter()
        .map(|(k, n)| v1::Count {
            key: name(k),
            count: *n,
        })
        .collect()
}

/// The population view.
pub fn population(v: &PopulationView) -> v1::PopulationView {
    v1::PopulationView {
        as_of: Some(to_pb_time(v.as_of.at)),
        axis: axis(v.as_of),
        customers: v.customers,
        buyers: v.buyers,
        active: v.active,
        nps: v.nps,
        csat_pct: v.csat_pct,
        mean_ces: v.mean_ces,
        mean_c: v.mean_c,
        complaint_rate_pct: v.complaint_rate_pct,
        recovery_rate_pct: v.recovery_rate_pct,
        months: v
            .months
            .iter()
            .map(|m| v1::MonthFigures {
                month: m.month.clone(),
                at_start: m.churn.at_start,
                lost: m.churn.lost,
                retained: m.churn.retained,
                new_customers: m.churn.new,
                won_back: m.churn.won_back,
                churn_rate_pct: m.churn_rate_pct,
                retention_rate_pct: m.retention_rate_pct,
                nps: m.nps,
                csat_pct: m.csat_pct,
                complaints: m.counters.complaints,
                complaint_rate_pct: m.complaint_rate_pct,
            })
            .collect(),
        cohorts: v
            .cohorts
            .iter()
            .map(|c| v1::CohortRow {
                cohort: c.cohort.clone(),
                size: c.size,
                retention_pct: c.retention_pct.clone(),
            })
            .collect(),
        currency: v.currency.clone(),
        pyramid: v
            .pyramid
            .iter()
            .map(|t| v1::PyramidTier {
                tier: t.tier.clone(),
                customers: t.customers,
                revenue_minor: t.revenue_minor,
                revenue_share_pct: t.revenue_share_pct,
            })
            .collect(),
        top20_revenue_share_pct: v.top20_revenue_share_pct,
        rfm_cells: v
            .rfm_cells
            .iter()
            .map(|(k, n)| v1::Count {
                key: k.clone(),
                count: *n,
            })
            .collect(),
        dick_basu: counts(&v.dick_basu),
        lifecycle: counts(&v.lifecycle),
        churn_levels: counts(&v.churn_levels),
        churn_causes: v
            .churn_causes
            .iter()
            .map(|(k, n)| v1::Count {
                key: k.clone(),
                count: *n,
            })
            .collect(),
        segments: v
            .segments
            .iter()
            .map(|(k, s)| v1::SegmentFigures {
                segment: k.clone(),
                customers: s.customers,
                nps: s.nps,
                csat_pct: s.csat_pct,
                mean_c: s.mean_c,
                complaints: s.counters.complaints,
                complaint_rate_pct: s.complaint_rate_pct,
            })
            .collect(),
    }
}
