//! The maximum-likelihood search the models share: Nelder–Mead (argmin) over unconstrained
//! (log-space) parameters, from a start point with a unit simplex.

use argmin::core::{CostFunction, Executor, State};
use argmin::solver::neldermead::NelderMead;

/// Minimise `cost` from `start` (a unit step along each axis spans the first simplex) until the
/// spread of the simplex's costs is below 1e-12 or 5,000 iterations. Returns the best point
/// and the iterations used; an optimiser failure is its message.
pub(crate) fn minimise<C>(cost: C, start: Vec<f64>) -> Result<(Vec<f64>, u64), String>
where
    C: CostFunction<Param = Vec<f64>, Output = f64>,
{
    let mut simplex = vec![start.clone()];
    for i in 0..start.len() {
        let mut v = start.clone();
        v[i] += 1.0;
        simplex.push(v);
    }
    let solver = NelderMead::new(simplex)
        .with_sd_tolerance(1e-12)
        .map_err(|e| e.to_string())?;
    let res = Executor::new(cost, solver)
        .configure(|s| s.max_iters(5000))
        .run()
        .map_err(|e| e.to_string())?;
    let state = res.state();
    let best = state
        .get_best_param()
        .ok_or_else(|| "no best parameters".to_owned())?;
    Ok((best.clone(), state.get_iter()))
}

/// The cost of a model whose log-likelihood is a sum over customers: the negative
/// log-likelihood **per customer** (the stopping rule then means the same relative precision
/// at any population size), at `ll(point, data)`; outside the numerically valid region the
/// simplex is pushed back with `f64::MAX`, never given NaN.
pub(crate) struct MeanNegLl<'a, T> {
    pub data: &'a [T],
    pub ll: fn(&[f64], &[T]) -> f64,
}

impl<T> CostFunction for MeanNegLl<'_, T> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, v: &Self::Param) -> Result<f64, argmin::core::Error> {
        let ll = (self.ll)(v, self.data);
        Ok(if ll.is_finite() {
            -ll / self.data.len() as f64
        } else {
            f64::MAX
        })
    }
}
