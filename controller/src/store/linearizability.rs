//! A linearizability checker for key-value histories recorded against a
//! [`StateStore`](super::StateStore): the Wing & Gong search with Lowe's
//! memoisation (the algorithm behind Porcupine and Knossos), run per key
//! (linearizability is compositional, so keys are checked independently).
//!
//! A history is a list of [`Op`]s with the time the client called and the
//! time it got the answer. An op whose outcome is unknown (a timeout) has no
//! return time: it may take effect at any point after its call, or never.
//! Ops that certainly did not take effect (refused before submission) should
//! be left out of the history.
//!
//! Model: each key is a register holding `Option<value>`; `Put` sets it,
//! `Get` observes it, `Cas` sets it only if it holds the expected value.

use std::collections::{BTreeMap, HashSet};

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// Set the key.
    Put(String),
    /// Read the key.
    Get,
    /// Set the key to `new` if it holds `expected` (`None`: absent).
    Cas {
        /// Expected current value.
        expected: Option<String>,
        /// New value.
        new: String,
    },
}

/// What the client saw (`None` in [`Op::output`] when unknown).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// A put was acknowledged.
    Done,
    /// The value read.
    Value(Option<String>),
    /// Whether a compare-and-set applied.
    Swapped(bool),
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The key.
    pub key: String,
    /// When the client called (any monotonic unit, e.g. ns since start).
    pub call: u64,
    /// When it returned; `None` when the outcome is unknown.
    pub ret: Option<u64>,
    /// What was asked.
    pub input: Input,
    /// What was seen; `None` when unknown.
    pub output: Option<Output>,
}

/// A key whose history has no linearization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// Its operations, in call order.
    pub ops: Vec<Op>,
}

/// Applies `op` to a register; `None` if the op's output contradicts it.
fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    match (&op.input, &op.output) {
        (Input::Put(v), _) => Some(Some(v.clone())),
        (Input::Get, None) => Some(state.clone()),
        (Input::Get, Some(Output::Value(v))) => (v == state).then(|| state.clone()),
        (Input::Cas { expected, new }, None) => Some(if state == expected {
            Some(new.clone())
        } else {
            state.clone()
        }),
        (Input::Cas { expected, new }, Some(Output::Swapped(ok))) => {
            if (state == expected) != *ok {
                None
            } else if *ok {
                Some(Some(new.clone()))
            } else {
                Some(state.clone())
            }
        }
        // A get that returned something else, or a CAS that answered
        // otherwise, can never be explained.
        (Input::Get | Input::Cas { .. }, Some(_)) => None,
    }
}

/// Checks one key's operations (all with the same key).
pub fn check_key(ops: &[Op]) -> bool {
    let n = ops.len();
    if n == 0 {
        return true;
    }
    // Events: (time, is_return, op). Calls sort before returns at equal
    // times, so touching ops count as concurrent (never a false alarm).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, false, i));
        events.push((op.ret.unwrap_or(u64::MAX), true, i));
    }
    events.sort();
    // A doubly linked list over events with a head sentinel at index len.
    let len = events.len();
    let head = len;
    let mut next = vec![usize::MAX; len + 1];
    let mut prev = vec![usize::MAX; len + 1];
    let mut ret_of = vec![0usize; n];
    let mut last = head;
    for (e, &(_, is_ret, op)) in events.iter().enumerate() {
        next[last] = e;
        prev[e] = last;
        last = e;
        if is_ret {
            ret_of[op] = e;
        }
    }
    next[last] = usize::MAX;

    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, q) = (prev[e], next[e]);
        next[p] = q;
        if q != usize::MAX {
            prev[q] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, q) = (prev[e], next[e]);
        next[p] = e;
        if q != usize::MAX {
            prev[q] = e;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut state: Option<String> = None;
    let mut entry = next[head];
    while next[head] != usize::MAX {
        if entry == usize::MAX {
            // Nothing more can be linearized on this path.
            let Some((call_event, prev_state)) = stack.pop() else {
                return false;
            };
            let op = events[call_event].2;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, ret_of[op]);
            relink(&mut next, &mut prev, call_event);
            state = prev_state;
            entry = next[call_event];
            continue;
        }
        let (_, is_ret, op) = events[entry];
        if !is_ret {
            if let Some(new_state) = step(&state, &ops[op]) {
                let mut lin = linearized.clone();
                lin[op / 64] |= 1 << (op % 64);
                if cache.insert((lin.clone(), new_state.clone())) {
                    stack.push((entry, state));
                    state = new_state;
                    linearized = lin;
                    unlink(&mut next, &mut prev, entry);
                    unlink(&mut next, &mut prev, ret_of[op]);
                    entry = next[head];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // An op returned before being linearized: backtrack.
            let Some((call_event, prev_state)) = stack.pop() else {
                return false;
            };
            let op = events[call_event].2;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, ret_of[op]);
            relink(&mut next, &mut prev, call_event);
            state = prev_state;
            entry = next[call_event];
        }
    }
    true
}

