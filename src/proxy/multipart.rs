//! The `model` of an audio transcription (`POST /v1/audio/transcriptions`), read from its
//! `multipart/form-data` body the way the provider reads it, over the body already buffered.
//!
//! **What Ollama does** (github.com/ollama/ollama, read at `fb30760`):
//! `server/routes.go` routes `POST /v1/audio/transcriptions` through
//! `middleware.TranscriptionMiddleware()` to `s.ChatHandler` (no request logging, no cloud
//! pass-through). The middleware (`middleware/openai.go`) calls Go's
//! `Request.ParseMultipartForm(25 << 20)`, then `FormValue("model")` (empty: 400 `model is
//! required`), `FormFile("file")` (none: 400 `file is required: ...`; empty: 400 `audio file
//! is empty`), and reads `response_format`, `language` and `prompt` (`temperature` and
//! `stream` are not read). `openai.FromTranscriptionRequest` (`openai/openai.go`) turns it
//! into a streamed `/api/chat` request with the audio as the user message's image, no
//! `keep_alive` (the server's default applies) and `temperature: 0`; `TranscriptionWriter`
//! collects the chat and answers once: `{"text":"..."}` (`application/json`), or the bare
//! text (`text/plain`) for `response_format=text`. No `usage`, no streaming. An error of
//! the chat (unknown model: 404) comes back as `openai.NewError`:
//! `{"error":{"message","type","param":null,"code":null}}`; a form it cannot parse is a 400
//! `failed to parse multipart form: <Go's error>`.
//!
//! So the model is Go's `FormValue("model")`: the first of the URL query's `model` values
//! (`ParseForm` fills `Form` from the query, then `ParseMultipartForm` appends the form's),
//! else the first `model` part without a filename. A query Go cannot parse fails the whole
//! form (after the body parsed). The body is read as `mime/multipart.Reader` reads it:
//!
//! - the boundary is the `boundary` parameter of a `multipart/form-data` `Content-Type`
//!   (`mime.ParseMediaType`: case-insensitive type and parameter names, a token or a quoted
//!   string, a duplicate parameter is an error);
//! - lines before the first delimiter are a preamble; the first delimiter line decides
//!   whether lines end in CRLF or, if it ends in a bare LF, LF (for the whole body);
//!   whitespace may follow a delimiter; the close delimiter may end the body without a
//!   newline, and what follows it is ignored;
//! - a part's headers end at an empty line (continuation lines are joined); its body ends at
//!   the first newline + `--boundary` followed by whitespace, a newline, `--` or the end
//!   (a `--boundary` right at the body's start ends an empty body); a body that never ends
//!   is `unexpected EOF`;
//! - a part is a form value when its `Content-Disposition` is `form-data` with a `name` and
//!   no (or an empty) `filename`; one Go cannot parse has no name and is skipped;
//! - at most 1,000 parts and 10,000 part headers (Go's `multipartmaxparts`,
//!   `multipartmaxheaders` defaults): more is `multipart: message too large`.
//!
//! Not read as Go would, and refused with a 400 instead of guessed (the provider might read
//! them, the proxy cannot say which model): a `model` part in `quoted-printable`, a
//! `name*` / `filename*` (RFC 2231) or `boundary*` parameter, a `model` that is not UTF-8.
//! Go's limit on one line of the preamble (4,096 bytes) is kept; its 35 MB limit on form
//! values is not (`proxy.max_request_body` bounds the whole body first).
//!
//! **Why not a crate.** `multer` (the one well-kept Rust multipart parser) is a streaming,
//! async parser with its own reading of the edge cases (LF-only bodies, whitespace after a
//! delimiter, preambles), and would add several dependencies to the product. The proxy
//! needs one field, over a body it has already read, read exactly as Go reads it, and must
//! forward the body untouched: one pass of `memchr::memmem` over the bytes, no copy, did
//! that in fewer lines than adapting a crate would have.
//!
//! **The other providers.** llama-server serves `/v1/audio/transcriptions` and
//! `/audio/transcriptions` in recent builds (ggml-org/llama.cpp `tools/server/server.cpp`:
//! `routes.post_transcriptions_oai`, proxied by the router's `proxy_post`); its wire format
//! and how its router finds the model of a multipart body are not yet checked here, so on
//! `llamacpp` listeners the route still passes through. LM Studio documents no audio
//! endpoint (its OpenAI-compatible list: models, responses, chat completions, completions,
//! embeddings): it passes through there too.

