"""LoRA fine-tuning of SmolLM2-135M-Instruct to answer questions from a passage, in its words.

    python -m train --config experiments/sft_smollm2_lora.py --workdir runs/sft_smollm2_lora
    python -m train --config experiments/sft_smollm2_lora.py:qlora --workdir runs/sft_qlora

Data: `train.sft_britannica` turns hand-written questions about the Britannica article on
Shakespeare (answers are verbatim spans) into chats: a ~600-character passage and a question
from the user, the exact answer from the assistant. The first 80% of the questions (by place in
the article) train; the last 20% are held out, passages the model never saw in training.
The loss counts assistant tokens only; conversations are packed two or three to a row with
segment ids. Before and after training the run measures the loss on held-out answers and the
exact-match rate of greedy answers to the held-out questions (workdir/answers.json).

Hardware and result (2-core AMD EPYC VM, 2026-12-07): LoRA rank 16 on every projection of the
30 layers trains 3.5% of the parameters; 40 steps at ~9 s each; 8 min 9 s in all (`time`),
loading and both evaluations included. Held-out answer loss 1.686 -> 0.368 nats/token, exact
answers 0/40 -> 17/40 (docs/finetune.md).

`:qlora` keeps the frozen base weights int8 (weight-only, per-channel scales). `:runlocal` is a
tiny smoke run (3 steps, short rows) that tests use.
"""

from train.defaults import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.init_from = "smollm2-135m-instruct"
    config.data.objective = "sft"
    config.data.source = "britannica_qa"  # or a chat JSONL file of your own
    config.data.seq_len = 512  # a chat is ~230 tokens: two fit a row
    config.data.batch_size = 4
    config.data.eval_batch_size = 8

    config.lora.rank = 16
    config.lora.alpha = 32.0
    # No adapter dropout (PEFT's default): on 2 CPU cores its masks (~300M random numbers a
    # step from XLA:CPU's threefry) take a 7.7 s step to 9.3 s, nearly all that LoRA saves over
    # full fine-tuning (9.4 s), and with 0.05 the held-out results were the same (docs/finetune.md).
    config.lora.dropout = 0.0

    config.optimizer.learning_rate = 1e-3  # LoRA tolerates (and needs) a far higher rate
    config.optimizer.min_learning_rate = 1e-4
    config.optimizer.warmup_steps = 4
    config.optimizer.weight_decay = 0.0

    config.model.scan_unroll = 1
    config.train.num_steps = 40  # ~2.5 epochs of the 140-odd training chats
    config.train.log_every = 5
    config.train.eval_every = 20
    config.train.checkpoint_every = 20
    config.train.answer_eval = 40  # every held-out question, greedy, before and after
    config.train.answer_max_tokens = 16
    config.train.sample_tokens = 0

    args = set((arg or "").split(",")) - {""}
    unknown = args - {"runlocal", "qlora"}
    if unknown:
        raise ValueError(f"unknown config args {sorted(unknown)}; use runlocal and/or qlora")
    if "qlora" in args:
        config.model.quant = "int8"
        config.model.quant_group_size = 0  # one scale per output channel
    if "runlocal" in args:
        config.data.seq_len = 256
        config.data.batch_size = 2
        config.data.eval_batches = 1
        config.data.eval_batch_size = 2
        config.train.num_steps = 3
        config.optimizer.warmup_steps = 1
        config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 3
        config.train.answer_eval = 2
        config.train.answer_max_tokens = 4
        config.train.progress_bar = False
    return config
