#!/usr/bin/env bash
# Rebuild the tiny-instruct preset (tte_flash/presets/tiny-instruct/) from scratch, seeded.
#
#   bash training/build_tiny_instruct.sh [work_dir]      # default work_dir: runs/tiny-instruct
#
# Two stages of training/pretrain.py, one CPU thread each (training/README.md, "Pretraining"):
#   stage 1: 6000 steps from random weights, the stage-1 task mix (moves and single cells), one question per
#            text sample (about 40 minutes on one core of a 2-core machine);
#   stage 2: 4000 steps from stage 1 with the default, denser mix (several cells per question, several text
#            questions per sample) at a lower learning rate (about 25 minutes).
# Stage 1 is bit-for-bit reproducible on the same torch build (its loss at step 50 is 5.253); stage 2 too.
# The last step copies the exported backbone into the package, replacing the shipped preset.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/tiny-instruct}
python training/pretrain.py --output_dir "$work/stage1" --max_steps 6000 --seed 0 --rope_theta 10000 \
    --no-multi_questions --task_weights cell=0.22,cell_short=0.08,locate=0.1,describe=0.08,move=0.3,count=0.08,text=0.14
python training/pretrain.py --output_dir "$work/stage2" --init_from "$work/stage1" --max_steps 4000 \
    --learning_rate 1e-3 --warmup_steps 100 --seed 1
preset=tte_flash/presets/tiny-instruct
mkdir -p "$preset"
for f in config.json generation_config.json model.safetensors preprocessor_config.json tokenizer.json \
         tokenizer_config.json pretrain_summary.json; do
    cp "$work/stage2/$f" "$preset/$f"
done
echo "tiny-instruct rebuilt in $preset (evaluations: $preset/pretrain_summary.json)"
