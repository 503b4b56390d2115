//! Pipeline stages on one thread, as issue #16's executor will drive them: stage 0 (embedding
//! and layer 0) and stage 1 (layers 1–2, final norm, LM head, loss) of qwen3-moe-mixed,
//! stage 1's input a fresh leaf holding stage 0's output, stage 0's backward seeded with the
//! gradient that leaf received (`(y · g).sum()`). The loss and every parameter gradient equal
//! the whole model's forward and backward bit for bit.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use common::*;
use moeru_checkpoints::load_hf_model;
use moeru_models::moe::load_balancing_loss;
use moeru_models::params::{ParamVisitor, Params};
use moeru_models::{Batch, ForwardCtx, Local, Qwen3Model};

/// Every parameter's gradient present in any of `grads`, by name.
struct Collect<'a>(
    &'a [&'a burn::tensor::Gradients],
    BTreeMap<String, Vec<f32>>,
);

impl ParamVisitor for Collect<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
        let found: Vec<Vec<f32>> = self
            .0
            .iter()
            .filter_map(|g| param.grad(g))
            .map(to_f32_vec)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{name}: gradients from {} stages",
            found.len()
        );
        self.1
            .insert(name.to_string(), found.into_iter().next().unwrap());
    }
}

fn batch_of(model: &Qwen3Model) -> Batch {
    let refs = outputs("qwen3-moe-mixed");
    let (ids, shape) = i64s(&refs, "input_ids");
    Batch::from_ids(&ids, shape[0], shape[1], &model.device())
}

fn coef(model: &Qwen3Model) -> f64 {
    model.config.moe.as_ref().unwrap().router_aux_loss_coef
}

#[test]
fn two_stages_equal_the_whole_model_bit_for_bit() {
    let device = test_device().autodiff();
    let load =
        || load_hf_model(&model_dir("qwen3-moe-mixed"), &device).unwrap_or_else(|e| panic!("{e}"));
    let ctx = ForwardCtx::default();

    let mut whole = load();
    let batch = batch_of(&whole);
    let out = whole.forward(&batch, &ctx);
    let loss =
        whole.lm_loss(&batch, out.hidden, &ctx) + out.aux_loss.unwrap().mul_scalar(coef(&whole));
    let want_loss = to_f32_vec(loss.clone());
    let g = loss.backward();
    let mut want = Collect(&[&g], BTreeMap::new());
    whole.visit_params(&mut want);

    let mut staged = load();
    let [b, s] = batch.dims();
    let (x0, r0) = staged.stage_forward(&batch, None, 0..1, false, &ctx);
    assert!(r0.is_empty(), "layer 0 is dense");
    let rows = x0.dims();
    let leaf = Tensor::<2>::from_data(TensorData::new(to_f32_vec(x0.clone()), rows), &device)
        .require_grad();
    let (h, r1) = staged.stage_forward(&batch, Some(leaf.clone()), 1..3, true, &ctx);
    let hidden = h.reshape([b, s, staged.config.hidden_size]);
    let stats: Vec<_> = r1.iter().map(|(_, st)| st.clone()).collect();
    let aux = load_balancing_loss(&stats, &Local).unwrap();
    let loss1 = staged.lm_loss(&batch, hidden, &ctx) + aux.mul_scalar(coef(&staged));
    assert_eq!(to_f32_vec(loss1.clone()), want_loss, "loss");
    let g1 = loss1.backward();
    let upstream = Tensor::<2>::from_inner(leaf.grad(&g1).expect("the stage input's gradient"));
    let g0 = (x0 * upstream).sum().backward();
    let mut got = Collect(&[&g0, &g1], BTreeMap::new());
    staged.visit_params(&mut got);
    assert_eq!(got.1.len(), want.1.len());
    for (name, w) in &want.1 {
        assert_eq!(&got.1[name], w, "gradient of {name}");
    }
}
