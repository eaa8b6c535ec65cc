"""The base experiment config: every key an experiment may set, with its default.

Config scripts in `experiments/` start from `base_config()` and change what they need, so every
config has the same locked set of keys and a typo on the command line is caught.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from models.config import ModelConfig


def model_config_dict(model: ModelConfig | None = None) -> ml_collections.ConfigDict:
    """A ConfigDict with every `ModelConfig` field (vocab_size 0 = take it from the tokenizer)."""
    if model is not None:
        return ml_collections.ConfigDict(dataclasses.asdict(model))
    # nanoGPT's CPU "baby GPT" shape; vocab_size 1 is a placeholder replaced just below.
    model = ModelConfig(
        vocab_size=1, num_layers=4, embed_dim=128, num_heads=4, mlp_dim=512, max_seq_len=64
    )
    # num_kv_heads / head_dim stay None (derived from num_heads) so overriding num_heads works.
    values = {**dataclasses.asdict(model), "vocab_size": 0, "num_kv_heads": None, "head_dim": None}
    return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config_dict()
    # Fine-tuning: a pretrained model to start from (a registry name such as
    # "smollm2-135m-instruct", a .gguf file or a Hugging Face dir); its architecture and
    # tokenizer replace config.model's, of which only the numerics (dtype, param_dtype,
    # remat_policy, scan_unroll, attention_impl, quant) apply. "" trains config.model from scratch.
    config.init_from = ""
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0  # 0 = train every parameter; > 0 = train only LoRA adapters
    config.lora.alpha = 16.0
    config.lora.dropout = 0.0
    config.lora.targets = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    config.lora.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank

    config.data = ml_collections.ConfigDict()
    config.data.source = "shakespeare"  # or a path to a .txt file or a directory of texts
    config.data.val_names = ml_collections.FieldReference(
        None, field_type=tuple
    )  # None: default plays
    config.data.tokenizer = "char"  # char | byte | sentencepiece_bpe | sentencepiece_unigram
    config.data.vocab_size = 0  # SentencePiece vocabulary size (ignored for char/byte)
    config.data.seq_len = 64
    config.data.batch_size = 12  # global batch per optimizer step (split over accumulation)
    config.data.seed = 0
    config.data.eval_batches = 0  # validation batches per evaluation; 0 = the whole split
    config.data.eval_batch_size = 0  # 0 = data.batch_size; larger is faster (forward only)
    # causal_lm | span_corruption (T5; an encoder-decoder) | blank_infilling (GLM: a decoder
    # with model.block_positions; model.max_seq_len must hold seq_len + 2 per span)
    config.data.objective = "causal_lm"
    config.data.noise_density = 0.15  # span corruption: fraction of tokens corrupted
    config.data.mean_span_length = 3.0  # span corruption: mean corrupted span length
    # sft (with init_from): data.source is a chat JSONL file ({"messages": [...]} per line) or
    # "britannica_qa" (train.sft_britannica); val_source the held-out JSONL ("" for the
    # built-in set's held-out split). The loss counts assistant tokens only.
    config.data.val_source = ""

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.min_learning_rate = 1e-4
    config.optimizer.warmup_steps = 100
    config.optimizer.decay_steps = 0  # 0 = decay over train.num_steps
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.99
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.1
    config.optimizer.grad_clip = 1.0

    # Parallelism, used when more than one device is visible (parallel/): mesh axis sizes
    # (-1 = the rest) and a rules preset: dp, fsdp, tp, dp_tp, fsdp_tp (parallel/sharding.py).
    config.parallel = ml_collections.ConfigDict()
    config.parallel.mesh = ml_collections.ConfigDict(
        {"pipeline": 1, "data": -1, "fsdp": 1, "tensor": 1}
    )
    config.parallel.rules = "dp"  # pp, pp_dp_tp, ... map the layers to the pipeline axis
    # Pipeline (mesh pipeline > 1): microbatches per step (0 = no pipeline), the schedule
    # ("gpipe" or "circular") and the circular schedule's chunks per stage.
    config.parallel.pipeline_microbatches = 0
    config.parallel.pipeline_schedule = "gpipe"
    config.parallel.pipeline_repeats = 1
    # CPU hosts: split the cores into this many single-threaded devices and train data parallel
    # over them (parallel/cpu.py; faster for small models). -1 = one per core, 0 = one device.
    config.parallel.cpu_devices = 0

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 2000
    config.train.grad_accum_steps = 1
    config.train.z_loss = 0.0  # coefficient of log(Z)^2 (PaLM), 0 disables
    config.train.seed = 0  # model init and dropout
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 2
    config.train.async_checkpoint = True
    config.train.sample_tokens = 300  # printed at the end of training; 0 disables
    config.train.sample_prompt = "\n"
    config.train.sample_temperature = 0.8
    config.train.sample_top_k = 0  # 0 = no top-k
    config.train.answer_eval = 0  # fine-tuning: greedy replies to this many held-out chats
    config.train.answer_max_tokens = 24
    config.train.progress_bar = True
    config.train.tensorboard = True
    config.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = look up the device
    return config


def make_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a config into its `:runlocal` variant: 10 tiny steps on CPU, for tests and notebooks.

    The model's shape is left to the caller, who shrinks it keeping the model's structure.
    """
    if config.data.tokenizer.startswith("sentencepiece"):
        config.data.vocab_size = 400
    config.data.seq_len = min(config.data.seq_len, 32)
    config.data.batch_size = 4
    config.data.eval_batches = 2
    config.data.eval_batch_size = 0
    config.optimizer.warmup_steps = 2
    config.optimizer.decay_steps = 0
    config.train.num_steps = 10
    config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 5
    config.train.sample_tokens = 10
    config.train.progress_bar = False
    return config


def shakespeare_char_config() -> ml_collections.ConfigDict:
    """The character-level Shakespeare setting every family's config starts from.

    nanoGPT's CPU "baby GPT" budget: 4 layers, 4 heads, 128 dims, MLP 512, context 64, batch 12,
    2000 steps of AdamW at 1e-3 -> 1e-4 (cosine, 100 warmup steps). Configs then switch the
    architecture (positions, norms, objective) on top.
    """
    config = base_config()
    config.data.source = "shakespeare"  # or any .txt file / directory of texts
    config.data.tokenizer = "char"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.min_learning_rate = 1e-4
    config.optimizer.warmup_steps = 100

    m = config.model
    m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 4, 4, 128, 512
    m.max_seq_len = config.data.seq_len = 64
    m.scan_unroll = m.num_layers  # small model on CPU: unrolled layers run ~30% faster
    config.data.batch_size = 12
    # Forward-only, so larger than training's; beyond 64 x 64 tokens the activations spill out of
    # a CPU core's cache and evaluation gets slower (3.6 s vs 8.3 s at 128 on 2 cores). The
    # windows evaluated are the same: whole batches of 64 cover what whole batches of 128 did.
    config.data.eval_batch_size = 64
    config.train.num_steps = 2000
    config.train.eval_every = 500
    config.train.checkpoint_every = 1000
    return config


def tiny_char_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:runlocal` variant of a shakespeare_char_config: 2 tiny layers, 20 steps."""
    m = config.model
    m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 2, 2, 32, 64
    m.scan_unroll = 1
    config.train.num_steps = 20
    config.optimizer.warmup_steps = 2
    config.train.log_every = config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.data.eval_batches = 4
    config.data.eval_batch_size = 0  # = batch_size, so tiny corpora fill a batch
    config.train.sample_tokens = 20
    config.train.progress_bar = False
    return config
