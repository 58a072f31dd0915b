"""Every set of allowed option values, declared once.

argparse choices, validation and the settings reference read these tuples; the modules that act on a value
(the synthetic generator, the feature reader, the label binning, the trainer) import them from here. This module
imports nothing, so any layer may use it and ``--help`` stays cheap. Extension points with behaviour behind
their names (methods, executors, statistical tests, cohorts, backbones) are registries, not tuples.
"""

#: Planted signal of the embedded synthetic cohorts (``--signal``; parameters in ``benchmark.data.synth``).
SIGNALS = ("mixed", "cross", "fine", "coarse", "none", "cross-xor")
#: Feature-folder layouts the reader knows (``--layout``, which also takes ``auto``).
LAYOUTS = ("default", "trident", "clam", "crossfusion")
LAYOUT_CHOICES = ("auto", *LAYOUTS)
#: Slides of the table without a feature file: stop, or leave them out and report per fold.
MISSING_FEATURES = ("error", "drop")
#: Time-bin edges fitted on the training fold, the whole cohort (MCAT) or its slides (CrossFusion).
BIN_RULES = ("train", "cohort", "cohort-slides")
#: Bag unit.
UNITS = ("patient", "slide")
#: Model selection (``paper-max`` is optimistic and every table marks it).
SELECTIONS = ("last", "inner", "paper-max")
#: ``--seeding``: ``per-fold`` derives each cell's training seed from (seed, repeat, fold), so every fold is a
#: fresh draw of the training procedure; ``shared`` seeds every fold with ``seed`` (the official codes; records
#: without a ``seeding`` entry were trained so). See ``benchmark.fitting.trainer.training_seed``.
SEEDINGS = ("per-fold", "shared")
#: Autocast precision of the training forward passes.
PRECISIONS = ("fp32", "bf16", "fp16")
#: ``--save-weights``: records only, or the selected model's weights beside each record.
SAVE_WEIGHTS = ("none", "last")
#: ``tune --budget`` and ``tune --pruner``.
TUNING_BUDGETS = ("trials", "time")
PRUNERS = ("median", "hyperband", "none")
