//! touchledger's domain: what an event is, what makes it valid, and the read-model folds.
//!
//! Key decision: this crate does no I/O — no tokio, sled, NATS or protobuf, and no wall clock
//! inside any rule. Everything that depends on "now" takes it as an argument, so every verdict
//! and every fold is a pure function of its inputs and replays byte-identically. The protobuf
//! wire types live in `touchledger-proto`, which converts to and from these types.

pub mod bgnbd;
pub mod churn;
pub mod clv;
pub mod count;
pub mod evaluation;
pub mod event;
pub mod facts;
pub mod gammagamma;
pub mod json;
pub mod loyalty;
pub mod paretonbd;
pub mod partition;
pub mod population;
pub mod satisfaction;
mod simplex;
pub mod time;
pub mod validate;

pub use event::{
    Callback, CallbackOutcome, CallbackPurpose, Channel, ChurnLevel, ChurnRiskAssessed, Complaint,
    ComplaintCategory, EvaluatedThreshold, Event, EventKind, LEDGER_SOURCE, LeavingReason,
    MODEL_CUSTOMER, ModelEvaluated, ModelFitted, Payload, Purchase, Retraction, RiskReason,
    SCHEMA_VERSION, SpendModel, Survey, TimeUnit,
};
pub use time::Timestamp;
pub use validate::{RejectCode, Rejection, ValidationPolicy};
