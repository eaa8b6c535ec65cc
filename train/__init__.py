"""Training: data, tokenizers, the trainer, checkpoints and metrics.

Launch an experiment with `python -m train --config experiments/NAME.py --workdir DIR`, or call
`train.trainer.train_and_evaluate(config, workdir)` from a notebook.
"""
