//! A deterministic extractive summarizer: the simulators' stand-in for a model that llm-warden
//! asks for a summary when it compacts a conversation.
//!
//! **Not what Ollama or llama.cpp do**: a real model writes new prose (and may drop or invent
//! facts). This one only picks sentences of the transcript, so that benchmarks and tests of
//! compaction have a summarizer whose output is repeatable and whose losses come from the
//! length budget alone (`examples/factbench.rs` measures how many planted facts survive).
//!
//! A request is a summarization request when its first system message opens with the words
//! of llm-warden's summarizer instructions ([`SUMMARIZER_PROMPT_OPENING`], the start of
//! `PROMPT` in `src/context/summarize.rs`); the transcript is its user message (made by
//! `transcript` there: one `role: text` line per message, a previous summary under a
//! `Summary of the conversation so far:` line).
//!
//! The rule: the transcript is cut into sentences (at `.`, `!` or `?` followed by a space or
//! the end of a line); each sentence scores 4 if it holds a digit, 2 if it holds a quoted or
//! path-like identifier (`` ` ``, `"`, `/`, `_`, or a `.` inside a word), 1 if it holds a
//! capitalized word after its first; sentences are taken by score, then by position (earlier
//! first), each one only while the reply stays within the budget (`num_predict` /
//! `max_tokens`, counted as the simulator counts tokens: 4 bytes each), and are written in
//! transcript order, joined by spaces. A repeated sentence is taken once.

/// The opening of llm-warden's summarizer instructions (`PROMPT` in
/// `src/context/summarize.rs`): a chat whose first system message starts with it is a
/// summarization request.
pub const SUMMARIZER_PROMPT_OPENING: &str = "You condense conversations.";

/// Lines of the transcript that are headings, not conversation (`transcript` in
/// `src/context/summarize.rs`).
const HEADINGS: [&str; 2] = ["Summary of the conversation so far:", "What followed:"];

/// Role labels that open a transcript line (`role: text`).
const ROLES: [&str; 5] = ["user", "assistant", "system", "tool", "developer"];

/// Whether a chat (its messages as role and text, in order) is llm-warden's summarization
/// request; if so, the transcript to summarize: the text of its user messages.
pub fn summary_request<'a>(
    messages: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<String> {
    let mut system_seen = false;
    let mut transcript = String::new();
    for (role, text) in messages {
        match role {
            "system" if !system_seen => {
                if !text.trim_start().starts_with(SUMMARIZER_PROMPT_OPENING) {
                    return None;
                }
                system_seen = true;
            }
            "user" => {
                transcript.push_str(text);
                transcript.push('\n');
            }
            _ => {}
        }
    }
    system_seen.then_some(transcript)
}

/// The sentences of a transcript, in order, without role labels and headings, whitespace
/// collapsed.
pub fn sentences(transcript: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in transcript.lines() {
        let line = line.trim();
        if line.is_empty() || HEADINGS.contains(&line) {
            continue;
        }
        let text = match line.split_once(": ") {
            Some((role, rest)) if ROLES.contains(&role) => rest,
            _ => line,
        };
        let chars: Vec<char> = text.chars().collect();
        let mut cur = String::new();
        for (i, &c) in chars.iter().enumerate() {
            cur.push(c);
            let ends =
                matches!(c, '.' | '!' | '?') && chars.get(i + 1).is_none_or(|n| n.is_whitespace());
            if ends {
                push_sentence(&mut out, &cur);
                cur.clear();
            }
        }
        push_sentence(&mut out, &cur);
    }
    out
}

fn push_sentence(out: &mut Vec<String>, s: &str) {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if !s.is_empty() {
        out.push(s);
    }
}

/// How likely a sentence is to carry a fact (see the module doc).
pub fn score(sentence: &str) -> u32 {
    let mut score = 0;
    if sentence.chars().any(|c| c.is_ascii_digit()) {
        score += 4;
    }
    let identifier = sentence.split_whitespace().any(|w| {
        let w = w.trim_end_matches(['.', ',', '!', '?', ';', ':']);
        w.contains(['`', '"', '/', '_'])
            || (w.contains('.') && !w.starts_with('.') && !w.ends_with('.'))
            || (w.len() > 2 && w.starts_with('\'') && w.ends_with('\''))
    });
    if identifier {
        score += 2;
    }
    if sentence.split_whitespace().skip(1).any(|w| {
        w.trim_start_matches(['"', '\'', '('])
            .starts_with(char::is_uppercase)
    }) {
        score += 1;
    }
    score
}

