"""The choices evaluation flags take, with one line each (plain Python: the command line lists
them in its ``--help`` at once; the evaluations read the same tables)."""

CONTROLS = {
    "clip-low": "as many pairs of the lowest CLIP image-caption similarity (the run's ensemble)",
    "suspects": "as many pairs of the run's suspect ranking (self-influence and caption rank)",
    "random": "as many pairs drawn at random (seeded)",
}
