//! Pure planning: which messages of a conversation stay verbatim and which become the summary,
//! given each message's tokens and the budget. No I/O, no token counting: the caller counts.
//!
//! Rules:
//! - every system message is kept, wherever it is;
//! - the other messages form *turns*: an assistant message that calls tools takes the tool
//!   results that follow it, so a call is never split from its results (a result sent
//!   further on is joined to its call by the API's roles, [`super::apis`]: the messages
//!   between become part of the turn);
//! - the most recent turns stay verbatim, as many as `tail` tokens allow, and always the last;
//! - everything older (less system messages) is summarized; the summary goes where the first
//!   summarized message was;
//! - if system + summary + tail still exceeds `prompt`, the tail gives up its oldest turns;
//!   then the summary gives up room (its allowance is a ceiling, not a size: on a small window
//!   the fixed `summary_max_tokens` would take it all), down to [`MIN_SUMMARY`];
//! - only if system + the last turn + that minimum summary exceed `prompt` can the
//!   conversation not be made to fit.

/// What the planner needs to know of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    /// `tool_calls`: whether it calls tools (and so owns the tool results after it).
    Assistant {
        tool_calls: bool,
    },
    Tool,
}

/// The token budget of the rewritten prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The most the whole prompt may take (threshold × window − room for the reply).
    pub prompt: u64,
    /// The most the verbatim recent turns may take (a share of the window).
    pub tail: u64,
    /// What the summary message may take at most (less when the window is small).
    pub summary: u64,
}

/// The least room a summary is given (or its allowance, if smaller): below this a summary
/// says too little to be worth a model call, and the conversation is too long instead.
pub const MIN_SUMMARY: u64 = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The prompt fits as it is.
    Fits,
    /// Replace `evict` (message indices, ascending, no system message among them) by one
    /// summary placed at `evict[0]`; `kept_tokens` is what the kept messages take, `summary`
    /// the most the summary may take (at most the budget's).
    Compact {
        evict: Vec<usize>,
        kept_tokens: u64,
        summary: u64,
    },
    /// Even the system messages, the last turn and the least summary exceed the budget:
    /// `needed` = `system` + `last_turn` + that summary (none when nothing is evicted, or
    /// with no summary allowance).
    TooLong {
        needed: u64,
        system: u64,
        last_turn: u64,
    },
}

/// The turns of a conversation: index ranges of non-system messages, each starting at a user
/// or assistant message and holding the tool results that answer it. System messages are
/// in no turn.
pub(super) fn turns(roles: &[Role]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut open_call = false;
    for (i, r) in roles.iter().enumerate() {
        match r {
            Role::System => {}
            Role::Tool if open_call => {
                if let Some(last) = out.last_mut() {
                    last.push(i);
                }
            }
            Role::Assistant { tool_calls } => {
                out.push(vec![i]);
                open_call = *tool_calls;
            }
            Role::User | Role::Tool => {
                out.push(vec![i]);
                open_call = false;
            }
        }
    }
    out
}

