//! `UpdatedAt::from_body` (src/domain.rs), which reads every `queue-change` body and NATS
//! payload, on the input as a body and on an instant built from the same bytes with
//! `arbitrary`, written as Flagsmith's ISO 8601 strings and as numbers.
//!
//! Checked, beyond "no panic":
//! - every accepted value is finite and within 1970-01-01 .. 9999-12-31, and its Display form,
//!   what SDKs receive, always has a `.`, no exponent, and reads back as the same f64, in the
//!   event frame as in the payload another instance reads from NATS (SPEC §1);
//! - the ISO 8601 forms of an instant (an offset or `Z`, naive, 0 to 9 fractional digits) and
//!   its numeric forms (a decimal, an exponent) are all accepted and read as the same f64: the
//!   correctly rounded value of the decimal.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use flagsmith_sse::domain::{EnvironmentKey, Update, UpdatedAt};
use libfuzzer_sys::fuzz_target;

/// 9999-12-31T23:59:59Z, the last second ISO 8601's four-digit years can write.
const MAX_UNIX_SECONDS: i64 = 253_402_300_799;

fuzz_target!(|data: &[u8]| {
    if let Ok(updated_at) = UpdatedAt::from_body(data) {
        check_accepted(updated_at);
    }
    if let Ok(instant) = Instant::arbitrary(&mut Unstructured::new(data)) {
        check_forms_agree(instant);
    }
});

fn check_accepted(updated_at: UpdatedAt) {
    let seconds = updated_at.as_secs_f64();
    assert!(seconds.is_finite(), "{seconds}");
    assert!(
        (0.0..=MAX_UNIX_SECONDS as f64).contains(&seconds),
        "{seconds}"
    );
    let text = updated_at.to_string();
    assert!(
        text.contains('.'),
        "{text} has no point: Flutter drops integers"
    );
    assert!(
        text.bytes()
            .all(|byte| byte.is_ascii_digit() || byte == b'.'),
        "{text} is not a plain decimal"
    );
    assert_eq!(
        text.parse::<f64>(),
        Ok(seconds),
        "{text} reads back otherwise"
    );
    let update = Update {
        key: EnvironmentKey::parse("env").expect("a key"),
        updated_at,
    };
    assert_eq!(
        update.event_frame(),
        format!("event: environment_updated\ndata: {{\"updated_at\": {text}}}\nretry: 15000\n\n")
    );
    assert_eq!(
        UpdatedAt::from_body(update.payload().as_bytes()),
        Ok(updated_at),
        "another instance reads {} otherwise",
        update.payload()
    );
}

/// An instant in range, and how an ISO 8601 string writes it.
#[derive(Debug, Arbitrary)]
struct Instant {
    /// Modulo the range.
    seconds: u64,
    /// Modulo a second.
    nanos: u32,
    /// Fractional digits written, modulo 10; the instant is truncated to them.
    digits: u8,
    /// The offset written, modulo a day; ignored for naive and `Z` forms.
    offset_minutes: i16,
    form: Form,
}

#[derive(Debug, Arbitrary)]
enum Form {
    /// `+00:00` or another offset: what Flagsmith's API sends.
    Offset,
    Zulu,
    /// Without an offset, as older Flagsmith docs show: UTC.
    Naive,
}

fn check_forms_agree(instant: Instant) {
    const MAX: u64 = MAX_UNIX_SECONDS as u64;
    let seconds = instant.seconds % (MAX + 1);
    let digits = u32::from(instant.digits % 10);
    let scale = 10_u32.pow(9 - digits);
    // The range ends at 9999-12-31T23:59:59 exactly.
    let fraction = match seconds {
        MAX => 0,
        _ => instant.nanos % 1_000_000_000 / scale,
    };
    let decimal = match digits {
        0 => seconds.to_string(),
        _ => format!("{seconds}.{fraction:0width$}", width = digits as usize),
    };
    let expected: f64 = decimal.parse().expect("a decimal");

    let numbers = [
        decimal.clone(),
        format!("{seconds}.{fraction:0width$}000", width = digits as usize),
        format!("{decimal}e0"),
        format!(
            "{}e-{digits}",
            u128::from(seconds) * 10_u128.pow(digits) + u128::from(fraction)
        ),
    ];
    for number in &numbers {
        let body = format!("{{\"updated_at\": {number}}}");
        let read = UpdatedAt::from_body(body.as_bytes())
            .unwrap_or_else(|err| panic!("{body} refused: {err}"));
        assert_eq!(read.as_secs_f64(), expected, "{body}");
    }

    let utc = time::OffsetDateTime::from_unix_timestamp(seconds as i64).expect("in range")
        + time::Duration::nanoseconds(i64::from(fraction * scale));
    let offset_minutes = match instant.form {
        Form::Offset => i32::from(instant.offset_minutes) % (24 * 60),
        Form::Zulu | Form::Naive => 0,
    };
    let offset = time::UtcOffset::from_whole_seconds(offset_minutes * 60).expect("within a day");
    let Some(local) = utc.checked_to_offset(offset) else {
        // The offset moves it past what four digits write.
        return;
    };
    let mut iso = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        local.year(),
        u8::from(local.month()),
        local.day(),
        local.hour(),
        local.minute(),
        local.second()
    );
    if digits > 0 {
        iso.push_str(&format!(".{fraction:0width$}", width = digits as usize));
    }
    match instant.form {
        Form::Offset => iso.push_str(&format!(
            "{}{:02}:{:02}",
            if offset_minutes < 0 { '-' } else { '+' },
            offset_minutes.abs() / 60,
            offset_minutes.abs() % 60
        )),
        Form::Zulu => iso.push('Z'),
        Form::Naive => {}
    }
    let body = format!("{{\"updated_at\": \"{iso}\"}}");
    match UpdatedAt::from_body(body.as_bytes()) {
        Ok(read) => assert_eq!(
            read.as_secs_f64(),
            expected,
            "{body} and {decimal} are the same instant"
        ),
        Err(err) => panic!("{body} ({decimal}) refused: {err}"),
    }
}
