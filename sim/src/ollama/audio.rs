//! `POST /v1/audio/transcriptions`, as Ollama serves it (github.com/ollama/ollama at
//! `fb30760`: `server/routes.go` routes it through `middleware.TranscriptionMiddleware()` to
//! `ChatHandler`; `middleware/openai.go` parses the form and rewrites the answer;
//! `openai/openai.go` `FromTranscriptionRequest`, `TranscriptionResponse`).
//!
//! The middleware parses the multipart form (`ParseMultipartForm`; a failure: 400 `failed
//! to parse multipart form: ...`), takes `FormValue("model")` (empty: 400 `model is
//! required`) and the `file` upload (none: 400 `file is required: ...`; empty: 400 `audio
//! file is empty`), and runs a chat (system prompt, the audio as the user message's image,
//! `temperature: 0`, no `keep_alive`) whose streamed answer it collects: one body,
//! `{"text":"<the reply, trimmed>"}\n` as `application/json`, or the bare text as
//! `text/plain` for `response_format=text`. No usage, no streaming. The chat's errors
//! (unknown model: 404) come back in the OpenAI shape.
//!
//! The form is read here with a small reader of its own (not the proxy's): the first
//! delimiter decides CRLF or LF, a preamble is skipped, each part's headers end at an empty
//! line and its body at the next newline + delimiter. The model is the query's first
//! `model`, else the form's first `model` value (a part with a filename is a file).

use std::sync::Arc;

use http::StatusCode;
use http_body_util::BodyExt;

use super::generation::{GenRequest, Prompt};
use super::render::Flavor;
use super::request::{require_model, ApiError, Handled, Opts};
use super::{OllamaSim, OAI_JSON, PLAIN};
use crate::common::{self, Call};

/// The system prompt `FromTranscriptionRequest` writes (its tokens count in the prompt).
const SYSTEM_TOKENS: u32 = 24;

pub(super) async fn transcriptions(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let form = Form::read(call)
        .map_err(|e| ApiError::bad(format!("failed to parse multipart form: {e}")))?;
    let label = form.model.clone().unwrap_or_default();
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let Some(audio) = form.file else {
        return Err(ApiError::bad("file is required: http: no such file"));
    };
    if audio == 0 {
        return Err(ApiError::bad("audio file is empty"));
    }
    let model = require_model(sim, &label)?;
    if model.embedding {
        return Err(ApiError::unsupported(&label, "chat"));
    }
    let req = GenRequest {
        label,
        model,
        opts: Opts::default(),
        keep_alive: None,
        // The audio counts as an image does: a fixed share of the window.
        prompt: Prompt::Text(SYSTEM_TOKENS + (audio as u32 / 1024).clamp(1, 1500)),
        truncate: true,
        seed: common::hash_bytes(&call.body),
        context_prompt: None,
    };
    // The chat runs streamed; the writer collects it and answers once: the same as the
    // whole chat body, rewritten.
    let chat = sim.generate(req, Flavor::Chat, false).await?;
    let (parts, body) = chat.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if parts.status != StatusCode::OK {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let message = v["error"].as_str().unwrap_or_default().to_string();
        return Err(ApiError::new(parts.status, message));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let text = v["message"]["content"].as_str().unwrap_or_default().trim();
    if form.response_format.as_deref() == Some("text") {
        return Ok(common::respond(StatusCode::OK, PLAIN, text.to_string()));
    }
    let mut body = serde_json::to_vec(&serde_json::json!({ "text": text })).unwrap_or_default();
    body.push(b'\n');
    Ok(common::respond(StatusCode::OK, OAI_JSON, body))
}

/// What the transcription reads of its form.
#[derive(Debug, Default)]
struct Form {
    model: Option<String>,
    response_format: Option<String>,
    /// The first `file` upload's size.
    file: Option<usize>,
}

impl Form {
    fn read(call: &Call) -> Result<Form, String> {
        let ct = call
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut pieces = ct.split(';');
        let kind = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
        if kind != "multipart/form-data" {
            return Err("request Content-Type isn't multipart/form-data".into());
        }
        let boundary = pieces
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
            .ok_or("no multipart boundary param in Content-Type")?;
        let mut form = Form::default();
        for (name, filename, content) in parts(&call.body, boundary.as_bytes())? {
            let value = || String::from_utf8_lossy(content).into_owned();
            match (name.as_str(), filename) {
                ("model", false) if form.model.is_none() => form.model = Some(value()),
                ("response_format", false) if form.response_format.is_none() => {
                    form.response_format = Some(value())
                }
                ("file", true) if form.file.is_none() => form.file = Some(content.len()),
                _ => {}
            }
        }
        // `FormValue`: the query's values come first.
        let from_query = call.query.as_deref().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "model")
                .map(|(_, v)| v.replace('+', " "))
        });
        if from_query.is_some() {
            form.model = from_query;
        }
        Ok(form)
    }
}

