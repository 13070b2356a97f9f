//! The truncated normal distribution as Optuna's TPE computes it (`samplers/_tpe/_truncnorm.py`,
//! itself from SciPy), scalar by scalar, plus `erf`/`erfc` (FreeBSD's `s_erf.c`, which is what
//! glibc and therefore Python's `math.erf` use).
//!
//! Bounds `a`, `b` and the variable are standardised: `(x - mu) / sigma`.

// The coefficients are kept digit for digit as in s_erf.c.
#![allow(clippy::excessive_precision)]

use std::f64::consts::{LN_2, PI, SQRT_2};

const ERX: f64 = 8.45062911510467529297e-01;
const EFX: f64 = 1.28379167095512586316e-01;
const EFX8: f64 = 1.02703333676410069053e+00;
const PP: [f64; 5] = [
    1.28379167095512558561e-01,
    -3.25042107247001499370e-01,
    -2.84817495755985104766e-02,
    -5.77027029648944159157e-03,
    -2.37630166566501626084e-05,
];
const QQ: [f64; 5] = [
    3.97917223959155352819e-01,
    6.50222499887672944485e-02,
    5.08130628187576562776e-03,
    1.32494738004321644526e-04,
    -3.96022827877536812320e-06,
];
const PA: [f64; 7] = [
    -2.36211856075265944077e-03,
    4.14856118683748331666e-01,
    -3.72207876035701323847e-01,
    3.18346619901161753674e-01,
    -1.10894694282396677476e-01,
    3.54783043256182359371e-02,
    -2.16637559486879084300e-03,
];
const QA: [f64; 6] = [
    1.06420880400844228286e-01,
    5.40397917702171048937e-01,
    7.18286544141962662868e-02,
    1.26171219808761642112e-01,
    1.36370839120290507362e-02,
    1.19844998467991074170e-02,
];
const RA: [f64; 8] = [
    -9.86494403484714822705e-03,
    -6.93858572707181764372e-01,
    -1.05586262253232909814e+01,
    -6.23753324503260060396e+01,
    -1.62396669462573470355e+02,
    -1.84605092906711035994e+02,
    -8.12874355063065934246e+01,
    -9.81432934416914548592e+00,
];
const SA: [f64; 8] = [
    1.96512716674392571292e+01,
    1.37657754143519042600e+02,
    4.34565877475229228821e+02,
    6.45387271733267880336e+02,
    4.29008140027567833386e+02,
    1.08635005541779435134e+02,
    6.57024977031928170135e+00,
    -6.04244152148580987438e-02,
];
const RB: [f64; 7] = [
    -9.86494292470009928597e-03,
    -7.99283237680523006574e-01,
    -1.77579549177547519889e+01,
    -1.60636384855821916062e+02,
    -6.37566443368389627722e+02,
    -1.02509513161107724954e+03,
    -4.83519191608651397019e+02,
];
const SB: [f64; 7] = [
    3.03380607434824582924e+01,
    3.25792512996573918826e+02,
    1.53672958608443695994e+03,
    3.19985821950859553908e+03,
    2.55305040643316442583e+03,
    4.74528541206955367215e+02,
    -2.24409524465858183362e+01,
];

/// Horner evaluation of `c[0] + c[1] z + ...`.
fn poly(c: &[f64], z: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &ci| acc * z + ci)
}

/// `1 + z (q[0] + q[1] z + ...)`.
fn poly1(q: &[f64], z: f64) -> f64 {
    1.0 + z * poly(q, z)
}

fn high_word(x: f64) -> u32 {
    (x.to_bits() >> 32) as u32
}

/// exp(-x²) · (asymptotic rational) / x for 1.25 <= |x| < 28, with FreeBSD's split of x into a
/// short high part so that exp(-x²) keeps full precision.
fn erfc_tail(ix: u32, ax: f64) -> f64 {
    let s = 1.0 / (ax * ax);
    let (r, big_s) =
        if ix < 0x4006db6d { (poly(&RA, s), poly1(&SA, s)) } else { (poly(&RB, s), poly1(&SB, s)) };
    let z = f64::from_bits(ax.to_bits() & 0xffff_ffff_0000_0000);
    (-z * z - 0.5625).exp() * ((z - ax) * (z + ax) + r / big_s).exp() / ax
}