use std::borrow::Cow;

use memchr::memmem;

/// Go's `multipart.Reader` peek buffer: a preamble line longer than this fails `NextPart`.
const PEEK: usize = 4096;
/// Go's `ReadForm` default `multipartmaxparts` and `multipartmaxheaders`.
const MAX_PARTS: usize = 1000;
const MAX_HEADERS: usize = 10_000;

/// Why a transcription request cannot be served; the message is the client's (Ollama's own
/// words where Ollama refuses it too).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// `ParseMultipartForm` failed (`http.ErrNotMultipart`, `ErrMissingBoundary`, a
    /// `multipart` or query error): Ollama's 400 says the same.
    #[error("failed to parse multipart form: {0}")]
    Parse(String),
    #[error("model is required")]
    ModelRequired,
    #[error("file is required: http: no such file")]
    FileRequired,
    #[error("audio file is empty")]
    FileEmpty,
    /// A form the provider might read and the proxy cannot (see the module doc).
    #[error("the proxy cannot read this form's model: {0}")]
    Unreadable(&'static str),
}

impl FormError {
    fn parse(message: impl Into<String>) -> Self {
        FormError::Parse(message.into())
    }
}

/// The model a transcription request names, as Ollama reads it; `content_type`: the
/// request's `Content-Type`; `query`: its URL query, as sent.
pub fn transcription_model<'a>(
    content_type: Option<&[u8]>,
    query: Option<&str>,
    body: &'a [u8],
) -> Result<Cow<'a, str>, FormError> {
    let boundary = boundary(content_type)?;
    let form = read_form(&boundary, body)?;
    let from_query = query_values(query.unwrap_or(""), "model")?;
    let model: Cow<'a, [u8]> = match from_query {
        Some(v) => Cow::Owned(v.into_bytes()),
        None => match form.model {
            None => Cow::Borrowed(&[][..]),
            Some(Value {
                quoted_printable: true,
                ..
            }) => {
                return Err(FormError::Unreadable(
                    "its `model` part is quoted-printable",
                ))
            }
            Some(Value { bytes, .. }) => Cow::Borrowed(bytes),
        },
    };
    if model.is_empty() {
        return Err(FormError::ModelRequired);
    }
    match form.file {
        None => return Err(FormError::FileRequired),
        Some(true) => return Err(FormError::FileEmpty),
        Some(false) => {}
    }
    match model {
        Cow::Borrowed(b) => std::str::from_utf8(b).map(Cow::Borrowed),
        Cow::Owned(b) => String::from_utf8(b)
            .map(Cow::Owned)
            .map_err(|e| e.utf8_error()),
    }
    .map_err(|_| FormError::Unreadable("its `model` is not UTF-8"))
}

/// A form value as written in the body.
#[derive(Debug, PartialEq, Eq)]
struct Value<'a> {
    bytes: &'a [u8],
    quoted_printable: bool,
}

/// What the transcription needs of a form: the first `model` value, and whether the first
/// `file` file part is empty (`None`: there is none).
#[derive(Debug, Default, PartialEq, Eq)]
struct Form<'a> {
    model: Option<Value<'a>>,
    file: Option<bool>,
}

/// The boundary of a `multipart/form-data` content type (Go's `multipartReader`).
fn boundary(content_type: Option<&[u8]>) -> Result<Vec<u8>, FormError> {
    let not_multipart = || FormError::parse("request Content-Type isn't multipart/form-data");
    let ct = content_type
        .filter(|c| !c.is_empty())
        .ok_or_else(not_multipart)?;
    let (kind, params) = media_type(ct).ok_or_else(not_multipart)?;
    if kind != b"multipart/form-data" {
        return Err(not_multipart());
    }
    match param(&params, b"boundary")? {
        Some(b) if !b.is_empty() => Ok(b.into_owned()),
        Some(_) => Err(FormError::parse("multipart: boundary is empty")),
        None => Err(FormError::parse(
            "no multipart boundary param in Content-Type",
        )),
    }
}

/// Media-type parameters: lower-cased names and their values, in order.
type Params<'a> = Vec<(Vec<u8>, Cow<'a, [u8]>)>;

