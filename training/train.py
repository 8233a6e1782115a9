"""Joint CoT-reconstruction + contrastive training of a TTE-Flash model (DESIGN.md §5).

    python training/train.py --model tiny --train_data data/train.jsonl --image_root data \\
        --output_dir runs/tiny --think_tokens 16 --cot_weight 1.0 --max_steps 500 \\
        --per_device_train_batch_size 32 --learning_rate 1e-3
    python training/train.py training/configs/tiny.yaml [--overrides ...]     # a recipe
    torchrun --nproc_per_node 8 training/train.py training/configs/qwen2-vl-2b.yaml --model /path/to/Qwen2-VL-2B-Instruct

Arguments are Hugging Face dataclasses (``--output_dir`` and ``--output-dir`` both work): see
``tte_flash.training`` for the model and data arguments, plus every ``transformers.TrainingArguments`` flag.
"""
import sys

from tte_flash.training import NonFiniteTrainingError, main

if __name__ == "__main__":
    try:
        main()
    except (NonFiniteTrainingError, ValueError, OSError) as error:  # a clear message, not a traceback
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