/// The error function.
pub fn erf(x: f64) -> f64 {
    let hx = high_word(x);
    let negative = (hx >> 31) != 0;
    let ix = hx & 0x7fff_ffff;
    if ix >= 0x7ff0_0000 {
        return if x.is_nan() {
            x
        } else if negative {
            -1.0
        } else {
            1.0
        };
    }
    if ix < 0x3feb_0000 {
        if ix < 0x3e30_0000 {
            if ix < 0x0080_0000 {
                return 0.125 * (8.0 * x + EFX8 * x);
            }
            return x + EFX * x;
        }
        let z = x * x;
        return x + x * (poly(&PP, z) / poly1(&QQ, z));
    }
    if ix < 0x3ff4_0000 {
        let s = x.abs() - 1.0;
        let p = poly(&PA, s) / poly1(&QA, s);
        return if negative { -ERX - p } else { ERX + p };
    }
    if ix >= 0x4018_0000 {
        return if negative { -1.0 } else { 1.0 };
    }
    let r = erfc_tail(ix, x.abs());
    if negative { r - 1.0 } else { 1.0 - r }
}

/// The complementary error function `1 - erf(x)`, accurate in the right tail.
pub fn erfc(x: f64) -> f64 {
    let hx = high_word(x);
    let negative = (hx >> 31) != 0;
    let ix = hx & 0x7fff_ffff;
    if ix >= 0x7ff0_0000 {
        return if x.is_nan() {
            x
        } else if negative {
            2.0
        } else {
            0.0
        };
    }
    if ix < 0x3feb_0000 {
        if ix < 0x3c70_0000 {
            return 1.0 - x;
        }
        let z = x * x;
        let y = poly(&PP, z) / poly1(&QQ, z);
        if hx < 0x3fd0_0000 {
            return 1.0 - (x + x * y);
        }
        return 0.5 - (x - 0.5 + x * y);
    }
    if ix < 0x3ff4_0000 {
        let s = x.abs() - 1.0;
        let p = poly(&PA, s) / poly1(&QA, s);
        return if negative { 1.0 + ERX + p } else { 1.0 - ERX - p };
    }
    if ix < 0x403c_0000 {
        if negative && ix >= 0x4018_0000 {
            return 2.0;
        }
        let r = erfc_tail(ix, x.abs());
        return if negative { 2.0 - r } else { r };
    }
    if negative { 2.0 } else { 0.0 }
}

const NORM_PDF_LOG_C: f64 = 0.918_938_533_204_672_7; // ln(sqrt(2 pi))
const NDTRI_EXP_APPROX_C: f64 = 0.551_328_895_421_792_1; // sqrt(3) / pi

/// Standard normal CDF, Optuna's `_ndtr` (central formula).
pub fn ndtr(a: f64) -> f64 {
    0.5 + 0.5 * erf(a / SQRT_2)
}

/// Standard normal CDF with tail-accurate branches (`_ndtr_single`).
fn ndtr_single(a: f64) -> f64 {
    let x = a / SQRT_2;
    if x < -1.0 / SQRT_2 {
        0.5 * erfc(-x)
    } else if x < 1.0 / SQRT_2 {
        0.5 + 0.5 * erf(x)
    } else {
        1.0 - 0.5 * erfc(x)
    }
}

/// log of the standard normal CDF (`_log_ndtr_single`), with an asymptotic series below -20.
pub fn log_ndtr(a: f64) -> f64 {
    if a > 6.0 {
        return -ndtr_single(-a);
    }
    if a > -20.0 {
        return ndtr_single(a).ln();
    }
    let log_lhs = -0.5 * a * a - (-a).ln() - 0.5 * (2.0 * PI).ln();
    let mut last_total = 0.0f64;
    let mut right_hand_side = 1.0f64;
    let mut numerator = 1.0;
    let mut denom_factor = 1.0;
    let denom_cons = 1.0 / (a * a);
    let mut sign = 1.0;
    let mut i = 0.0;
    while (last_total - right_hand_side).abs() > f64::EPSILON {
        i += 1.0;
        last_total = right_hand_side;
        sign = -sign;
        denom_factor *= denom_cons;
        numerator *= 2.0 * i - 1.0;
        right_hand_side += sign * numerator * denom_factor;
    }
    log_lhs + right_hand_side.ln()
}

fn log_diff(log_p: f64, log_q: f64) -> f64 {
    log_p + (-(log_q - log_p).exp()).ln_1p()
}

/// numpy's `logaddexp`.
pub fn logaddexp(x: f64, y: f64) -> f64 {
    if x == y {
        return x + LN_2;
    }
    let tmp = x - y;
    if tmp > 0.0 {
        x + (-tmp).exp().ln_1p()
    } else if tmp <= 0.0 {
        y + tmp.exp().ln_1p()
    } else {
        tmp
    }
}

/// log of the standard normal probability mass in `[a, b]` (`_log_gauss_mass`).
pub fn log_gauss_mass(a: f64, b: f64) -> f64 {
    if b <= 0.0 {
        log_diff(log_ndtr(b), log_ndtr(a))
    } else if a > 0.0 {
        log_diff(log_ndtr(-a), log_ndtr(-b))
    } else {
        (-ndtr(a) - ndtr(-b)).ln_1p()
    }
}