/// `params[key]`; a `key*` (RFC 2231, which Go decodes) is refused, not guessed.
fn param<'p>(params: &'p Params<'p>, key: &[u8]) -> Result<Option<Cow<'p, [u8]>>, FormError> {
    let mut found = None;
    for (k, v) in params {
        if k.as_slice() == key {
            found = Some(v.clone());
        } else if k.starts_with(key) && k.get(key.len()) == Some(&b'*') {
            return Err(FormError::Unreadable(
                "it uses an RFC 2231 parameter (`name*`, `filename*` or `boundary*`)",
            ));
        }
    }
    Ok(found)
}

fn is_space(b: u8) -> bool {
    // Go's `unicode.IsSpace` over ASCII.
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| is_space(**b)).count();
    &s[n..]
}

fn is_tspecial(b: u8) -> bool {
    b"()<>@,;:\\\"/[]?=".contains(&b)
}

fn is_token_byte(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !is_tspecial(b)
}

/// An HTTP field name's byte (RFC 7230 `tchar`: what `textproto` accepts in a key).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn token(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|b| is_token_byte(**b)).count();
    s.split_at(n)
}

/// Go's `mime.ParseMediaType`: the lower-cased type and its parameters (lower-cased names);
/// `None` where Go returns an error.
fn media_type(v: &[u8]) -> Option<(Vec<u8>, Params<'_>)> {
    let end = memchr::memchr(b';', v).unwrap_or(v.len());
    let kind = v[..end].trim_ascii().to_ascii_lowercase();
    // `checkMediaTypeDisposition`: a token, optionally `/` and a token, nothing else.
    let (major, rest) = token(&kind);
    if major.is_empty() {
        return None;
    }
    if let Some(rest) = rest.strip_prefix(b"/") {
        let (minor, rest) = token(rest);
        if minor.is_empty() || !rest.is_empty() {
            return None;
        }
    } else if !rest.is_empty() {
        return None;
    }
    let mut params: Params<'_> = Vec::new();
    let mut rest = &v[end..];
    loop {
        rest = trim_start(rest);
        if rest.is_empty() {
            break;
        }
        let Some((key, value, after)) = media_param(rest) else {
            // Trailing semicolons are ignored; anything else is `ErrInvalidMediaParameter`.
            if rest.trim_ascii() == b";" {
                break;
            }
            return None;
        };
        if params.iter().any(|(k, _)| *k == key) {
            return None; // "mime: duplicate parameter name"
        }
        params.push((key, value));
        rest = after;
    }
    Some((kind, params))
}

/// One parameter (lower-cased name, value) and the input after it.
type ParamAndRest<'a> = (Vec<u8>, Cow<'a, [u8]>, &'a [u8]);

/// Go's `consumeMediaParam`: `; key = value`.
fn media_param(v: &[u8]) -> Option<ParamAndRest<'_>> {
    let rest = trim_start(v).strip_prefix(b";")?;
    let (key, rest) = token(trim_start(rest));
    if key.is_empty() {
        return None;
    }
    let rest = trim_start(rest).strip_prefix(b"=")?;
    let rest = trim_start(rest);
    let (value, after) = media_value(rest)?;
    Some((key.to_ascii_lowercase(), value, after))
}

/// Go's `consumeValue`: a token, or a quoted string in which a backslash escapes only a
/// tspecial (MSIE's unescaped paths keep theirs); a CR or LF inside, or no closing quote,
/// is no value.
fn media_value(v: &[u8]) -> Option<(Cow<'_, [u8]>, &[u8])> {
    let Some(quoted) = v.strip_prefix(b"\"") else {
        let (t, rest) = token(v);
        return (!t.is_empty()).then_some((Cow::Borrowed(t), rest));
    };
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < quoted.len() {
        let b = quoted[i];
        match b {
            b'"' => {
                let value = match out {
                    Some(o) => Cow::Owned(o),
                    None => Cow::Borrowed(&quoted[..i]),
                };
                return Some((value, &quoted[i + 1..]));
            }
            b'\\' if quoted.get(i + 1).is_some_and(|n| is_tspecial(*n)) => {
                let o = out.get_or_insert_with(|| quoted[..i].to_vec());
                o.push(quoted[i + 1]);
                i += 2;
                continue;
            }
            b'\r' | b'\n' => return None,
            _ => {
                if let Some(o) = out.as_mut() {
                    o.push(b);
                }
            }
        }
        i += 1;
    }
    None
}

/// The line at `at` (to its `\n`, included) and whether the body ended without one.
fn line_at(body: &[u8], at: usize) -> (&[u8], bool) {
    let rest = &body[at..];
    match memchr::memchr(b'\n', rest) {
        Some(i) => (&rest[..=i], false),
        None => (rest, true),
    }
}