/// Plans the rewrite of a conversation whose messages have `roles` and take `tokens` each.
pub fn plan(roles: &[Role], tokens: &[u64], budget: Budget) -> Plan {
    let total: u64 = tokens.iter().sum();
    if total <= budget.prompt {
        return Plan::Fits;
    }
    let system: u64 = roles
        .iter()
        .zip(tokens)
        .filter(|(r, _)| **r == Role::System)
        .map(|(_, t)| t)
        .sum();
    let turns = turns(roles);
    let cost = |t: &Vec<usize>| t.iter().map(|&i| tokens[i]).sum::<u64>();
    // Newest turns first, while they fit the tail share (the last one always).
    let mut keep = 0usize;
    let mut tail = 0u64;
    for t in turns.iter().rev() {
        let c = cost(t);
        if keep > 0 && tail + c > budget.tail {
            break;
        }
        keep += 1;
        tail += c;
    }
    // Then shrink until system + summary + tail fits the prompt budget.
    while keep > 1 && system + budget.summary + tail > budget.prompt {
        tail -= cost(&turns[turns.len() - keep]);
        keep -= 1;
    }
    let evicted_turns = turns.len() - keep;
    let last_turn = turns.last().map(cost).unwrap_or(0);
    // What is left for the summary, up to its allowance.
    let summary = budget
        .summary
        .min(budget.prompt.saturating_sub(system + tail));
    let least = MIN_SUMMARY.min(budget.summary);
    let too_long = |needed| Plan::TooLong {
        needed,
        system,
        last_turn,
    };
    if evicted_turns == 0 {
        return too_long(system + tail);
    }
    if system + tail + least > budget.prompt {
        return too_long(system + tail + least);
    }
    let evict: Vec<usize> = turns[..evicted_turns].iter().flatten().copied().collect();
    Plan::Compact {
        evict,
        kept_tokens: system + tail,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::Role::*;
    use super::*;

    const CALL: Role = Assistant { tool_calls: true };
    const SAY: Role = Assistant { tool_calls: false };

    fn b(prompt: u64, tail: u64, summary: u64) -> Budget {
        Budget {
            prompt,
            tail,
            summary,
        }
    }

    /// (what, roles, tokens per message, budget, expected plan)
    type Case = (&'static str, Vec<Role>, Vec<u64>, Budget, Plan);

    #[test]
    fn plans_follow_the_rules() {
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            ("fits", vec![System, User], vec![10, 10], b(20, 10, 5), Plan::Fits),
            ("oldest turns go, system stays",
                vec![System, User, SAY, User, SAY, User], vec![5, 10, 10, 10, 10, 10], b(40, 20, 5),
                Plan::Compact { evict: vec![1, 2, 3], kept_tokens: 25, summary: 5 }),
            ("the tail share bounds the verbatim turns",
                vec![User, SAY, User, SAY, User], vec![10; 5], b(45, 10, 5),
                Plan::Compact { evict: vec![0, 1, 2, 3], kept_tokens: 10, summary: 5 }),
            ("a tool call keeps its results",
                vec![User, CALL, Tool, Tool, SAY, User], vec![10, 5, 5, 5, 10, 10], b(30, 20, 5),
                Plan::Compact { evict: vec![0, 1, 2, 3], kept_tokens: 20, summary: 5 }),
            ("a call and its results move to the summary together",
                vec![User, CALL, Tool, User], vec![10, 5, 30, 10], b(40, 40, 5),
                Plan::Compact { evict: vec![0, 1, 2], kept_tokens: 10, summary: 5 }),
            ("system messages in the middle are kept",
                vec![System, User, System, SAY, User], vec![5, 10, 5, 10, 10], b(30, 10, 5),
                Plan::Compact { evict: vec![1, 3], kept_tokens: 20, summary: 5 }),
            ("the tail shrinks until the summary fits too",
                vec![User, SAY, User, SAY, User], vec![10; 5], b(32, 40, 10),
                Plan::Compact { evict: vec![0, 1, 2], kept_tokens: 20, summary: 10 }),
            ("the last turn alone is too long",
                vec![System, User, SAY, User], vec![10, 10, 10, 100], b(50, 40, 5),
                Plan::TooLong { needed: 115, system: 10, last_turn: 100 }),
            ("only one turn: nothing to summarize",
                vec![System, User], vec![30, 30], b(50, 40, 5),
                Plan::TooLong { needed: 60, system: 30, last_turn: 30 }),
            ("a small window: the summary takes what is left, not its full allowance",
                vec![System, User, SAY, User], vec![24, 300, 300, 9], b(316, 100, 512),
                Plan::Compact { evict: vec![1, 2], kept_tokens: 33, summary: 283 }),
            ("too long only when not even the least summary fits",
                vec![System, User, SAY, User], vec![24, 300, 300, 9], b(50, 10, 512),
                Plan::TooLong { needed: 65, system: 24, last_turn: 9 }),
        ];
        for (what, roles, tokens, budget, want) in table {
            assert_eq!(plan(&roles, &tokens, budget), want, "{what}");
        }
    }

    #[test]
    fn every_compaction_fits_and_keeps_the_last_turn() {
        // Property over generated conversations: the plan fits the budget, keeps all system
        // messages and the last message, and never splits a call from its results.
        let pattern = [
            System, User, SAY, User, CALL, Tool, Tool, SAY, User, SAY, User,
        ];
        for n in 2..=pattern.len() {
            let roles = &pattern[..n];
            for unit in [3u64, 10, 40] {
                let tokens: Vec<u64> = (0..n as u64).map(|i| unit + i % 7).collect();
                for prompt in [30u64, 60, 100, 200] {
                    let budget = b(prompt, prompt / 2, 8);
                    if let Plan::Compact {
                        evict,
                        kept_tokens,
                        summary,
                    } = plan(roles, &tokens, budget)
                    {
                        assert!(kept_tokens + summary <= prompt, "{n} {unit} {prompt}");
                        assert_eq!(
                            summary, 8,
                            "room for the whole allowance: {n} {unit} {prompt}"
                        );
                        assert!(!evict.contains(&(n - 1)), "the last message stays");
                        assert!(evict.iter().all(|&i| roles[i] != System));
                        for &i in &evict {
                            if roles[i] == CALL {
                                let mut j = i + 1;
                                while j < n && roles[j] == Tool {
                                    assert!(evict.contains(&j), "results go with their call");
                                    j += 1;
                                }
                            }
                        }
                        let kept: u64 = (0..n)
                            .filter(|i| !evict.contains(i))
                            .map(|i| tokens[i])
                            .sum();
                        assert_eq!(kept, kept_tokens);
                    }
                }
            }
        }
    }
}
