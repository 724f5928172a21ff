//! A bounded list of recent events (compactions, pressure actions) for `/status`: the oldest
//! is dropped when it is full. Short critical sections only.

use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug)]
pub struct Recent<T> {
    cap: usize,
    ring: Mutex<VecDeque<T>>,
}

impl<T: Clone> Recent<T> {
    pub fn new(cap: usize) -> Self {
        Recent {
            cap,
            ring: Mutex::new(VecDeque::with_capacity(cap)),
        }
    }

    pub fn push(&self, e: T) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == self.cap {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// Oldest first.
    pub fn list(&self) -> Vec<T> {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_the_newest() {
        let r = super::Recent::new(2);
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.list(), [3, 4]);
    }
}
