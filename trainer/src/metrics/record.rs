//! What one optimizer step reports, and its JSON form (one line of `metrics.jsonl`).

use serde_json::{json, Map, Value};

/// Expert load of one MoE layer: max and mean tokens routed to one expert.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerLoad {
    pub layer: usize,
    pub max: f64,
    pub mean: f64,
}

/// Metrics of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// 1-based optimizer step just finished.
    pub step: u64,
    /// LM loss (mean over target tokens).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed this step.
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// MoE load-balancing loss (unscaled); `None` for dense models.
    pub aux_loss: Option<f64>,
    pub z_loss: Option<f64>,
    pub expert_load: Vec<LayerLoad>,
    /// Under expert parallelism: rows routed to each EP rank's experts this step, over every
    /// MoE layer (the most loaded rank is the step's straggler); empty otherwise.
    pub ep_load: Vec<u64>,
    /// Bytes this rank's collectives moved this step, by group and op.
    pub comm: Vec<CommBytes>,
    /// The task's own metrics (DPO: rewards and log-probs), top-level keys of the line.
    pub task: Vec<(String, f64)>,
}

/// One op's traffic on one process group during a step (see `moeru_parallel::OpTraffic`).
#[derive(Debug, Clone, PartialEq)]
pub struct CommBytes {
    pub group: String,
    pub op: String,
    pub payload: u64,
    pub wire: u64,
    /// Wall time this rank spent in the op's exchanges (waiting for peers included).
    pub seconds: f64,
}

impl StepMetrics {
    /// The JSON object written to `metrics.jsonl`. Floats keep serde_json's shortest
    /// round-tripping form; a non-finite float becomes `null` (JSON has no NaN/inf).
    /// `aux_loss`, `z_loss`, `expert_load` and `ep_load` are present only when set / non-empty.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("step".into(), json!(self.step));
        obj.insert("loss".into(), json!(self.loss));
        obj.insert("lr".into(), json!(self.lr));
        obj.insert("grad_norm".into(), json!(self.grad_norm));
        obj.insert("tokens".into(), json!(self.tokens));
        obj.insert("tokens_per_s".into(), json!(self.tokens_per_s));
        if let Some(aux) = self.aux_loss {
            obj.insert("aux_loss".into(), json!(aux));
        }
        if let Some(z) = self.z_loss {
            obj.insert("z_loss".into(), json!(z));
        }
        if !self.expert_load.is_empty() {
            let loads = self
                .expert_load
                .iter()
                .map(|l| json!({ "layer": l.layer, "max": l.max, "mean": l.mean }))
                .collect();
            obj.insert("expert_load".into(), Value::Array(loads));
        }
        if !self.ep_load.is_empty() {
            obj.insert("ep_load".into(), json!(self.ep_load));
        }
        for (name, v) in &self.task {
            obj.insert(name.clone(), json!(v));
        }
        if !self.comm.is_empty() {
            let mut groups = Map::new();
            for c in &self.comm {
                let ops = groups
                    .entry(c.group.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(ops) = ops {
                    ops.insert(
                        c.op.clone(),
                        json!({ "payload": c.payload, "wire": c.wire, "seconds": c.seconds }),
                    );
                }
            }
            obj.insert("comm".into(), Value::Object(groups));
        }
        Value::Object(obj)
    }

