//! The packed training sample the trainer consumes.

use serde::{Deserialize, Serialize};

/// How documents become fixed-length samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PackMode {
    /// Concatenate documents; a document that does not fit is continued in the next sample.
    #[default]
    Pack,
    /// One document per sample, padded; a document longer than `seq_len` is continued in the
    /// next sample(s), each padded after the document ends.
    Pad,
}

/// One sample of `seq_len` positions.
///
/// Conventions (the model's loss relies on them):
/// - **Position `t` predicts `labels[t]`.** `labels[t]` is the token that follows
///   `input_ids[t]` in the same document, so `labels[t] == input_ids[t + 1]` whenever
///   `t + 1 < seq_len` and `loss_mask[t] == 1`. At `t = seq_len - 1` the label is the
///   document's next token, which opens the following sample when the document continues there
///   (use `labels`, not a shift of `input_ids`, to train on it).
/// - **`loss_mask[t]` is the target mask**: 1 iff the loss at position `t` counts, i.e. the
///   document continues after `t` and the prepared per-token mask of that next token is 1
///   (in chat data: the next token is assistant content or its `<|im_end|>`). It is 0 at the
///   last token of every document, so no label crosses a document boundary, and 0 on padding.
/// - `position_ids` restart at 0 at the start of every document segment in the sample (a
///   document continued from the previous sample also restarts at 0).
/// - `document_ids` number the segments of the sample 0, 1, 2, ...; attention must stay within
///   equal ids. Padding positions form one extra segment of their own (so no attention row is
///   empty), with `input_ids` = pad id, `labels` = pad id and `loss_mask` = 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedSample {
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub loss_mask: Vec<u8>,
    pub position_ids: Vec<i32>,
    pub document_ids: Vec<i32>,
}

impl PackedSample {
    pub fn with_capacity(seq_len: usize) -> Self {
        Self {
            input_ids: Vec::with_capacity(seq_len),
            labels: Vec::with_capacity(seq_len),
            loss_mask: Vec::with_capacity(seq_len),
            position_ids: Vec::with_capacity(seq_len),
            document_ids: Vec::with_capacity(seq_len),
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions whose loss counts.
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }

    /// Append one document segment: `seg` holds its ids, `seg_mask_shifted` the prepared masks
    /// of `seg[1..]` (the targets of all but its last position), and `last_label` the
    /// document's token after the segment with its mask (`None` when the document ends).
    pub(crate) fn push_segment(
        &mut self,
        seg: &[i32],
        seg_mask_shifted: &[u8],
        last_label: Option<(i32, u8)>,
        pad_id: i32,
    ) {
        let doc = self.next_segment_id();
        let n = seg.len();
        if n == 0 {
            return;
        }
        self.input_ids.extend_from_slice(seg);
        self.labels.extend_from_slice(&seg[1..]);
        self.loss_mask.extend_from_slice(seg_mask_shifted);
        match last_label {
            Some((label, m)) => {
                self.labels.push(label);
                self.loss_mask.push(m);
            }
            None => {
                self.labels.push(pad_id);
                self.loss_mask.push(0);
            }
        }
        self.position_ids.extend(0..n as i32);
        self.document_ids.extend(std::iter::repeat_n(doc, n));
    }

    /// Fill the remaining positions up to `seq_len` with padding (one extra segment).
    pub(crate) fn pad_to(&mut self, seq_len: usize, pad_id: i32) {
        let n = seq_len.saturating_sub(self.len());
        if n == 0 {
            return;
        }
        let doc = self.next_segment_id();
        self.input_ids.extend(std::iter::repeat_n(pad_id, n));
        self.labels.extend(std::iter::repeat_n(pad_id, n));
        self.loss_mask.extend(std::iter::repeat_n(0, n));
        self.position_ids.extend(0..n as i32);
        self.document_ids.extend(std::iter::repeat_n(doc, n));
    }

    fn next_segment_id(&self) -> i32 {
        self.document_ids.last().map_or(0, |&d| d + 1)
    }
}