/// A form part: its name, whether it has a filename, its content.
type Part<'b> = (String, bool, &'b [u8]);

/// The parts of a multipart body.
fn parts<'b>(body: &'b [u8], boundary: &[u8]) -> Result<Vec<Part<'b>>, String> {
    let dash: Vec<u8> = [b"--", boundary].concat();
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    // The first delimiter, at a line's start.
    let mut at = 0;
    loop {
        if body[at..].starts_with(&dash) {
            break;
        }
        match body[at..].iter().position(|b| *b == b'\n') {
            Some(nl) => at += nl + 1,
            None => return Err("multipart: NextPart: EOF".into()),
        }
    }
    let after_first = &body[at + dash.len()..];
    let nl: &[u8] = if after_first.starts_with(b"\n") {
        b"\n"
    } else {
        b"\r\n"
    };
    let next: Vec<u8> = [nl, &dash].concat();
    let mut out = Vec::new();
    let mut rest = after_first;
    loop {
        if rest.starts_with(b"--") {
            return Ok(out);
        }
        let line_end = find(rest, b"\n").ok_or("unexpected EOF")?;
        rest = &rest[line_end + 1..];
        let blank: Vec<u8> = [nl, nl].concat();
        let (head, body_start) = if rest.starts_with(nl) {
            (&rest[..0], nl.len())
        } else {
            let end = find(rest, &blank).ok_or("unexpected EOF")?;
            (&rest[..end], end + blank.len())
        };
        let head = String::from_utf8_lossy(head);
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .unwrap_or("");
        let param = |key: &str| {
            disposition.split(';').skip(1).find_map(|p| {
                let (k, v) = p.split_once('=')?;
                (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let name = param("name").unwrap_or_default();
        let filename = param("filename").is_some_and(|f| !f.is_empty());
        let content_area = &rest[body_start..];
        // The delimiter ends a part only when whitespace, a newline or `--` follows it.
        let mut from = 0;
        let end = loop {
            let at = from + find(&content_area[from..], &next).ok_or("unexpected EOF")?;
            match content_area.get(at + next.len()) {
                None | Some(b'\r' | b'\n' | b' ' | b'\t' | b'-') => break at,
                Some(_) => from = at + 1,
            }
        };
        out.push((name, filename, &content_area[..end]));
        rest = &content_area[end + next.len()..];
    }
}

#[cfg(test)]
mod tests {
    use super::parts;

    #[test]
    fn parts_of_a_form() {
        let body = b"pre\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n\
            --b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--bx\r\n--b--\r\n";
        let got = parts(body, b"b").expect("a form");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], ("model".to_string(), false, &b"m"[..]));
        assert_eq!(got[1], ("file".to_string(), true, &b"RIFF\r\n--bx"[..]));
        assert!(parts(
            b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm",
            b"b"
        )
        .is_err());
        let lf = parts(
            b"--b\nContent-Disposition: form-data; name=\"model\"\n\nm\n--b--\n",
            b"b",
        )
        .expect("LF");
        assert_eq!(lf[0].2, b"m");
    }
}
