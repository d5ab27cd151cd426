"""Training DeRIS the official way: Hungarian matching, the ``HierVG_criterion`` losses, non-referent
sample conversion (NSC) and the training loop (``deris train``).

Submodules are imported on demand so that ``deris --help`` stays torch-free:

* :mod:`deris.training.matcher` — point sampling and the per-image Hungarian matching;
* :mod:`deris.training.losses` — refer-class CE, point-sampled mask BCE and Dice, existence BCE;
* :mod:`deris.training.nsc` — the character-multiset similarity and the NSC conversion;
* :mod:`deris.training.trainer` — optimizer, schedule, data, loop, checkpoints, evaluation;
* :mod:`deris.training.cli` — the ``deris train`` command.
"""
