//! The quality gate: whether a new version becomes `CURRENT`.

/// The gate's verdict and its reason in words (carried by `model.published`).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub promote: bool,
    pub reason: String,
}

/// The version currently served, as the gate sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incumbent {
    pub version: String,
    pub accuracy: f64,
}

/// Decides on promotion: the accuracy must reach `floor`, and, unless `force`,
/// must not be worse than the incumbent's by more than `tolerance`.
pub fn decide(accuracy: f64, floor: f64, tolerance: f64, incumbent: Option<&Incumbent>, force: bool) -> Decision {
    // NaN never passes.
    if accuracy.is_nan() || accuracy < floor {
        return Decision {
            promote: false,
            reason: format!("not promoted: test accuracy {accuracy:.4} is below the floor {floor:.4}"),
        };
    }
    match incumbent {
        None => Decision {
            promote: true,
            reason: format!(
                "promoted: test accuracy {accuracy:.4} reaches the floor {floor:.4} and no version was current"
            ),
        },
        Some(cur) if force => Decision {
            promote: true,
            reason: format!(
                "promoted (forced): test accuracy {accuracy:.4} reaches the floor {floor:.4}; current {} had {:.4}",
                cur.version, cur.accuracy
            ),
        },
        Some(cur) if accuracy + tolerance < cur.accuracy => Decision {
            promote: false,
            reason: format!(
                "not promoted: test accuracy {accuracy:.4} is worse than current {}'s {:.4} by more than the tolerance {tolerance:.4}",
                cur.version, cur.accuracy
            ),
        },
        Some(cur) => Decision {
            promote: true,
            reason: format!(
                "promoted: test accuracy {accuracy:.4} reaches the floor {floor:.4} and is within {tolerance:.4} of (or better than) current {}'s {:.4}",
                cur.version, cur.accuracy
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(accuracy: f64) -> Incumbent {
        Incumbent { version: "v1".into(), accuracy }
    }

    #[test]
    fn a_model_below_the_floor_is_never_promoted_even_forced() {
        let d = decide(0.95, 0.97, 0.01, None, true);
        assert!(!d.promote);
        assert!(d.reason.contains("below the floor"), "{}", d.reason);
    }

    #[test]
    fn the_first_model_above_the_floor_is_promoted() {
        assert!(decide(0.98, 0.97, 0.0, None, false).promote);
    }

    #[test]
    fn a_model_worse_than_current_beyond_the_tolerance_is_held_back_unless_forced() {
        let d = decide(0.980, 0.97, 0.002, Some(&current(0.990)), false);
        assert!(!d.promote);
        assert!(d.reason.contains("worse than current v1"), "{}", d.reason);
        assert!(decide(0.980, 0.97, 0.002, Some(&current(0.990)), true).promote);
    }

    #[test]
    fn a_model_within_the_tolerance_or_better_is_promoted() {
        assert!(decide(0.989, 0.97, 0.002, Some(&current(0.990)), false).promote);
        assert!(decide(0.995, 0.97, 0.0, Some(&current(0.990)), false).promote);
    }

    #[test]
    fn a_nan_accuracy_is_not_promoted() {
        assert!(!decide(f64::NAN, 0.0, 0.0, None, true).promote);
    }
}
