"""The choices basket flags take, one line each (plain Python: ``--help`` lists them at once;
``engine.curate.grow`` and ``engine.curate.causes`` read the same tables)."""

GROW_RULES = {
    "column": "column:K=V, the pairs whose field K equals V",
    "word": "word:W, the pairs whose caption contains the word W",
    "cluster": "cluster:C, the pairs in visual cluster C",
    "neighbours": "neighbours:K, the K nearest training images of each pair in the basket",
    "auto": "the feature most of the basket's pairs carry (at least --min-share of them, three "
    "times as often as the training set)",
}
CAUSE_RANKINGS = {
    "confusion": "help to the wrong matches of the group's failing pairs (new queries)",
    "harm": "harm to the group's own margins (the summed scores, most negative first)",
}