fn skip_lwsp(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    &s[n..]
}

/// The multipart reader's state: the delimiters and the newline the body uses.
struct Delimiters {
    /// `--boundary`.
    dash: Vec<u8>,
    /// `\r\n` or `\n`.
    nl: &'static [u8],
}

impl Delimiters {
    /// `--boundary` + linear whitespace + the newline (`isBoundaryDelimiterLine`); the first
    /// one may switch the body to bare LF.
    fn is_delimiter(&mut self, line: &[u8], parts_read: usize) -> bool {
        let Some(rest) = line.strip_prefix(self.dash.as_slice()) else {
            return false;
        };
        let rest = skip_lwsp(rest);
        if parts_read == 0 && rest == b"\n" {
            self.nl = b"\n";
        }
        rest == self.nl
    }

    /// `--boundary--` + linear whitespace, then nothing or the newline (`isFinalBoundary`).
    fn is_final(&self, line: &[u8]) -> bool {
        let Some(rest) = line
            .strip_prefix(self.dash.as_slice())
            .and_then(|r| r.strip_prefix(b"--"))
        else {
            return false;
        };
        let rest = skip_lwsp(rest);
        rest.is_empty() || rest == self.nl
    }

    /// Whether a delimiter of `prefix_len` bytes at the start of `buf` (the body's rest)
    /// really ends a part (Go's `matchAfterPrefix`, at the end of input).
    fn ends_part(buf: &[u8], prefix_len: usize) -> bool {
        match buf.get(prefix_len) {
            None => true,
            Some(b' ' | b'\t' | b'\r' | b'\n') => true,
            Some(b'-') => buf.get(prefix_len + 1) == Some(&b'-'),
            Some(_) => false,
        }
    }

    /// Where the body of the part starting at `start` ends (`scanUntilBoundary`): before the
    /// newline of the next delimiter.
    fn part_end(&self, body: &[u8], start: usize) -> Result<usize, FormError> {
        let buf = &body[start..];
        let mut from = 0;
        if buf.starts_with(&self.dash) {
            if Self::ends_part(buf, self.dash.len()) {
                return Ok(start);
            }
            from = self.dash.len();
        }
        let mut nl_dash = self.nl.to_vec();
        nl_dash.extend_from_slice(&self.dash);
        let finder = memmem::Finder::new(&nl_dash);
        while let Some(i) = finder.find(&buf[from..]) {
            let at = from + i;
            if Self::ends_part(&buf[at..], nl_dash.len()) {
                return Ok(start + at);
            }
            from = at + nl_dash.len();
        }
        Err(FormError::parse("unexpected EOF"))
    }
}

/// A part's headers (`textproto.ReadMIMEHeader`), from `at` to their empty line: the
/// `Content-Disposition` and `Content-Transfer-Encoding` (first of each) and where the body
/// starts.
struct PartHeaders<'a> {
    disposition: Option<Cow<'a, [u8]>>,
    transfer_encoding: Option<Cow<'a, [u8]>>,
    body_start: usize,
    count: usize,
}

fn part_headers(body: &[u8], mut at: usize) -> Result<PartHeaders<'_>, FormError> {
    let mut h = PartHeaders {
        disposition: None,
        transfer_encoding: None,
        body_start: 0,
        count: 0,
    };
    // The header being read: (name, value), completed when the next line is not a
    // continuation.
    let mut current: Option<(&[u8], Cow<'_, [u8]>)> = None;
    let mut first = true;
    loop {
        let (raw, eof) = line_at(body, at);
        if eof {
            return Err(FormError::parse("unexpected EOF"));
        }
        at += raw.len();
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let continued = matches!(line.first(), Some(b' ' | b'\t'));
        if first && continued {
            return Err(FormError::parse(format!(
                "malformed MIME header initial line: {}",
                String::from_utf8_lossy(line)
            )));
        }
        first = false;
        if continued {
            if let Some((_, v)) = current.as_mut() {
                let v = v.to_mut();
                v.push(b' ');
                v.extend_from_slice(line.trim_ascii());
                continue;
            }
        }
        if let Some((name, value)) = current.take() {
            // The first of each, as `MIMEHeader.Get` reads it.
            h.count += 1;
            if name.eq_ignore_ascii_case(b"content-disposition") {
                h.disposition.get_or_insert(value);
            } else if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
                h.transfer_encoding.get_or_insert(value);
            }
        }
        if line.is_empty() {
            h.body_start = at;
            return Ok(h);
        }
        let malformed = || {
            FormError::parse(format!(
                "malformed MIME header line: {}",
                String::from_utf8_lossy(line)
            ))
        };
        let colon = memchr::memchr(b':', line).ok_or_else(malformed)?;
        let name = &line[..colon];
        if !name.iter().all(|b| is_tchar(*b)) {
            return Err(malformed());
        }
        // An empty name is skipped, as Go does.
        if !name.is_empty() {
            current = Some((name, Cow::Borrowed(line[colon + 1..].trim_ascii())));
        }
    }
}

