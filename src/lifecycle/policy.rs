//! Pure eviction policy: what has to be unloaded so that one more model fits, under
//! `max_models_loaded` and a memory budget. No I/O, no logging, no clocks: it runs
//! speculatively, as often as the caller likes, and the caller acts on the answer.
//!
//! Rules, in order:
//! - a model that is loading, unloading or answering requests is never a victim, nor is a
//!   pinned one; victims are idle ready models, least recently used first (ties: larger
//!   first, as they free more);
//! - as few victims as satisfy both limits;
//! - memory that unloads already under way will free counts as freed (then: wait for them);
//! - a model larger than the whole budget can never fit: refuse rather than queue forever;
//! - memory available right now (other programs use RAM too) must also hold the target,
//!   counting what the victims free; when even that is short, wait: others may free memory.

/// Where a model stands, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    Loading,
    Ready,
    Unloading,
}

/// One resident model of the provider.
#[derive(Clone, Debug)]
pub struct Resident<'a> {
    pub name: &'a str,
    pub residency: Residency,
    /// Requests in flight (leases held).
    pub active: u32,
    pub pinned: bool,
    /// When the model last finished a request, in any monotonic unit; smaller = older.
    pub last_used: u64,
    /// Memory the model holds, bytes, if known.
    pub size_bytes: Option<u64>,
}

/// The limits a load must respect.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_models_loaded: u32,
    /// Bytes all resident models may take together; `None` = no memory limit.
    pub memory_budget: Option<u64>,
    /// Bytes free on the machine right now, outside the resident models; `None` = unknown.
    pub available: Option<u64>,
}

