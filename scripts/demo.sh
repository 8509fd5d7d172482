#!/usr/bin/env bash
# The main job on the embedded default: venv, tiny Kandinsky 2.2 checkpoint, ~32 real photos with
# captions, fine-tune the prior and the decoder, export diffusers folders, generate one image.
# Usage: bash scripts/demo.sh [--backend flax|torch] [--steps N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=flax
STEPS=30
OUT=demo_output
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) BACKEND=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "error: unknown argument $1 (use --backend, --steps, --out)" >&2; exit 2 ;;
  esac
done
bash scripts/setup_env.sh
PY=.venv/bin/python
# this checkout's code, whichever checkout the venv's editable install points at
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT"
mkdir -p "$OUT"
$PY scripts/make_tiny_kandinsky.py --out "$OUT/pretrained" --size tiny
$PY scripts/make_sample_dataset.py --out "$OUT/data"
common=(--train_data_dir "$OUT/data" --train_batch_size 4 --max_train_steps "$STEPS"
  --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 3 --checkpointing_steps 10
  --checkpoints_total_limit 2 --seed 0 --backend "$BACKEND"
  --pretrained_prior_model_name_or_path "$OUT/pretrained/prior"
  --pretrained_decoder_model_name_or_path "$OUT/pretrained/decoder")
$PY scripts/train_text_to_image_prior.py "${common[@]}" --output_dir "$OUT/prior-finetuned" \
  | tee "$OUT/prior.json"
$PY scripts/train_text_to_image_decoder.py "${common[@]}" --resolution 64 \
  --output_dir "$OUT/decoder-finetuned" | tee "$OUT/decoder.json"
$PY scripts/generate.py --prior "$OUT/prior-finetuned" --decoder "$OUT/decoder-finetuned" \
  --prompt "a photo of a cat" --size 64 --steps 20 --out "$OUT/samples" > "$OUT/samples.txt"
$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
print("\n=== Kandinsky 2.2 demo finished ===")
for stage in ("prior", "decoder"):
    s = json.loads(open(f"{out}/{stage}.json").read().strip().splitlines()[-1])
    print(f"{stage:8s} loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} over {s['updates']} "
          f"updates ({s['backend']}, {s['seconds']} s); diffusers folder: {s['output_dir']}")
print("sample image:", open(f"{out}/samples.txt").read().strip())
print("tensorboard logs:", f"tensorboard --logdir {out}/prior-finetuned/logs",
      f"(and {out}/decoder-finetuned/logs)")
PYEOF
