//! Picking the next token from logits: greedy argmax, or seeded temperature / top-k / top-p
//! sampling that is deterministic for a given seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; `0.0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`Some(0)` is rejected).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`, in `(0, 1]`.
    pub top_p: Option<f32>,
    /// Seed of the random generator: equal seeds and logits give equal tokens.
    pub seed: u64,
}

impl SamplingConfig {
    /// Always the most likely token (lowest id on ties).
    pub fn greedy() -> SamplingConfig {
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Whether this configuration is greedy.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(EngineError::InvalidSampling { reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return invalid("top_k must be at least 1".to_owned());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return invalid(format!("top_p {p} must be in (0, 1]"));
        }
        Ok(())
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig::greedy()
    }
}

/// Picks token ids from logits according to a [`SamplingConfig`], carrying the random state
/// from one token to the next.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `config.seed`; fails on an invalid configuration.
    pub fn new(config: SamplingConfig) -> Result<Sampler> {
        config.validate()?;
        Ok(Sampler {
            config,
            rng: StdRng::seed_from_u64(config.seed),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// The next token id. Fails on empty logits or logits containing NaN.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(EngineError::InvalidLogits {
                reason: "no logits".to_owned(),
            });
        }
        if logits.iter().any(|l| l.is_nan()) {
            return Err(EngineError::InvalidLogits {
                reason: "logits contain nan".to_owned(),
            });
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(EngineError::InvalidLogits {
                reason: "more logits than u32 ids".to_owned(),
            });
        }
        if self.config.is_greedy() {
            return Ok(argmax(logits));
        }
        Ok(self.sample_random(logits))
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        // Most likely first, lower id first on ties: a total order, so the candidate list
        // (and hence the draw) is deterministic.
        let by_rank = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        if let Some(k) = self.config.top_k
            && k < ids.len()
        {
            ids.select_nth_unstable_by(k - 1, by_rank);
            ids.truncate(k);
        }
        ids.sort_unstable_by(by_rank);

        let t = self.config.temperature as f64;
        let max = logits[ids[0] as usize] as f64;
        let mut probs: Vec<f64> = ids
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= total;
        }
        if let Some(top_p) = self.config.top_p {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            ids.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let u = self.rng.random::<f64>() * total;
        let mut cum = 0.0;
        for (&id, p) in ids.iter().zip(&probs) {
            cum += p;
            if u < cum {
                return id;
            }
        }
        // Rounding can leave `u` just above the last cumulative sum.
        ids[ids.len() - 1]
    }
}

/// Index of the largest logit, lowest index on ties.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingConfig::greedy()).expect("valid config");
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]).expect("valid logits"), 1);
        assert_eq!(
            s.sample(&[f32::NEG_INFINITY, -5.0]).expect("valid logits"),
            1
        );
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 17) as f32 * 0.3).collect();
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: Some(5),
            top_p: None,
            seed: 42,
        };
        let draw = |cfg| {
            let mut s = Sampler::new(cfg).expect("valid config");
            (0..50)
                .map(|_| s.sample(&logits).expect("valid logits"))
                .collect::<Vec<_>>()
        };
        let a = draw(cfg);
        assert_eq!(a, draw(cfg));
        assert_ne!(a, draw(SamplingConfig { seed: 43, ..cfg }));
        // The 5 best: logit 4.8 (i % 17 == 16) at ids 16, 33, 50, 67, 84.
        assert!(
            a.iter().all(|id| [16, 33, 50, 67, 84].contains(id)),
            "{a:?}"
        );
    }

    #[test]
    fn top_p_keeps_the_dominant_token() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
            seed: 7,
        };
        let mut s = Sampler::new(cfg).expect("valid config");
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 10.0, 0.0, 1.0]).expect("valid logits"), 1);
        }
    }

    #[test]
    fn invalid_configs_and_logits_are_errors() {
        let bad = [
            SamplingConfig {
                temperature: -1.0,
                ..SamplingConfig::greedy()
            },
            SamplingConfig {
                temperature: f32::NAN,
                ..SamplingConfig::greedy()
            },
            SamplingConfig {
                top_k: Some(0),
                ..SamplingConfig::greedy()
            },
            SamplingConfig {
                top_p: Some(1.5),
                ..SamplingConfig::greedy()
            },
        ];
        for cfg in bad {
            assert!(
                matches!(Sampler::new(cfg), Err(EngineError::InvalidSampling { .. })),
                "{cfg:?}"
            );
        }
        let mut s = Sampler::new(SamplingConfig::greedy()).expect("valid config");
        assert!(matches!(
            s.sample(&[]),
            Err(EngineError::InvalidLogits { .. })
        ));
        assert!(matches!(
            s.sample(&[1.0, f32::NAN]),
            Err(EngineError::InvalidLogits { .. })
        ));
    }
}
