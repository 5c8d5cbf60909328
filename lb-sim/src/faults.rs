//! Runtime faults of a simulated instance.
//!
//! | mode | effect |
//! |---|---|
//! | `none` | normal service (after `die` or `refuse`: listener re-bound; after `die`: fresh engine, empty cache) |
//! | `refuse` | the listening socket is closed: new connections get `ECONNREFUSED` (open keep-alive connections keep working) |
//! | `unavailable` (`503`) | every vLLM endpoint answers 503 with a vLLM-style error body |
//! | `hang` | requests (and `/health`) are read but not answered until the fault is cleared (streams already started continue) |
//! | `slow` (`factor`) | every engine step takes `factor` times longer |
//! | `reset` (`after_tokens`) | each response is cut (connection closed without a proper end) after N generated tokens |
//! | `die` | the listener closes, every open connection is dropped, in-flight requests are aborted |
//!
//! A fault can carry `duration_s` (wall seconds) after which it reverts to `none`.
//! Set at start with `--fault MODE[:ARG]`, at runtime with `POST /sim/fault` on the instance
//! (`{"mode":"slow","factor":3}`), or for any instance (needed to undo `refuse`/`die`) with
//! `POST /instances/{i}/fault` on the process admin port, or from the CLI:
//! `vllm-sim fault --url http://127.0.0.1:9000 slow:3`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A bad fault specification.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid fault {0:?}: expected none|refuse|503|unavailable|hang|slow:K|reset:N|die")]
pub struct FaultParseError(pub String);

/// What an instance does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum FaultMode {
    /// Normal service.
    #[default]
    None,
    /// Close the listener.
    Refuse,
    /// Answer 503.
    #[serde(alias = "503")]
    Unavailable,
    /// Never answer.
    Hang,
    /// Slow every step down.
    Slow {
        /// Multiplier of step time.
        factor: f64,
    },
    /// Cut responses after some tokens.
    Reset {
        /// Tokens generated before the cut.
        after_tokens: usize,
    },
    /// Die: close everything.
    Die,
}

/// A fault with an optional duration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct FaultSpec {
    /// The mode.
    #[serde(flatten)]
    pub mode: FaultMode,
    /// Revert to `none` after this many wall seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
}

impl FaultSpec {
    /// Parses `MODE[:ARG]`, e.g. `slow:3`, `reset:10`, `503`, `hang`.
    pub fn parse(s: &str) -> Result<Self, FaultParseError> {
        let err = || FaultParseError(s.to_string());
        let (mode, arg) = match s.split_once(':') {
            Some((m, a)) => (m, Some(a)),
            None => (s, None),
        };
        let mode = match (mode, arg) {
            ("none", None) => FaultMode::None,
            ("refuse", None) => FaultMode::Refuse,
            ("503" | "unavailable", None) => FaultMode::Unavailable,
            ("hang", None) => FaultMode::Hang,
            ("die", None) => FaultMode::Die,
            ("slow", Some(a)) => {
                let factor: f64 = a.parse().map_err(|_| err())?;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(err());
                }
                FaultMode::Slow { factor }
            }
            ("reset", Some(a)) => FaultMode::Reset {
                after_tokens: a.parse().map_err(|_| err())?,
            },
            _ => return Err(err()),
        };
        Ok(Self {
            mode,
            duration_s: None,
        })
    }

    /// Checks numeric arguments of a spec received as JSON.
    pub fn validate(&self) -> Result<(), FaultParseError> {
        if let FaultMode::Slow { factor } = self.mode
            && !(factor.is_finite() && factor > 0.0)
        {
            return Err(FaultParseError(format!("slow factor {factor}")));
        }
        if let Some(d) = self.duration_s
            && !(d.is_finite() && d >= 0.0)
        {
            return Err(FaultParseError(format!("duration_s {d}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cli_and_json() {
        assert_eq!(
            FaultSpec::parse("slow:3").map(|f| f.mode),
            Ok(FaultMode::Slow { factor: 3.0 })
        );
        assert_eq!(
            FaultSpec::parse("reset:5").map(|f| f.mode),
            Ok(FaultMode::Reset { after_tokens: 5 })
        );
        assert_eq!(
            FaultSpec::parse("503").map(|f| f.mode),
            Ok(FaultMode::Unavailable)
        );
        assert!(FaultSpec::parse("slow").is_err());
        assert!(FaultSpec::parse("slow:-1").is_err());
        let j: FaultSpec =
            serde_json::from_str(r#"{"mode":"reset","after_tokens":3,"duration_s":1.5}"#)
                .expect("json");
        assert_eq!(j.mode, FaultMode::Reset { after_tokens: 3 });
        assert_eq!(j.duration_s, Some(1.5));
        let j: FaultSpec = serde_json::from_str(r#"{"mode":"503"}"#).expect("json");
        assert_eq!(j.mode, FaultMode::Unavailable);
    }
}