/// Reads the whole form as `multipart.Reader.ReadForm` does, keeping what the transcription
/// needs. Any error fails the form (Ollama answers 400 for all of it).
fn read_form<'a>(boundary: &[u8], body: &'a [u8]) -> Result<Form<'a>, FormError> {
    let mut dash = b"--".to_vec();
    dash.extend_from_slice(boundary);
    let mut d = Delimiters { dash, nl: b"\r\n" };
    let mut form = Form::default();
    let (mut at, mut parts, mut headers) = (0usize, 0usize, 0usize);
    let mut expect_new = false;
    loop {
        let (line, eof) = line_at(body, at);
        if line.len() > PEEK {
            return Err(FormError::parse("multipart: NextPart: bufio: buffer full"));
        }
        if eof {
            if d.is_final(line) {
                return Ok(form);
            }
            return Err(FormError::parse("multipart: NextPart: EOF"));
        }
        at += line.len();
        if d.is_delimiter(line, parts) {
            parts += 1;
            if parts > MAX_PARTS {
                return Err(FormError::parse("multipart: message too large"));
            }
            let h = part_headers(body, at)?;
            headers += h.count;
            if headers > MAX_HEADERS {
                return Err(FormError::parse("multipart: message too large"));
            }
            let end = d.part_end(body, h.body_start)?;
            let content = &body[h.body_start..end];
            record(&mut form, &h, content)?;
            at = end;
            expect_new = false;
            continue;
        }
        if d.is_final(line) {
            return Ok(form);
        }
        let shown = || String::from_utf8_lossy(line).into_owned();
        if expect_new {
            return Err(FormError::parse(format!(
                "multipart: expecting a new Part; got line {:?}",
                shown()
            )));
        }
        if parts == 0 {
            continue; // the preamble
        }
        if line == d.nl {
            expect_new = true;
            continue;
        }
        return Err(FormError::parse(format!(
            "multipart: unexpected line in Next(): {:?}",
            shown()
        )));
    }
}

/// Keeps a part the transcription needs: the first `model` value, the first `file` file.
fn record<'a>(
    form: &mut Form<'a>,
    h: &PartHeaders<'_>,
    content: &'a [u8],
) -> Result<(), FormError> {
    let Some(disposition) = h.disposition.as_deref() else {
        return Ok(());
    };
    let Some((kind, params)) = media_type(disposition) else {
        return Ok(()); // Go: no name, skipped
    };
    if kind != b"form-data" {
        return Ok(());
    }
    let name = param(&params, b"name")?;
    let filename = param(&params, b"filename")?;
    let is_file = filename.is_some_and(|f| !f.is_empty());
    match name.as_deref() {
        Some(b"model") if !is_file && form.model.is_none() => {
            let quoted_printable = h
                .transfer_encoding
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(b"quoted-printable"));
            form.model = Some(Value {
                bytes: content,
                quoted_printable,
            });
        }
        Some(b"file") if is_file && form.file.is_none() => {
            form.file = Some(content.is_empty());
        }
        _ => {}
    }
    Ok(())
}

