#!/usr/bin/env bash
# The upcycling demo of docs/upcycling.md, no download: a small dense llama-style model trained here,
# exported to transformers, imported back (--model.init_from), upcycled the EvoMoE way, exported as an
# MoE and run by transformers; plus the two comparisons at equal extra tokens (continue the dense model,
# and an MoE trained from scratch; a dense model from scratch for all the tokens as a reference).
# Every run: lr 3e-3 with warmup and cosine decay over its own steps (a continued run restarts the schedule).
# Usage: benchmarks/upcycle_demo.sh [OUT_DIR] (default runs/upcycle_demo); about 8 minutes on 2 CPU cores.
set -euo pipefail
OUT=${1:-runs/upcycle_demo}
EVOMOE=${EVOMOE:-.venv/bin/evomoe}
PY=${PY:-.venv/bin/python}
DENSE_STEPS=${DENSE_STEPS:-600}
EXTRA_STEPS=${EXTRA_STEPS:-400}
COMMON=(--no-progress --train.threads=${THREADS:-1} --data.max_bytes=${MAX_BYTES:-1000000} --train.batch_size=16
  --train.eval_every=100 --train.eval_batches=16 --train.log_every=20 --train.ckpt_every=100 --train.lr=3e-3)
SHAPE=(--model.style=llama --model.activation=swiglu --model.d_model=64 --model.n_layers=4 --model.n_heads=4
  --model.n_kv_heads=2 --model.d_ff=128 --model.seq_len=64)
# EvoMoE schedule for the extra steps: diversify 30, DTS soft phase 120 (tau 2 -> 0.3 over 100), hard top-1
EVO=(--moe.num_experts=4 --model.moe_every=2 --evolve.diversify_steps=30 --evolve.spawn=copy
  --evolve.noise=0.01 --gate.decay_steps=100 --gate.hard_after=120)

# 1. a dense llama-style model with its own BPE tokenizer
$EVOMOE train tiny "${COMMON[@]}" "${SHAPE[@]}" --moe.enabled=false --data.tokenizer=bpe \
  --data.vocab_size=1024 --train.steps=$DENSE_STEPS --out $OUT/dense --overwrite
# 2. export it: a Llama directory with the tokenizer
$EVOMOE export $OUT/dense --out $OUT/dense_hf --overwrite
# 3. import it back and upcycle it (every second MLP becomes 4 experts, copy spawn, DTS, hard top-1)
$EVOMOE train upcycle "${COMMON[@]}" "${EVO[@]}" --model.init_from=$OUT/dense_hf --model.seq_len=64 \
  --train.steps=$EXTRA_STEPS --out $OUT/moe --overwrite
# 3b. the same upcycling with a renormalised top-2 router (Switch-style aux loss, no soft phase)
$EVOMOE train upcycle "${COMMON[@]}" "${EVO[@]}" --router.name=topk --router.topk.k=2 \
  --model.init_from=$OUT/dense_hf --model.seq_len=64 --train.steps=$EXTRA_STEPS --out $OUT/moe_top2 --overwrite
# 4. the baseline at equal extra tokens: continue the dense model
$EVOMOE train upcycle "${COMMON[@]}" --moe.enabled=false --model.init_from=$OUT/dense_hf --model.seq_len=64 \
  --train.steps=$EXTRA_STEPS --out $OUT/dense_more --overwrite
# 5. an MoE of the same shape from scratch (EvoMoE, same tokenizer and data), for all the tokens
$EVOMOE train upcycle "${COMMON[@]}" "${EVO[@]}" --data.tokenizer=bpe --data.vocab_size=1024 "${SHAPE[@]}" \
  --model.moe_every=2 --train.steps=$((DENSE_STEPS + EXTRA_STEPS)) --out $OUT/moe_scratch --overwrite
# 5b. the dense model from scratch for all the tokens (what the restart of the schedule costs)
$EVOMOE train tiny "${COMMON[@]}" "${SHAPE[@]}" --moe.enabled=false --data.tokenizer=bpe \
  --data.vocab_size=1024 --train.steps=$((DENSE_STEPS + EXTRA_STEPS)) --out $OUT/dense_scratch --overwrite
# 6. export the MoE and generate with transformers and with evomoe (greedy: the same tokens)
$EVOMOE export $OUT/moe --out $OUT/moe_hf --overwrite
$EVOMOE generate $OUT/moe --prompt "def main(" --max-new-tokens 24 --temperature 0
HF_HUB_OFFLINE=1 $PY - "$OUT/moe_hf" <<'PY'
import sys, torch, transformers as tf
d = sys.argv[1]
tok = tf.AutoTokenizer.from_pretrained(d)
model = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
ids = tok("def main(", return_tensors="pt", add_special_tokens=False).input_ids
out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
print(type(model).__name__, repr(tok.decode(out[0])))
PY
for r in dense moe moe_top2 dense_more moe_scratch dense_scratch; do
  printf '%-12s ' $r; $PY -c "import json,sys; r=json.load(open('$OUT/$r/results.json')); print(r['steps'], round(r['val_loss'],4), round(r['val_bpb'],4), '%.3g' % r['train_flops'], round(r['train_seconds']))"
done