/// Checks a whole history; returns the keys without a linearization.
pub fn check(history: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    by_key
        .into_iter()
        .filter_map(|(key, mut ops)| {
            ops.sort_by_key(|o| o.call);
            (!check_key(&ops)).then(|| Violation {
                key: key.to_owned(),
                ops,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, input: Input, output: Option<Output>) -> Op {
        Op {
            key: "k".into(),
            call,
            ret,
            input,
            output,
        }
    }

    fn put(c: u64, r: u64, v: &str) -> Op {
        op(c, Some(r), Input::Put(v.into()), Some(Output::Done))
    }

    fn get(c: u64, r: u64, v: Option<&str>) -> Op {
        op(
            c,
            Some(r),
            Input::Get,
            Some(Output::Value(v.map(str::to_owned))),
        )
    }

    #[test]
    fn sequential_histories() {
        assert!(check_key(&[put(0, 1, "a"), get(2, 3, Some("a"))]));
        assert!(!check_key(&[put(0, 1, "a"), get(2, 3, Some("b"))]));
        assert!(!check_key(&[put(0, 1, "a"), get(2, 3, None)]));
        assert!(check_key(&[get(0, 1, None), put(2, 3, "a")]));
    }

    #[test]
    fn concurrent_ops_may_order_either_way() {
        // get overlaps the put: both old and new values are fine.
        assert!(check_key(&[put(0, 10, "a"), get(5, 6, None)]));
        assert!(check_key(&[put(0, 10, "a"), get(5, 6, Some("a"))]));
    }

    #[test]
    fn stale_read_after_a_newer_one_is_caught() {
        // The classic violation: two sequential reads see a new value then
        // the old one while the write is still in flight.
        let h = [
            put(0, 1, "old"),
            put(2, 100, "new"),
            get(10, 20, Some("new")),
            get(30, 40, Some("old")),
        ];
        assert!(!check_key(&h));
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_apply() {
        let lost = op(0, None, Input::Put("x".into()), None);
        assert!(check_key(&[lost.clone(), get(5, 6, None)]));
        assert!(check_key(&[lost.clone(), get(5, 6, Some("x"))]));
        // But once seen, it cannot be unseen.
        assert!(!check_key(&[lost, get(5, 6, Some("x")), get(7, 8, None)]));
    }

    #[test]
    fn compare_and_set() {
        let cas = |c, r, e: Option<&str>, n: &str, ok| {
            op(
                c,
                Some(r),
                Input::Cas {
                    expected: e.map(str::to_owned),
                    new: n.into(),
                },
                Some(Output::Swapped(ok)),
            )
        };
        // Two CAS from absent: only one may win.
        assert!(check_key(&[
            cas(0, 5, None, "a", true),
            cas(1, 6, None, "b", false)
        ]));
        assert!(!check_key(&[
            cas(0, 5, None, "a", true),
            cas(1, 6, None, "b", true)
        ]));
        assert!(check_key(&[
            put(0, 1, "a"),
            cas(2, 3, Some("a"), "b", true),
            get(4, 5, Some("b"))
        ]));
    }

    #[test]
    fn keys_are_independent() {
        let mut h = vec![put(0, 1, "a"), get(2, 3, Some("a"))];
        h.push(Op {
            key: "other".into(),
            ..get(0, 1, Some("zzz"))
        });
        let v = check(&h);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].key, "other");
    }

    #[test]
    fn many_concurrent_writers_stay_tractable() {
        // 200 overlapping puts and reads: memoisation keeps this fast.
        let mut h = Vec::new();
        for i in 0..100u64 {
            h.push(put(i * 10, i * 10 + 25, &format!("v{i}")));
            h.push(get(i * 10 + 26, i * 10 + 27, Some(&format!("v{i}"))));
        }
        // Reads right after each put returns, with later puts overlapping.
        // v_i is readable at i*10+26 only if put(i+1) (called at i*10+10)
        // is linearized after the read, which is allowed.
        assert!(check_key(&h));
    }
}