/// The extractive summary of `transcript` within `budget` reply tokens, each sentence costing
/// `cost(" " + sentence)` (the simulator's own count of tokens, so that the summary takes at
/// most `budget` tokens of the prompt it goes back into; `cost` must be subadditive over
/// concatenation, as 4-byte pieces are). When no whole sentence fits, the best one is cut
/// to the budget.
pub fn summarize(transcript: &str, budget: usize, cost: impl Fn(&str) -> usize) -> String {
    let all = sentences(transcript);
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<(usize, &String)> = all
        .iter()
        .enumerate()
        .filter(|(_, s)| seen.insert(s.as_str()))
        .collect();
    let mut ranked = unique.clone();
    ranked.sort_by_key(|(i, s)| (std::cmp::Reverse(score(s)), *i));
    let mut left = budget;
    let mut taken: Vec<usize> = Vec::new();
    for (i, s) in &ranked {
        let c = cost(&format!(" {s}"));
        if c <= left {
            left -= c;
            taken.push(*i);
        }
    }
    if taken.is_empty() {
        return ranked
            .first()
            .map(|(_, s)| {
                let mut out = String::new();
                for w in s.split(' ') {
                    let next = if out.is_empty() {
                        w.to_string()
                    } else {
                        format!("{out} {w}")
                    };
                    if cost(&format!(" {next}")) > budget {
                        break;
                    }
                    out = next;
                }
                out
            })
            .unwrap_or_default();
    }
    taken.sort_unstable();
    taken
        .iter()
        .map(|&i| all[i].as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> usize {
        text.split(' ').filter(|w| !w.is_empty()).count()
    }

    const TRANSCRIPT: &str = "user: Hi there, how are you today? I am fine.\n\
        assistant: Good to hear. The deploy key for staging is K7-4419.\n\
        user: Maria's flight lands at 14:35 on Thursday. Thanks for the help!\n\
        assistant: The config lives in `/etc/warden/nodes.toml` now.\n\
        user: Ask Peter about it. It was a nice day.\n";

    #[test]
    fn recognizes_the_proxys_summarization_request_only() {
        let prompt = "You condense conversations. Summarize the conversation below...";
        let t = summary_request([("system", prompt), ("user", "user: hello\n")]);
        assert_eq!(t.as_deref(), Some("user: hello\n\n"));
        assert_eq!(
            summary_request([("system", "You are helpful."), ("user", "hi")]),
            None
        );
        assert_eq!(
            summary_request([("user", "You condense conversations.")]),
            None
        );
    }

    #[test]
    fn sentences_drop_roles_and_headings() {
        let t = "Summary of the conversation so far:\nThey met. At 9.\n\nWhat followed:\nuser: Is v1.2 out? Yes!\n";
        assert_eq!(sentences(t), ["They met.", "At 9.", "Is v1.2 out?", "Yes!"]);
    }

    #[test]
    fn facts_rank_first_and_keep_their_order() {
        // Digits first, then identifiers, then names; ties by position.
        assert_eq!(score("The deploy key for staging is K7-4419."), 4 + 1);
        assert_eq!(
            score("The config lives in `/etc/warden/nodes.toml` now."),
            2
        );
        assert_eq!(score("Ask Peter about it."), 1);
        assert_eq!(score("It was a nice day."), 0);
        let s = summarize(TRANSCRIPT, 16, words);
        assert_eq!(
            s,
            "The deploy key for staging is K7-4419. Maria's flight lands at 14:35 on Thursday."
        );
        let s = summarize(TRANSCRIPT, 24, words);
        assert_eq!(
            s,
            "The deploy key for staging is K7-4419. Maria's flight lands at 14:35 on Thursday. \
             The config lives in `/etc/warden/nodes.toml` now. Ask Peter about it."
        );
    }

    #[test]
    fn the_budget_is_never_exceeded_and_is_deterministic() {
        for budget in 0..60 {
            let s = summarize(TRANSCRIPT, budget, words);
            assert!(words(&s) <= budget, "{budget}: {s}");
            assert_eq!(s, summarize(TRANSCRIPT, budget, words));
        }
        // Nothing whole fits: the best sentence, cut.
        assert_eq!(summarize(TRANSCRIPT, 2, words), "The deploy");
        assert_eq!(summarize(TRANSCRIPT, 0, words), "");
        // Repeats are taken once.
        let twice = format!("{TRANSCRIPT}{TRANSCRIPT}");
        assert_eq!(
            summarize(&twice, 16, words),
            summarize(TRANSCRIPT, 16, words)
        );
    }
}