    /// Parses a line written by [`StepMetrics::to_json`]; `None` when it is not a step line
    /// (an eval line, or a required field missing). `null` floats read back as NaN.
    pub fn from_json(v: &Value) -> Option<Self> {
        let f = |key: &str| -> Option<f64> {
            match v.get(key)? {
                Value::Null => Some(f64::NAN),
                x => x.as_f64(),
            }
        };
        let expert_load = match v.get("expert_load") {
            None => Vec::new(),
            Some(list) => list
                .as_array()?
                .iter()
                .map(|l| {
                    Some(LayerLoad {
                        layer: usize::try_from(l.get("layer")?.as_u64()?).ok()?,
                        max: l.get("max")?.as_f64().unwrap_or(f64::NAN),
                        mean: l.get("mean")?.as_f64().unwrap_or(f64::NAN),
                    })
                })
                .collect::<Option<Vec<_>>>()?,
        };
        let ep_load = match v.get("ep_load") {
            None => Vec::new(),
            Some(list) => (list.as_array()?.iter())
                .map(Value::as_u64)
                .collect::<Option<Vec<_>>>()?,
        };
        let mut comm = Vec::new();
        if let Some(Value::Object(groups)) = v.get("comm") {
            for (group, ops) in groups {
                for (op, t) in ops.as_object()? {
                    comm.push(CommBytes {
                        group: group.clone(),
                        op: op.clone(),
                        payload: t.get("payload")?.as_u64()?,
                        wire: t.get("wire")?.as_u64()?,
                        seconds: t.get("seconds").and_then(Value::as_f64).unwrap_or(0.0),
                    });
                }
            }
        }
        Some(StepMetrics {
            comm,
            task: Vec::new(),
            step: v.get("step")?.as_u64()?,
            loss: f("loss")?,
            lr: f("lr")?,
            grad_norm: f("grad_norm")?,
            tokens: v.get("tokens")?.as_u64()?,
            tokens_per_s: f("tokens_per_s")?,
            aux_loss: f("aux_loss"),
            z_loss: f("z_loss"),
            expert_load,
            ep_load,
        })
    }

    /// TensorBoard scalars of this step (tag, value).
    pub fn scalars(&self) -> Vec<(String, f32)> {
        let mut out = vec![
            ("train/loss".to_string(), self.loss as f32),
            ("train/lr".to_string(), self.lr as f32),
            ("train/grad_norm".to_string(), self.grad_norm as f32),
            ("train/tokens_per_s".to_string(), self.tokens_per_s as f32),
        ];
        if let Some(aux) = self.aux_loss {
            out.push(("train/aux_loss".to_string(), aux as f32));
        }
        if let Some(z) = self.z_loss {
            out.push(("train/z_loss".to_string(), z as f32));
        }
        for (name, v) in &self.task {
            out.push((format!("train/{name}"), *v as f32));
        }
        let mut wire = std::collections::BTreeMap::new();
        for c in &self.comm {
            let (bytes, seconds) = wire.entry(&c.group).or_insert((0, 0.0));
            *bytes += c.wire;
            *seconds += c.seconds;
        }
        for (group, (bytes, seconds)) in wire {
            out.push((format!("comm/{group}_wire_bytes"), bytes as f32));
            out.push((format!("comm/{group}_seconds"), seconds as f32));
        }
        for l in &self.expert_load {
            out.push((format!("moe/layer{}/load_max", l.layer), l.max as f32));
            out.push((format!("moe/layer{}/load_mean", l.layer), l.mean as f32));
        }
        if let Some(&max) = self.ep_load.iter().max() {
            let mean = self.ep_load.iter().sum::<u64>() as f64 / self.ep_load.len() as f64;
            // The straggler measure: 1 when every EP rank's experts got the same rows.
            out.push((
                "moe/ep_load_max_over_mean".into(),
                (max as f64 / mean.max(1.0)) as f32,
            ));
        }
        out
    }
}

/// The `metrics.jsonl` line of an evaluation at `step`.
pub fn eval_json(step: u64, loss: f64) -> Value {
    json!({ "step": step, "eval_loss": loss, "eval_ppl": loss.exp() })
}

/// A task's evaluation line: `{"step", "eval_<name>": value, ...}`.
pub fn eval_values_json(step: u64, values: &[(String, f64)]) -> Value {
    let mut obj = Map::new();
    obj.insert("step".into(), json!(step));
    for (name, v) in values {
        obj.insert(format!("eval_{name}"), json!(v));
    }
    Value::Object(obj)
}
