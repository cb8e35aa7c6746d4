"""ShapesWorld, the embedded default: data, scorer, demo models and the `arrag demo` job."""

# What `arrag demo` (and so `make demo`) runs by default: the README's table, 288 images a method (one seed
# of 48 images moves a method's accuracy by about +-0.07, enough to reorder the methods). Kept here, free of
# imports, so the CLI can show them in --help without loading torch.
DEMO_SEEDS, DEMO_SAMPLES = (0, 1, 2), 4
