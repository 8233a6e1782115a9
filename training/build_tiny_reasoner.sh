#!/usr/bin/env bash
# Rebuild the tiny-reasoner preset (tte_flash/presets/tiny-reasoner/) from scratch, seeded and resumable.
#
#   bash training/build_tiny_reasoner.sh [work_dir]      # default work_dir: runs/tiny-reasoner
#
# A deeper Qwen2-VL than tiny-instruct (text 8 layers, vision 3, mrope_section [2, 7, 7]) pretrained on a
# mix that asks for reasoning (training/README.md, "The tiny-reasoner backbone"): one-word answers to 1-2 hop
# grid moves (move_short) and text questions (text_short) beside the traced moves, locating weighted up,
# and a hop curriculum:
#   stage 1: STAGE1_STEPS from random weights, hops <= 1 (moves of 0-1 hops, 1-hop text), one question per
#            text sample;
#   stage 2: STAGE2_STEPS from stage 1, all hops (moves 0-3 with traces, one-word 1-2), several questions per
#            text sample, lower learning rate.
# One CPU thread per stage (THREADS to change it). Resumable: rerun the same command after a kill and each
# stage resumes from its last Trainer checkpoint (work_dir/stageN/checkpoints/checkpoint-N, saved every 500
# steps); a stage whose exported model.safetensors and pretrain_summary.json exist is skipped. The last step
# copies the exported backbone of the last finished stage into the package (SHIP_STAGE=1 ships stage 1).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/tiny-reasoner}
STAGE1_STEPS=${STAGE1_STEPS:-4500}
STAGE2_STEPS=${STAGE2_STEPS:-2500}
THREADS=${THREADS:-1}
SHIP_STAGE=${SHIP_STAGE:-2}
ARCH="--num_layers 8 --hidden_size 128 --intermediate_size 384 --num_heads 4 --num_kv_heads 2 --rope_theta 10000
      --mrope_section 2 7 7 --vision_depth 3 --vision_embed_dim 64 --vision_heads 2"
EVAL="--eval_steps 1500 --eval_n 30 --eval_kinds position_any locate move1_trace move1_short text1_short"
MIX1=cells=0.15,cell=0.08,cell_short=0.04,locate=0.18,describe=0.05,move=0.2,move_short=0.12,count=0.03,text=0.07,text_short=0.08
MIX2=cells=0.1,cell=0.04,cell_short=0.03,locate=0.15,describe=0.04,move=0.25,move_short=0.17,count=0.02,text=0.08,text_short=0.12

done_stage() { [[ -f "$1/model.safetensors" && -f "$1/pretrain_summary.json" ]]; }

if done_stage "$work/stage1"; then echo "stage 1: done, skipped"; else
    python training/pretrain.py --output_dir "$work/stage1" --max_steps "$STAGE1_STEPS" --seed 0 --threads "$THREADS" \
        $ARCH --learning_rate 2e-3 --warmup_steps 200 --no-multi_questions --max_hops 1 --task_weights "$MIX1" \
        --save_steps 500 --resume_from_checkpoint auto $EVAL
fi
if [[ "$SHIP_STAGE" == 2 ]]; then
    if done_stage "$work/stage2"; then echo "stage 2: done, skipped"; else
        python training/pretrain.py --output_dir "$work/stage2" --init_from "$work/stage1" --max_steps "$STAGE2_STEPS" \
            --seed 1 --threads "$THREADS" --learning_rate 1e-3 --warmup_steps 100 --task_weights "$MIX2" \
            --save_steps 500 --resume_from_checkpoint auto $EVAL
    fi
fi
preset=tte_flash/presets/tiny-reasoner
mkdir -p "$preset"
for f in config.json generation_config.json model.safetensors preprocessor_config.json tokenizer.json \
         tokenizer_config.json pretrain_summary.json; do
    cp "$work/stage$SHIP_STAGE/$f" "$preset/$f"
done
echo "tiny-reasoner (stage $SHIP_STAGE) copied into $preset (evaluations: $preset/pretrain_summary.json)"
