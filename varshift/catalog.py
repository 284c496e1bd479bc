"""The rules varshift checks, as plain data: rule id -> what a finding of it means.

A leaf module (it imports nothing): the rules (:mod:`varshift.rules`) apply them to a graph,
and the reports (:mod:`varshift.report`, SARIF's rule descriptions) describe them, without
either importing the other's stage.
"""

#: The rules, as data: name -> what it means.
RULES: dict[str, str] = {
    "regularizer-before-norm": (
        "an active regularizer feeds a BatchNorm: its running variance records the "
        "training-time variance, which inference never sees"
    ),
    "norm-without-running-stats": (
        "a BatchNorm with track_running_stats=False normalizes with each batch's statistics "
        "at inference too: predictions depend on what else is in the batch, and a batch of "
        "one sample cannot be normalized"
    ),
    "dropout-at-inference": (
        "a functional dropout stays active in eval mode (training=True hard-coded): "
        "inference is random"
    ),
}