/// What to do to load the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan<'a> {
    /// It fits now.
    Load,
    /// Unload these (in this order), then load.
    Evict(Vec<&'a str>),
    /// It will fit once models now busy, loading or unloading are done: queue and retry.
    Wait,
    /// It can never fit under these limits.
    Refuse(RefuseReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// `max_models_loaded` is zero.
    NoSlots,
    /// The model alone is larger than the memory budget.
    TooLarge { size_bytes: u64, budget: u64 },
}

/// What must happen before `target_size` more bytes and one more model fit among `resident`.
pub fn plan_load<'a>(
    target_size: Option<u64>,
    resident: &[Resident<'a>],
    limits: Limits,
) -> Plan<'a> {
    if limits.max_models_loaded == 0 {
        return Plan::Refuse(RefuseReason::NoSlots);
    }
    if let (Some(size), Some(budget)) = (target_size, limits.memory_budget) {
        if size > budget {
            return Plan::Refuse(RefuseReason::TooLarge {
                size_bytes: size,
                budget,
            });
        }
    }
    let mem = |m: &Resident| m.size_bytes.unwrap_or(0);
    // Unloads under way free their slot and memory soon: count them as gone.
    let staying: Vec<&Resident> = resident
        .iter()
        .filter(|m| m.residency != Residency::Unloading)
        .collect();
    let unloading_now = staying.len() < resident.len();
    let slots_short = (staying.len() + 1).saturating_sub(limits.max_models_loaded as usize);
    let target = target_size.unwrap_or(0);
    let budget_short = match limits.memory_budget {
        Some(budget) => {
            let used: u64 = staying.iter().map(|m| mem(m)).sum();
            (used + target).saturating_sub(budget)
        }
        None => 0,
    };
    // What unloads under way give back comes on top of what is free now.
    let unloading_bytes: u64 = resident
        .iter()
        .filter(|m| m.residency == Residency::Unloading)
        .map(mem)
        .sum();
    let avail_short = limits
        .available
        .map_or(0, |a| target.saturating_sub(a + unloading_bytes));
    let mem_short = budget_short.max(avail_short);
    if slots_short == 0 && mem_short == 0 {
        // Fits once the unloads in flight are done (or right away when there are none).
        let over_now = resident.len() + 1 > limits.max_models_loaded as usize
            || limits
                .memory_budget
                .is_some_and(|b| resident.iter().map(mem).sum::<u64>() + target > b)
            || limits.available.is_some_and(|a| target > a);
        return if unloading_now && over_now {
            Plan::Wait
        } else {
            Plan::Load
        };
    }

    let mut candidates: Vec<&Resident> = staying
        .iter()
        .copied()
        .filter(|m| m.residency == Residency::Ready && m.active == 0 && !m.pinned)
        .collect();
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(mem(b).cmp(&mem(a))));

    let mut victims = Vec::new();
    let mut freed = 0u64;
    for c in candidates {
        if victims.len() >= slots_short && freed >= mem_short {
            break;
        }
        victims.push(c.name);
        freed += mem(c);
    }
    if victims.len() >= slots_short && freed >= mem_short {
        Plan::Evict(victims)
    } else {
        Plan::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::Residency::*;
    use super::*;

    const GB: u64 = 1 << 30;

    fn m(
        name: &'static str,
        residency: Residency,
        active: u32,
        last_used: u64,
        size_gb: u64,
    ) -> Resident<'static> {
        Resident {
            name,
            residency,
            active,
            pinned: false,
            last_used,
            size_bytes: Some(size_gb * GB),
        }
    }

    fn limits(max: u32, budget_gb: Option<u64>) -> Limits {
        Limits {
            max_models_loaded: max,
            memory_budget: budget_gb.map(|g| g * GB),
            available: None,
        }
    }

    fn avail(max: u32, budget_gb: Option<u64>, free_gb: u64) -> Limits {
        Limits {
            available: Some(free_gb * GB),
            ..limits(max, budget_gb)
        }
    }

    /// (what, target size in GB, resident models, limits, expected plan)
    type Case = (
        &'static str,
        Option<u64>,
        Vec<Resident<'static>>,
        Limits,
        Plan<'static>,
    );

    #[test]
    fn plans_follow_the_rules() {
        let pinned = Resident {
            pinned: true,
            ..m("pinned", Ready, 0, 0, 4)
        };
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            ("empty provider", Some(4), vec![], limits(1, None), Plan::Load),
            ("a free slot", Some(4), vec![m("a", Ready, 0, 1, 4)], limits(2, None), Plan::Load),
            ("slot full: evict the idle one", Some(4), vec![m("a", Ready, 0, 1, 4)], limits(1, None), Plan::Evict(vec!["a"])),
            ("least recently used goes first", Some(1),
                vec![m("new", Ready, 0, 9, 1), m("old", Ready, 0, 2, 1), m("mid", Ready, 0, 5, 1)],
                limits(3, None), Plan::Evict(vec!["old"])),
            ("never a model in flight", Some(1), vec![m("busy", Ready, 2, 1, 1), m("idle", Ready, 0, 7, 1)],
                limits(2, None), Plan::Evict(vec!["idle"])),
            ("all busy: wait", Some(1), vec![m("busy", Ready, 1, 1, 1)], limits(1, None), Plan::Wait),
            ("a loading model is not a victim", Some(1), vec![m("l", Loading, 0, 1, 1)], limits(1, None), Plan::Wait),
            ("pinned is never a victim", Some(1), vec![pinned.clone()], limits(1, None), Plan::Wait),
            ("pinned skipped, next idle taken", Some(1), vec![pinned.clone(), m("b", Ready, 0, 5, 1)],
                limits(2, None), Plan::Evict(vec!["b"])),
            ("an unload under way frees the slot: wait for it", Some(1), vec![m("u", Unloading, 0, 1, 1)],
                limits(1, None), Plan::Wait),
            ("memory: evict until the target fits", Some(5),
                vec![m("a", Ready, 0, 1, 2), m("b", Ready, 0, 2, 3), m("c", Ready, 0, 3, 4)],
                limits(9, Some(12)), Plan::Evict(vec!["a"])),
            ("memory: more than one victim", Some(8),
                vec![m("a", Ready, 0, 1, 2), m("b", Ready, 0, 2, 3), m("c", Ready, 0, 3, 4)],
                limits(9, Some(12)), Plan::Evict(vec!["a", "b"])),
            ("memory: ties on age free the larger first", Some(4),
                vec![m("small", Ready, 0, 1, 1), m("big", Ready, 0, 1, 4)],
                limits(9, Some(6)), Plan::Evict(vec!["big"])),
            ("memory: busy models make it wait", Some(8), vec![m("a", Ready, 1, 1, 8)], limits(9, Some(12)), Plan::Wait),
            ("memory and slots together", Some(2),
                vec![m("a", Ready, 0, 1, 1), m("b", Ready, 0, 2, 9)],
                limits(2, Some(10)), Plan::Evict(vec!["a", "b"])),
            ("unknown sizes count as zero", None, vec![Resident { size_bytes: None, ..m("a", Ready, 0, 1, 0) }],
                limits(2, Some(1)), Plan::Load),
            ("larger than the whole budget", Some(20), vec![], limits(3, Some(16)),
                Plan::Refuse(RefuseReason::TooLarge { size_bytes: 20 * GB, budget: 16 * GB })),
            ("no slots at all", Some(1), vec![], limits(0, None), Plan::Refuse(RefuseReason::NoSlots)),
            ("free memory short: evict to make room", Some(4), vec![m("a", Ready, 0, 1, 3), m("b", Ready, 0, 2, 3)],
                avail(9, None, 2), Plan::Evict(vec!["a"])),
            ("free memory short, nothing idle: wait", Some(4), vec![m("a", Ready, 1, 1, 3)],
                avail(9, None, 2), Plan::Wait),
            ("free memory short with an empty provider: wait, do not refuse", Some(4), vec![],
                avail(9, Some(16), 2), Plan::Wait),
            ("an unload under way will free enough: wait for it", Some(4), vec![m("u", Unloading, 0, 1, 3)],
                avail(9, None, 2), Plan::Wait),
            ("enough free memory: load", Some(4), vec![m("a", Ready, 0, 1, 3)], avail(9, Some(16), 5), Plan::Load),
        ];
        for (what, size, resident, lim, want) in table {
            let size = size.map(|g| g * GB);
            assert_eq!(plan_load(size, &resident, lim), want, "{what}");
        }
    }

    #[test]
    fn evicting_the_plan_makes_the_target_fit() {
        // Property over a small grid: after removing the victims, one more model of the
        // target's size fits both limits.
        let pool = [
            m("a", Ready, 0, 3, 2),
            m("b", Ready, 1, 1, 3),
            m("c", Ready, 0, 2, 5),
            m("d", Loading, 0, 0, 1),
            m("e", Ready, 0, 7, 1),
        ];
        for max in 1..=6u32 {
            for budget in [None, Some(8), Some(12), Some(20)] {
                for size in 0..=8u64 {
                    let lim = limits(max, budget);
                    if let Plan::Evict(victims) = plan_load(Some(size * GB), &pool, lim) {
                        let left: Vec<_> =
                            pool.iter().filter(|m| !victims.contains(&m.name)).collect();
                        assert!(left.len() < max as usize, "slots: {max} {budget:?} {size}");
                        if let Some(b) = budget {
                            let used: u64 = left.iter().map(|m| m.size_bytes.unwrap()).sum();
                            assert!(
                                used + size * GB <= b * GB,
                                "memory: {max} {budget:?} {size}"
                            );
                        }
                        assert!(victims.iter().all(|v| pool
                            .iter()
                            .any(|m| m.name == *v && m.active == 0 && m.residency == Ready)));
                    }
                }
            }
        }
    }
}
