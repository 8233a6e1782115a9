#!/usr/bin/env bash
# Rebuild the tiny-reasoner preset (tte_flash/presets/tiny-reasoner/), seeded and resumable.
#
#   bash training/build_tiny_reasoner.sh [work_dir]            # default work_dir: runs/tiny-reasoner-grown
#   FROM=scratch bash training/build_tiny_reasoner.sh [dir]    # the from-scratch recipe (measured, not shipped)
#
# Shipped recipe (FROM=grown, training/README.md "The tiny-reasoner backbone"): tiny-instruct grown to 8 text
# layers without changing what it computes (training/grow_backbone.py: each layer followed by a copy whose
# o_proj/down_proj are zero), then STEPS steps of training/pretrain.py on a mix that asks for reasoning:
# one-word answers to 1-2 hop grid moves (move_short) and text questions (text_short) beside the traced moves,
# locating weighted up. About 60 minutes on one core of a busy 2-core machine.
#
# From scratch (FROM=scratch): an 8-layer model from random weights, stage 1 hops <= 1, stage 2 all hops
# (STAGE1_STEPS, STAGE2_STEPS); it did not learn to read positions in 4500 steps (README).
#
# One CPU thread (THREADS). Resumable: rerun the same command after a kill and a stage resumes from its last
# Trainer checkpoint (<stage>/checkpoints/checkpoint-N, every 500 steps); a stage whose exported
# model.safetensors and pretrain_summary.json exist is skipped. The last step copies the result into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
FROM=${FROM:-grown}
THREADS=${THREADS:-1}
done_stage() { [[ -f "$1/model.safetensors" && -f "$1/pretrain_summary.json" ]]; }
MIX=cells=0.1,cell=0.04,cell_short=0.03,locate=0.15,describe=0.04,move=0.25,move_short=0.2,count=0.02,text=0.07,text_short=0.1

if [[ "$FROM" == grown ]]; then
    work=${1:-runs/tiny-reasoner-grown}
    STEPS=${STEPS:-3000}
    [[ -f "$work/init/model.safetensors" ]] || python training/grow_backbone.py --source tiny-instruct \
        --output_dir "$work/init" --num_layers 8
    if done_stage "$work/stage1"; then echo "stage 1: done, skipped"; else
        python training/pretrain.py --output_dir "$work/stage1" --init_from "$work/init" --max_steps "$STEPS" \
            --learning_rate 1e-3 --warmup_steps 100 --seed 2 --threads "$THREADS" --task_weights "$MIX" \
            --save_steps 500 --resume_from_checkpoint auto --eval_steps 1000 --eval_n 30 \
            --eval_kinds position_any locate move1_trace move1_short move2_short text1_short
    fi
    ship="$work/stage1"
else
    work=${1:-runs/tiny-reasoner}
    STAGE1_STEPS=${STAGE1_STEPS:-4500}
    STAGE2_STEPS=${STAGE2_STEPS:-2500}
    ARCH="--num_layers 8 --hidden_size 128 --intermediate_size 384 --num_heads 4 --num_kv_heads 2 --rope_theta 10000
          --mrope_section 2 7 7 --vision_depth 3 --vision_embed_dim 64 --vision_heads 2"
    EVAL="--eval_steps 1500 --eval_n 30 --eval_kinds position_any locate move1_trace move1_short text1_short"
    MIX1=cells=0.15,cell=0.08,cell_short=0.04,locate=0.18,describe=0.05,move=0.2,move_short=0.12,count=0.03,text=0.07,text_short=0.08
    if done_stage "$work/stage1"; then echo "stage 1: done, skipped"; else
        python training/pretrain.py --output_dir "$work/stage1" --max_steps "$STAGE1_STEPS" --seed 0 --threads "$THREADS" \
            $ARCH --learning_rate 2e-3 --warmup_steps 200 --no-multi_questions --max_hops 1 --task_weights "$MIX1" \
            --save_steps 500 --resume_from_checkpoint auto $EVAL
    fi
    if done_stage "$work/stage2"; then echo "stage 2: done, skipped"; else
        python training/pretrain.py --output_dir "$work/stage2" --init_from "$work/stage1" --max_steps "$STAGE2_STEPS" \
            --seed 1 --threads "$THREADS" --learning_rate 1e-3 --warmup_steps 100 --task_weights "$MIX" \
            --save_steps 500 --resume_from_checkpoint auto $EVAL
    fi
    ship="$work/stage2"
fi
preset=tte_flash/presets/tiny-reasoner
mkdir -p "$preset"
for f in config.json generation_config.json model.safetensors preprocessor_config.json tokenizer.json \
         tokenizer_config.json pretrain_summary.json; do
    cp "$ship/$f" "$preset/$f"
done
echo "tiny-reasoner ($FROM) copied into $preset (evaluations: $preset/pretrain_summary.json)"
