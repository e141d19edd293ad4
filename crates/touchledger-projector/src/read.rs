//! Reads of the read models at any `as_of`, on either time axis.

use touchledger_domain::facts::{AsOf, CustomerFacts};
use touchledger_domain::population::{CustomerViews, PopulationBuilder, PopulationView, Rules};
use touchledger_domain::{MODEL_CUSTOMER, ModelFitted};
use touchledger_store::ProjectionTree;

use crate::{CHURN, LOYALTY, ProjectorError, SATISFACTION, decode, load};

/// The three projections' trees and the rules that evaluate them.
#[derive(Clone, Debug)]
pub struct ReadModels {
    satisfaction: ProjectionTree,
    loyalty: ProjectionTree,
    churn: ProjectionTree,
    /// The rules applied at read time.
    pub rules: Rules,
}

impl ReadModels {
    /// Reads over the three trees.
    pub fn new(
        satisfaction: ProjectionTree,
        loyalty: ProjectionTree,
        churn: ProjectionTree,
        rules: Rules,
    ) -> Self {
        ReadModels {
            satisfaction,
            loyalty,
            churn,
            rules,
        }
    }

    /// Reads over the projections stored in the ledger's database.
    pub fn open(
        store: &touchledger_store::SledStore,
        rules: Rules,
    ) -> Result<Self, ProjectorError> {
        Ok(ReadModels::new(
            store.projection(SATISFACTION.name)?,
            store.projection(LOYALTY.name)?,
            store.projection(CHURN.name)?,
            rules,
        ))
    }

    /// The checkpoints of the three projections (satisfaction, loyalty, churn).
    pub fn checkpoints(&self) -> Result<[u64; 3], ProjectorError> {
        let c = |t: &ProjectionTree| -> Result<u64, ProjectorError> {
            Ok(t.meta()?.map_or(0, |m| m.checkpoint))
        };
        Ok([c(&self.satisfaction)?, c(&self.loyalty)?, c(&self.churn)?])
    }

    /// The churn model in force at `as_of`: the latest `ModelFitted` of the rules' count model
    /// (`churn.count_model`) visible then.
    pub fn model(&self, as_of: AsOf) -> Result<Option<ModelFitted>, ProjectorError> {
        let facts = load(&self.churn, CHURN.name, MODEL_CUSTOMER)?;
        let model = self.rules.churn.count_model.name();
        Ok(facts.latest_fit(as_of, model).map(|f| f.fit.clone()))
    }

    /// A customer's facts in one projection (`satisfaction`, `loyalty` or `churn`); `None`
    /// for another name.
    pub fn facts_in(
        &self,
        projection: &str,
        customer: &str,
    ) -> Result<Option<CustomerFacts>, ProjectorError> {
        let (tree, name) = match projection {
            "satisfaction" => (&self.satisfaction, SATISFACTION.name),
            "loyalty" => (&self.loyalty, LOYALTY.name),
            "churn" => (&self.churn, CHURN.name),
            _ => return Ok(None),
        };
        load(tree, name, customer).map(Some)
    }

    /// Every customer id (the churn projection holds every kind), without decoding states.
    pub fn customer_ids(&self) -> impl Iterator<Item = Result<String, ProjectorError>> + '_ {
        self.churn
            .states()
            .map(|r| r.map(|(k, _)| k).map_err(ProjectorError::from))
            .filter(|r| !matches!(r, Ok(k) if k == MODEL_CUSTOMER))
    }

    /// A customer's facts in each projection (satisfaction, loyalty, churn).
    pub fn facts(
        &self,
        customer: &str,
    ) -> Result<(CustomerFacts, CustomerFacts, CustomerFacts), ProjectorError> {
        Ok((
            load(&self.satisfaction, SATISFACTION.name, customer)?,
            load(&self.loyalty, LOYALTY.name, customer)?,
            load(&self.churn, CHURN.name, customer)?,
        ))
    }

    /// A customer's three views at `as_of`; `None` if the ledger knows nothing of them.
    pub fn customer(
        &self,
        customer: &str,
        as_of: AsOf,
    ) -> Result<Option<CustomerViews>, ProjectorError> {
        let (s, l, c) = self.facts(customer)?;
        if ![&s, &l, &c].iter().any(|f| f.has_touchpoints(as_of)) {
            return Ok(None);
        }
        let model = self.model(as_of)?;
        Ok(Some(self.rules.customer_views(
            &s,
            &l,
            &c,
            model.as_ref(),
            as_of,
        )))
    }

    /// Every customer, with their churn-projection facts (which hold every kind), in id order.
    pub fn customers(
        &self,
    ) -> impl Iterator<Item = Result<(String, CustomerFacts), ProjectorError>> + '_ {
        self.customers_after(None)
    }

    /// The customers after id `after` (all with `None`), as [`ReadModels::customers`].
    pub fn customers_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<(String, CustomerFacts), ProjectorError>> + '_ {
        self.churn
            .states_after(after)
            .filter(|r| !matches!(r, Ok((k, _)) if k == MODEL_CUSTOMER))
            .map(|r| {
                let (k, v) = r?;
                let f = decode(&v).map_err(|detail| ProjectorError::Decode {
                    projection: CHURN.name,
                    key: k.clone(),
                    detail,
                })?;
                Ok((k, f))
            })
    }

    /// The population figures at `as_of` (one pass over every customer).
    pub fn population(&self, as_of: AsOf) -> Result<PopulationView, ProjectorError> {
        Ok(self.population_builder(as_of)?.finish())
    }

    /// A customer's population-relative ranks at `as_of`: RFM quintile scores and pyramid
    /// tier (one pass over every customer); `None` for a customer without purchases.
    pub fn ranks(&self, customer: &str, as_of: AsOf) -> Result<Option<Ranks>, ProjectorError> {
        Ok(ranks_in(&self.population_builder(as_of)?, customer))
    }

    /// Every customer visible at `as_of`, accumulated (not yet finished).
    pub fn population_builder(&self, as_of: AsOf) -> Result<PopulationBuilder, ProjectorError> {
        let model = self.model(as_of)?;
        let mut b = PopulationBuilder::new(as_of, self.rules.population.clone(), &self.rules.churn);
        for r in self.customers() {
            let (id, f) = r?;
            if !f.has_touchpoints(as_of) {
                continue;
            }
            let views = self.rules.customer(&f, &f, &f, model.as_ref(), as_of);
            b.add(&id, &f, &views, &self.rules.satisfaction);
        }
        Ok(b)
    }
}

/// A customer's ranks among every customer of a population (`None` without purchases).
pub fn ranks_in(b: &PopulationBuilder, customer: &str) -> Option<Ranks> {
    let rfm = b.rfm_scores().remove(customer);
    let tier = b
        .pyramid_ranking()
        .into_iter()
        .find(|(c, _, _)| c == customer)
        .map(|(_, _, t)| t);
    rfm.zip(tier).map(|((r, f, m), tier)| Ranks {
        recency: r,
        frequency: f,
        monetary: m,
        tier,
    })
}

/// A customer's population-relative ranks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Ranks {
    /// RFM recency score 1–5 (5 = most recent).
    pub recency: u8,
    /// RFM frequency score 1–5.
    pub frequency: u8,
    /// RFM monetary score 1–5.
    pub monetary: u8,
    /// Pyramid tier: vip, major, ordinary, small.
    pub tier: &'static str,
}