/// The first value of `key` in a URL query, as Go's `url.ParseQuery` reads it (`&`
/// separates; `;` is an error; `+` is a space; a bad `%` escape is an error). Go keeps
/// parsing after an error and reports the first; so does this.
fn query_values(query: &str, key: &str) -> Result<Option<String>, FormError> {
    let mut first_error: Option<String> = None;
    let mut found = None;
    for pair in query.split('&') {
        if pair.contains(';') {
            first_error.get_or_insert_with(|| "invalid semicolon separator in query".into());
            continue;
        }
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = match unescape(k) {
            Ok(k) => k,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        let v = match unescape(v) {
            Ok(v) => v,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        if k == key.as_bytes() && found.is_none() {
            found = Some(v);
        }
    }
    if let Some(e) = first_error {
        return Err(FormError::Parse(e));
    }
    match found {
        None => Ok(None),
        Some(v) => String::from_utf8(v)
            .map(Some)
            .map_err(|_| FormError::Unreadable("its `model` is not UTF-8")),
    }
}

/// Go's `url.QueryUnescape`.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                let Some(hex) = hex else {
                    let bad = &s[i..s.len().min(i + 3)];
                    return Err(format!("invalid URL escape {bad:?}"));
                };
                let hi = (hex[0] as char).to_digit(16).unwrap_or(0);
                let lo = (hex[1] as char).to_digit(16).unwrap_or(0);
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &[u8] = b"multipart/form-data; boundary=XyZ";

    /// A form as Python's and Go's writers make it: CRLF, one part per field.
    fn form(fields: &[(&str, Option<&str>, &[u8])], nl: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, filename, content) in fields {
            b.extend_from_slice(format!("--XyZ{nl}").as_bytes());
            let file = filename.map_or(String::new(), |f| format!("; filename=\"{f}\""));
            b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"{file}{nl}").as_bytes(),
            );
            if filename.is_some() {
                b.extend_from_slice(format!("Content-Type: audio/wav{nl}").as_bytes());
            }
            b.extend_from_slice(nl.as_bytes());
            b.extend_from_slice(content);
            b.extend_from_slice(nl.as_bytes());
        }
        b.extend_from_slice(format!("--XyZ--{nl}").as_bytes());
        b
    }

    fn model(ct: &[u8], query: Option<&str>, body: &[u8]) -> Result<String, FormError> {
        transcription_model(Some(ct), query, body).map(Cow::into_owned)
    }

    const WAV: &[u8] = b"RIFF\x00\x01\x02WAVEfmt ";

    #[test]
    fn the_model_field_of_an_ordinary_form() {
        for nl in ["\r\n", "\n"] {
            let body = form(
                &[
                    ("file", Some("a.wav"), WAV),
                    ("model", None, b"whisper:small"),
                    ("language", None, b"en"),
                ],
                nl,
            );
            assert_eq!(
                model(CT, None, &body).as_deref(),
                Ok("whisper:small"),
                "{nl:?}"
            );
        }
    }

    #[test]
    fn the_boundary_is_read_as_go_reads_the_content_type() {
        let body = form(&[("model", None, b"m"), ("file", Some("a"), WAV)], "\r\n");
        for ct in [
            &b"multipart/form-data; boundary=\"XyZ\""[..],
            b"Multipart/Form-Data;BOUNDARY=XyZ",
            b"multipart/form-data ; charset=utf-8; boundary = XyZ ;",
            b"multipart/form-data; boundary=\"X\\yZ\"",
        ] {
            let got = model(ct, None, &body);
            // `\y` is not an escape (y is no tspecial): the backslash stays, no match.
            if ct.ends_with(b"\\yZ\"") {
                assert!(got.is_err(), "{}", String::from_utf8_lossy(ct));
            } else {
                assert_eq!(got.as_deref(), Ok("m"), "{}", String::from_utf8_lossy(ct));
            }
        }
        // A quoted boundary with a tspecial escaped and characters a token cannot hold.
        let body = form(&[("model", None, b"m"), ("file", Some("a"), WAV)], "\r\n")
            .replace_all(b"XyZ", b"a b:c");
        assert_eq!(
            model(b"multipart/form-data; boundary=\"a b\\:c\"", None, &body).as_deref(),
            Ok("m")
        );
        for (ct, why) in [
            (&b"application/json"[..], "isn't multipart/form-data"),
            (
                b"multipart/mixed; boundary=XyZ",
                "isn't multipart/form-data",
            ),
            (b"multipart/form-data", "no multipart boundary"),
            (
                b"multipart/form-data; boundary=a; boundary=b",
                "isn't multipart",
            ),
            (b"multipart/form-data; boundary=\"XyZ", "isn't multipart"),
            (b"multipart/form-data; boundary=", "isn't multipart"),
            (b"multipart/form-data; boundary=\"\"", "boundary is empty"),
        ] {
            let e = model(ct, None, &body).expect_err(why).to_string();
            assert!(e.starts_with("failed to parse multipart form: "), "{e}");
            assert!(e.contains(why), "{}: {e}", String::from_utf8_lossy(ct));
        }
        assert!(matches!(
            transcription_model(None, None, &body),
            Err(FormError::Parse(_))
        ));
        assert!(matches!(
            model(b"multipart/form-data; boundary*=utf-8''XyZ", None, &body),
            Err(FormError::Unreadable(_))
        ));
    }

    trait ReplaceAll {
        fn replace_all(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }
    impl ReplaceAll for Vec<u8> {
        fn replace_all(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < self.len() {
                if self[i..].starts_with(from) {
                    out.extend_from_slice(to);
                    i += from.len();
                } else {
                    out.push(self[i]);
                    i += 1;
                }
            }
            out
        }
    }

    /// The boundary's bytes where they do not end a part: inside the audio, not after a
    /// newline, or followed by another byte.
    #[test]
    fn boundaries_in_odd_places() {
        let audio: &[u8] = b"--XyZx\r\n--XyZx\r\n--XyZ-x\n--XyZ\r--XyZ--";
        let body = form(
            &[("file", Some("a.wav"), audio), ("model", None, b"m1")],
            "\r\n",
        );
        assert_eq!(model(CT, None, &body).as_deref(), Ok("m1"));
        // But `--XyZ` and a newline right at a body's start end it there (Go allows the
        // delimiter without its newline at the start): the rest is read as a part.
        let body = form(
            &[
                ("file", Some("a.wav"), b"--XyZ\r\nx"),
                ("model", None, b"m1"),
            ],
            "\r\n",
        );
        let e = model(CT, None, &body).expect_err("x is no header");
        assert!(
            e.to_string().contains("malformed MIME header line: x"),
            "{e}"
        );
        // A model value that ends with what looks like half a delimiter.
        let body = form(
            &[("model", None, b"m\r\n--XyZz"), ("file", Some("a"), WAV)],
            "\r\n",
        );
        assert_eq!(model(CT, None, &body).as_deref(), Ok("m\r\n--XyZz"));
        // A preamble (skipped, even if it names a model), whitespace after the delimiters,
        // an epilogue after the close delimiter, which may lack its newline.
        let body = b"preamble\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nfake\r\n\
            --XyZ \t\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nreal\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nRIFF\r\n\
            --XyZ-- \r\nepilogue --XyZ\r\n";
        assert_eq!(model(CT, None, body).as_deref(), Ok("real"));
        let no_newline = &body[..body.len() - b" \r\nepilogue --XyZ\r\n".len()];
        assert_eq!(model(CT, None, no_newline).as_deref(), Ok("real"));
        // An empty part: the delimiter right after its headers.
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n--XyZ\r\n\
            Content-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nA\r\n--XyZ--";
        assert_eq!(model(CT, None, body).as_deref(), Ok("m"));
    }

    #[test]
    fn the_model_after_a_large_file() {
        let audio: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let body = form(
            &[
                ("file", Some("big.wav"), &audio),
                ("model", None, b"late:1b"),
            ],
            "\r\n",
        );
        assert_eq!(model(CT, None, &body).as_deref(), Ok("late:1b"));
    }

    /// Go's `FormValue`: the query's first `model`, else the form's first; a filename makes a
    /// part a file, not a value.
    #[test]
    fn which_model_wins() {
        let body = form(
            &[
                ("model", Some("x.txt"), b"a-file"),
                ("model", None, b"first"),
                ("model", None, b"second"),
                ("file", Some("a"), WAV),
            ],
            "\r\n",
        );
        assert_eq!(model(CT, None, &body).as_deref(), Ok("first"));
        assert_eq!(
            model(CT, Some("model=q&model=r"), &body).as_deref(),
            Ok("q")
        );
        assert_eq!(
            model(CT, Some("x=1&model=a%3Ab+c"), &body).as_deref(),
            Ok("a:b c")
        );
        assert_eq!(model(CT, Some("Model=q"), &body).as_deref(), Ok("first"));
        // An empty first value is Go's "": required, whatever follows.
        assert_eq!(
            model(CT, Some("model="), &body),
            Err(FormError::ModelRequired)
        );
        let e = model(CT, Some("a=1;b=2"), &body).expect_err("semicolon");
        assert_eq!(
            e.to_string(),
            "failed to parse multipart form: invalid semicolon separator in query"
        );
        let e = model(CT, Some("model=%zz"), &body).expect_err("escape");
        assert!(e.to_string().contains("invalid URL escape \"%zz\""), "{e}");
        // An empty `filename` is a value.
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; filename=\"\"\r\n\r\nv\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nA\r\n--XyZ--";
        assert_eq!(model(CT, None, body).as_deref(), Ok("v"));
    }

    #[test]
    fn part_headers_as_textproto_reads_them() {
        let body = b"--XyZ\r\ncontent-disposition:FORM-DATA;\r\n NAME=model\r\nX-Other: 1\r\n\r\nm\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"C:\\dir\\a.wav\"\r\n\r\nA\r\n--XyZ--\r\n";
        assert_eq!(model(CT, None, body).as_deref(), Ok("m"));
        // A disposition Go cannot parse names nothing: the part is skipped.
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; name=\"x\"\r\n\r\nm\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nA\r\n--XyZ--";
        assert_eq!(model(CT, None, body), Err(FormError::ModelRequired));
        for bad in [
            &b"--XyZ\r\n Content-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ--"[..],
            b"--XyZ\r\nno colon here\r\n\r\nm\r\n--XyZ--",
            b"--XyZ\r\nBad Name: x\r\n\r\nm\r\n--XyZ--",
        ] {
            let e = model(CT, None, bad).expect_err("malformed");
            assert!(e.to_string().contains("malformed MIME header"), "{e}");
        }
        let qp = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\r\nm=3D\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nA\r\n--XyZ--";
        assert!(matches!(model(CT, None, qp), Err(FormError::Unreadable(_))));
        let star =
            b"--XyZ\r\nContent-Disposition: form-data; name*=utf-8''model\r\n\r\nm\r\n--XyZ--";
        assert!(matches!(
            model(CT, None, star),
            Err(FormError::Unreadable(_))
        ));
        let latin1 = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\xe9\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nA\r\n--XyZ--";
        assert!(matches!(
            model(CT, None, latin1),
            Err(FormError::Unreadable(_))
        ));
    }

    #[test]
    fn missing_fields_and_files() {
        let body = form(&[("file", Some("a"), WAV)], "\r\n");
        assert_eq!(model(CT, None, &body), Err(FormError::ModelRequired));
        let body = form(&[("model", None, b""), ("file", Some("a"), WAV)], "\r\n");
        assert_eq!(model(CT, None, &body), Err(FormError::ModelRequired));
        let body = form(&[("model", None, b"m"), ("file", None, WAV)], "\r\n");
        assert_eq!(model(CT, None, &body), Err(FormError::FileRequired));
        let body = form(&[("model", None, b"m"), ("file", Some("a"), b"")], "\r\n");
        assert_eq!(model(CT, None, &body), Err(FormError::FileEmpty));
        // No parts at all.
        assert_eq!(model(CT, None, b"--XyZ--"), Err(FormError::ModelRequired));
    }

    #[test]
    fn truncated_and_broken_bodies() {
        let whole = form(
            &[("model", None, b"m"), ("file", Some("a.wav"), WAV)],
            "\r\n",
        );
        // Cut anywhere before the close delimiter is complete: an error, never a model.
        let close = whole.len() - b"--XyZ--\r\n".len();
        for cut in 0..close + b"--XyZ-".len() {
            let got = model(CT, None, &whole[..cut]);
            assert!(
                matches!(got, Err(FormError::Parse(_))),
                "cut at {cut}: {got:?}"
            );
        }
        assert_eq!(
            model(CT, None, b"").expect_err("empty").to_string(),
            "failed to parse multipart form: multipart: NextPart: EOF"
        );
        // A line after a part that is not a delimiter.
        let body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ \r\nx";
        assert!(model(CT, None, body).is_err());
        // CRLF chosen by the first delimiter: a bare LF close delimiter does not end it.
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\n--XyZ--\n";
        assert!(model(CT, None, body).is_err());
        // Too many parts.
        let mut many = Vec::new();
        for _ in 0..=MAX_PARTS {
            many.extend_from_slice(
                b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n",
            );
        }
        many.extend_from_slice(b"--XyZ--");
        let e = model(CT, None, &many).expect_err("too many parts");
        assert!(e.to_string().contains("message too large"), "{e}");
        // A preamble line longer than Go's buffer.
        let mut long = vec![b'a'; PEEK + 1];
        long.extend_from_slice(b"\r\n--XyZ--");
        assert!(model(CT, None, &long).is_err());
    }
}