/// x with `log_ndtr(x) = y`, by Newton's method from Optuna's initial guesses (`_ndtri_exp`).
pub fn ndtri_exp(y: f64) -> f64 {
    let flipped = y > -1e-2;
    let z = if flipped { (-y.exp_m1()).ln() } else { y };
    let mut x = if z < -5.0 {
        -(-2.0 * (z + NORM_PDF_LOG_C)).sqrt()
    } else {
        -NDTRI_EXP_APPROX_C * (-z).exp_m1().ln()
    };
    for _ in 0..100 {
        let log_ndtr_x = log_ndtr(x);
        let log_norm_pdf_x = -0.5 * x * x - NORM_PDF_LOG_C;
        let dx = (log_ndtr_x - z) * (log_ndtr_x - log_norm_pdf_x).exp();
        x -= dx;
        if dx.abs() < 1e-8 * x.abs() {
            break;
        }
    }
    if flipped { -x } else { x }
}

/// The quantile at `q` of the standard normal truncated to `[a, b]` (`ppf`).
pub fn ppf(q: f64, a: f64, b: f64) -> f64 {
    if a == b {
        return f64::NAN;
    }
    if q == 0.0 {
        return a;
    }
    if q == 1.0 {
        return b;
    }
    let log_mass = log_gauss_mass(a, b);
    if a < 0.0 {
        ndtri_exp(logaddexp(log_ndtr(a), q.ln() + log_mass))
    } else {
        -ndtri_exp(logaddexp(log_ndtr(-b), (-q).ln_1p() + log_mass))
    }
}

/// log density at `x` of N(loc, scale²) truncated to standardised bounds `[a, b]` (`logpdf`).
pub fn logpdf(x: f64, a: f64, b: f64, loc: f64, scale: f64) -> f64 {
    let z = (x - loc) / scale;
    if a == b {
        return f64::NAN;
    }
    if z < a || z > b {
        return f64::NEG_INFINITY;
    }
    -(z * z) / 2.0 - NORM_PDF_LOG_C - log_gauss_mass(a, b) - scale.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rtol: f64) -> bool {
        (a - b).abs() <= rtol * b.abs().max(1e-300) || a == b
    }

    #[test]
    fn erf_matches_python_math_erf() {
        // (x, math.erf(x), math.erfc(x)) from Python 3.11 on glibc.
        let cases: &[(f64, f64, f64)] = &[
            (0.0, 0.0, 1.0),
            (1e-10, 1.1283791670955126e-10, 0.999999999887162),
            (0.3, 0.3286267594591274, 0.6713732405408726),
            (-0.7, -0.6778011938374184, 1.6778011938374184),
            (1.0, 0.8427007929497149, 0.15729920705028513),
            (2.0, 0.9953222650189527, 0.004677734981047265),
            (-3.5, -0.9999992569016276, 1.9999992569016276),
            (5.0, 0.9999999999984626, 1.5374597944280351e-12),
            (10.0, 1.0, 2.088487583762545e-45),
            (27.0, 1.0, 5.23705e-319),
        ];
        for &(x, e, ec) in cases {
            assert!(close(erf(x), e, 1e-15), "erf({x}) = {} want {e}", erf(x));
            assert!(close(erfc(x), ec, 1e-13), "erfc({x}) = {} want {ec}", erfc(x));
        }
    }

    #[test]
    fn truncnorm_matches_optuna() {
        // From tests/interop/truncnorm_reference.py (Optuna 5.0's _truncnorm on the same inputs).
        assert!(close(log_ndtr(-25.0), -316.6394080080202, 1e-13));
        assert!(close(log_ndtr(7.0), -1.279812543885835e-12, 1e-12));
        assert!(close(log_gauss_mass(-1.0, 2.0), -0.20016629432446262, 1e-13));
        assert!(close(log_gauss_mass(1.0, 3.0), -1.8495664205476083, 1e-13));
        assert!(close(log_gauss_mass(-5.0, -4.0), -10.369193541521652, 1e-12));
        assert!(close(ppf(0.3, -1.0, 2.0), -0.24240381788922705, 1e-9));
        assert!(close(ppf(0.9, 0.5, 4.0), 1.8679824587844542, 1e-9));
        assert!(close(ppf(0.01, -8.0, -6.0), -6.707985268734323, 1e-9));
        assert!(close(logpdf(0.2, -1.0, 2.0, 0.1, 0.5), -0.045625058320264755, 1e-12));
        assert_eq!(logpdf(3.0, -1.0, 2.0, 0.0, 1.0), f64::NEG_INFINITY);
    }
}
