"""Integrations with the Hugging Face stack.

``registration``  ``register()``: ``optim="q4shampoo"`` / ``"sparse_mfac"`` for stock ``TrainingArguments`` /
                  ``Trainer`` (light: imported by ``import hf_q4shampoo``)
``optimizer_args`` ``TrainingArguments`` -> ``(optimizer class, kwargs)`` of each optimizer, unsupported setups
``transformers``  ``Q4ShampooTrainer``, ``Q4ShampooTrainingArguments`` and their mixins, TRL variants
                  (imports ``transformers.Trainer``; loaded on first use)
``callback``      ``MemoryReportCallback``, ``MemoryReportMixin``, ``attach_memory_report``: when to measure
``report``        the ``memory_report.json`` schema (typed) and its builder
``render``        ``memory_report.md``, ``memory_report.png``, the model-card section
``probe``         current and peak device memory

Submodules are not imported here so that ``import hf_q4shampoo`` stays as light as registration allows.
"""
