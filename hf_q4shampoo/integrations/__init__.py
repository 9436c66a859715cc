"""Integrations with the Hugging Face stack.

``registration``  ``register()``: ``optim="q4shampoo"`` for stock ``TrainingArguments`` / ``Trainer``
                  (light: imported by ``import hf_q4shampoo``)
``transformers``  ``Q4ShampooTrainer``, ``Q4ShampooTrainingArguments`` and their mixins, TRL variants
                  (imports ``transformers.Trainer``; loaded on first use)

Submodules are not imported here so that ``import hf_q4shampoo`` stays as light as registration allows.
"""
