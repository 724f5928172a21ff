//! Pure helpers without a server: `keep_alive` decoding, Go durations, model names, owners
//! and local times.

use super::*;

#[test]
fn keep_alive_formats() {
    use serde_json::json;
    let ka = |v: Value| parse_keep_alive(Some(&v));
    let secs = |s| Ok(Some(KeepAlive::For(Duration::from_secs(s))));
    assert_eq!(ka(json!(300)).map_err(|e| e.message), secs(300));
    assert_eq!(ka(json!(1.9)).map_err(|e| e.message), secs(1));
    assert_eq!(ka(json!(0)).map_err(|e| e.message), secs(0));
    assert_eq!(
        ka(json!(-1)).map_err(|e| e.message),
        Ok(Some(KeepAlive::Forever))
    );
    assert_eq!(
        ka(json!(-0.5)).map_err(|e| e.message),
        Ok(Some(KeepAlive::Forever))
    );
    assert_eq!(ka(json!("5m")).map_err(|e| e.message), secs(300));
    assert_eq!(ka(json!("1h30m")).map_err(|e| e.message), secs(5400));
    assert_eq!(ka(json!("24h")).map_err(|e| e.message), secs(86400));
    assert_eq!(
        ka(json!("300ms")).map_err(|e| e.message),
        Ok(Some(KeepAlive::For(Duration::from_millis(300))))
    );
    assert_eq!(
        ka(json!("1.5s")).map_err(|e| e.message),
        Ok(Some(KeepAlive::For(Duration::from_millis(1500))))
    );
    assert_eq!(ka(json!("0")).map_err(|e| e.message), secs(0));
    assert_eq!(ka(json!("0s")).map_err(|e| e.message), secs(0));
    assert_eq!(
        ka(json!("-1m")).map_err(|e| e.message),
        Ok(Some(KeepAlive::Forever))
    );
    assert_eq!(ka(json!(null)).map_err(|e| e.message), Ok(None));
    assert_eq!(
        ka(json!("300")).unwrap_err().message,
        r#"time: missing unit in duration "300""#
    );
    assert_eq!(
        ka(json!("5x")).unwrap_err().message,
        r#"time: unknown unit "x" in duration "5x""#
    );
    assert_eq!(
        ka(json!("")).unwrap_err().message,
        r#"time: invalid duration """#
    );
    assert_eq!(
        ka(json!("m")).unwrap_err().message,
        r#"time: invalid duration "m""#
    );
    assert_eq!(
        ka(json!(true)).unwrap_err().message,
        "Unsupported type: 'bool'"
    );
    assert_eq!(
        ka(json!([1])).unwrap_err().message,
        "Unsupported type: '[]interface {}'"
    );
}

#[test]
fn go_durations_and_names() {
    assert_eq!(parse_go_duration("1h30m"), Ok(5_400_000_000_000));
    assert_eq!(parse_go_duration("-1.5h"), Ok(-5_400_000_000_000));
    assert_eq!(parse_go_duration(".5s"), Ok(500_000_000));
    assert_eq!(parse_go_duration("1µs"), Ok(1_000));
    assert!(parse_go_duration("1.s").is_ok());
    assert!(parse_go_duration(".s").is_err());
    assert!(parse_go_duration("9999999999h").is_err());
    assert_eq!(full_name("llama3.2"), "llama3.2:latest");
    assert_eq!(full_name("hf.co/x/y:Q4"), "hf.co/x/y:Q4");
    assert_eq!(full_name("localhost:5000/x"), "localhost:5000/x:latest");
    assert_eq!(owner("hf.co/bartowski/m:Q4"), "bartowski");
    assert_eq!(owner("llama3.2"), "library");
    assert_eq!(local_rfc3339(t0(), 0), "2026-11-26T10:00:00Z");
    assert_eq!(
        local_rfc3339(t0(), 5 * 3600 + 1800),
        "2026-11-26T15:30:00+05:30"
    );
}
