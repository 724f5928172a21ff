//! Log lines: one event is one line, whatever a client put in the values it logs.
//!
//! Model names, paths and provider errors come from clients and providers; a CR or LF in one
//! (`"model": "x\nINFO forged line"`) written raw would forge a log line, an ESC would drive
//! the operator's terminal. So every field value and every message is escaped on its way out:
//!
//! - **text**: the field formatter ([`fields`]) writes each value through [`Escaped`], which
//!   writes C0 controls, DEL, C1 controls and U+2028 / U+2029 (line breaks to some readers) as
//!   `\n`, `\r`, `\t` or `\u{..}`. The proxy's own styling (level colours, italic field names)
//!   is written around the values, not through the escaper, so it survives;
//! - **JSON**: `serde_json` already writes C0 controls as `\uXXXX`; [`JsonSafe`] adds C1
//!   controls and U+2028 / U+2029, which JSON allows raw but which break some line readers.
//!   Both only ever occur inside JSON strings, where `\uXXXX` means the same character.

use std::fmt::{self, Write as _};
use std::io;

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};

/// Whether `c` must not reach a log line raw.
fn is_control(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// A `fmt::Write` that escapes control characters on their way to `inner`.
pub struct Escaped<W>(pub W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// The text format's field formatter: `name=value` pairs separated by spaces, the message
/// first and bare, every value escaped (see the module doc). Values are written as `Debug`,
/// as tracing's default formatter does (strings quoted, `%value` as written).
pub fn fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(
        |w: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn fmt::Debug| {
            if field.name() != "message" {
                let name = field.name().trim_start_matches("r#");
                if w.has_ansi_escapes() {
                    write!(w, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?;
                } else {
                    write!(w, "{name}=")?;
                }
            }
            write!(Escaped(w), "{value:?}")
        },
    )
    .delimited(" ")
}

/// A writer for the JSON format that escapes the characters `serde_json` leaves raw (see the
/// module doc). The formatter hands it one whole line per `write_all`.
pub struct JsonSafe<W>(pub W);

impl<W: io::Write> io::Write for JsonSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        if !text.contains(is_control_beyond_c0) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = String::with_capacity(text.len() + 16);
        for c in text.chars() {
            if is_control_beyond_c0(c) {
                // `fmt::Write` for `String` cannot fail.
                let _ = write!(out, "\\u{:04x}", c as u32);
            } else {
                out.push(c);
            }
        }
        self.0.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Control characters `serde_json` writes raw: DEL, C1, U+2028 and U+2029 (C0 it escapes,
/// and the line's own final `\n` must stay).
fn is_control_beyond_c0(c: char) -> bool {
    is_control(c) && c as u32 >= 0x7f
}

/// [`JsonSafe`] around each writer `M` makes.
pub struct MakeJsonSafe<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for MakeJsonSafe<M> {
    type Writer = JsonSafe<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        JsonSafe(self.0.make_writer())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::LogFormat;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    const HOSTILE: &str =
        "llama3\r\n2026-01-01T00:00:00Z  INFO forged\x1b[31m red\u{85}\u{2028}\u{2029}\x07\x7f end";

    /// Logs the lifecycle's lines with a hostile model name in `format`; returns the output.
    fn logged(format: LogFormat, ansi: bool) -> String {
        let buf = Buffer::default();
        let dispatch = crate::subscriber(format, buf.clone(), ansi, "trace");
        tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("conn", peer = %HOSTILE);
            let _in = span.enter();
            tracing::info!(provider = %"ollama", model = %HOSTILE, "loading model");
            tracing::warn!(provider = "ollama", model = HOSTILE, error = %HOSTILE, "model load failed");
            tracing::info!("message itself: {HOSTILE}");
        });
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    fn assert_clean(out: &str, format: &str) {
        assert_eq!(
            out.matches('\n').count(),
            3,
            "{format}: one line per event:\n{out}"
        );
        for line in out.lines() {
            for c in line.chars() {
                assert!(
                    !is_control(c) || c == '\x1b' && format == "text+ansi",
                    "{format}: raw {:?} in {line:?}",
                    c
                );
            }
        }
        assert!(!out.contains("\r"), "{format}");
    }

    #[test]
    fn text_lines_escape_control_characters_in_every_field() {
        let out = logged(LogFormat::Text, false);
        assert_clean(&out, "text");
        assert!(
            out.contains(r"llama3\r\n2026-01-01T00:00:00Z  INFO forged\u{1b}[31m red\u{85}\u{2028}\u{2029}\u{7}\u{7f} end"),
            "escaped, not dropped: {out}"
        );
        assert!(out.contains("loading model"), "{out}");
        assert!(out.contains("provider=ollama"), "{out}");
    }

    #[test]
    fn text_lines_keep_their_colours_but_not_a_clients() {
        let out = logged(LogFormat::Text, true);
        assert_clean(&out, "text+ansi");
        assert!(
            !out.contains("\x1b[31m"),
            "the client's ESC is escaped: {out}"
        );
        assert!(
            out.contains("\x1b[3mmodel\x1b[0m"),
            "our styling stays: {out}"
        );
    }

    #[test]
    fn json_lines_escape_control_characters_in_every_field() {
        let out = logged(LogFormat::Json, false);
        assert_clean(&out, "json");
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["message"] == "loading model" {
                assert_eq!(v["model"], HOSTILE, "the value survives, escaped: {line}");
            }
        }
    }

    #[test]
    fn escaper_passes_plain_text_through() {
        let mut s = String::new();
        write!(Escaped(&mut s), "qwen/qwen3-8b:q4 ünïcødé").unwrap();
        assert_eq!(s, "qwen/qwen3-8b:q4 ünïcødé");
    }
}
