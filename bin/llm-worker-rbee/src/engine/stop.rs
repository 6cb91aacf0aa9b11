//! Stop sequences, matched across token boundaries and never emitted.
//!
//! Text that could be the start of a stop sequence is held back until the
//! next token shows whether it is one.

/// Holds back text that may begin a stop sequence.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to emit after feeding text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text and go on.
    Continue(String),
    /// Emit this text (what came before the stop sequence) and end.
    Stopped(String),
}

impl StopMatcher {
    /// Match these stop sequences (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feed decoded text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopCheck::Continue(std::mem::take(&mut self.pending));
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let before = self.pending[..at].to_owned();
            self.pending.clear();
            return StopCheck::Stopped(before);
        }
        let hold = self.longest_partial_match();
        let emit_len = self.pending.len() - hold;
        let emit = self.pending[..emit_len].to_owned();
        self.pending.drain(..emit_len);
        StopCheck::Continue(emit)
    }

    /// Text still held back, released when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that are a proper prefix of some stop sequence.
    fn longest_partial_match(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.pending.char_indices() {
            let tail = &self.pending[start..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                best = best.max(tail.len());
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_split_across_tokens_is_matched_and_not_emitted() {
        assert_eq!(
            run(&["END"], &["Hello E", "N", "D tail"]),
            ("Hello ".to_owned(), true)
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["END"], &["EN", "x", "!"]), ("ENx!".to_owned(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".to_owned(), true));
    }

    #[test]
    fn multi_byte_stop_sequences_work() {
        assert_eq!(run(&["€€"], &["1€", "€2"]), ("1".to_owned(), true));
    }

    #[test]
    fn no_stops_passes_everything_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_owned(), false));
    }

    #[test]
    fn held_text_is_released_at_the_end() {
        assert_eq!(run(&["STOP"], &["ok ST"]), ("ok ST".to_owned(), false));
    }
}
