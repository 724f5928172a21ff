//! The compaction planner (`context::plan::plan`) on arbitrary conversations and budgets.
//!
//! Input: three 4-byte budgets (prompt, tail, summary), then one byte per message: the low
//! three bits pick the role, the high five a token count. Properties: nothing panics; `Fits`
//! exactly when everything fits; a `Compact` plan evicts whole turns (a call with its
//! results), oldest first, never a system message nor the last turn, and what it keeps plus
//! the summary fits the prompt budget; `TooLong` only when no plan could fit (one turn only,
//! or the system messages, the last turn and the summary exceed the budget).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_warden::context::plan::{plan, Budget, Plan, Role};

fn role(b: u8) -> Role {
    match b & 7 {
        0 => Role::System,
        1 | 5 => Role::User,
        2 | 6 => Role::Assistant { tool_calls: false },
        3 => Role::Assistant { tool_calls: true },
        _ => Role::Tool,
    }
}

fn u32_at(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[4 * i..4 * i + 4]);
    u64::from(u32::from_le_bytes(b) % 100_000)
}

/// The turns, as the module doc defines them (written again here, independently).
fn turns(roles: &[Role]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut calling = false;
    for (i, r) in roles.iter().enumerate() {
        match r {
            Role::System => continue,
            Role::Tool if calling => out.last_mut().expect("a call opened a turn").push(i),
            _ => {
                out.push(vec![i]);
                calling = *r == Role::Assistant { tool_calls: true };
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let budget = Budget {
        prompt: u32_at(data, 0),
        tail: u32_at(data, 1),
        summary: u32_at(data, 2) % 4096,
    };
    let msgs = &data[12..];
    let roles: Vec<Role> = msgs.iter().map(|b| role(*b)).collect();
    let tokens: Vec<u64> = msgs.iter().map(|b| u64::from(b >> 3) * 97).collect();
    let total: u64 = tokens.iter().sum();
    let system: u64 = (0..roles.len())
        .filter(|&i| roles[i] == Role::System)
        .map(|i| tokens[i])
        .sum();
    let turns = turns(&roles);
    let cost = |t: &[usize]| t.iter().map(|&i| tokens[i]).sum::<u64>();
    match plan(&roles, &tokens, budget) {
        Plan::Fits => assert!(total <= budget.prompt),
        Plan::Compact { evict, kept_tokens } => {
            assert!(total > budget.prompt, "compacted what fits");
            let k = (1..turns.len())
                .find(|&k| turns[..k].concat() == evict)
                .expect("evicted: whole turns, oldest first, the last one kept");
            let kept = system + turns[k..].iter().map(|t| cost(t)).sum::<u64>();
            assert_eq!(kept, kept_tokens);
            assert!(
                kept_tokens + budget.summary <= budget.prompt,
                "does not fit"
            );
        }
        Plan::TooLong { needed } => {
            assert!(total > budget.prompt);
            assert!(needed > budget.prompt, "TooLong, but {needed} fits");
            let last = turns.last().map_or(0, |t| cost(t));
            assert!(
                turns.len() < 2 || system + last + budget.summary > budget.prompt,
                "TooLong, but evicting all but the last turn fits"
            );
        }
    }
});
