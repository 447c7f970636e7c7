"""The random streams that `config.seed` fixes, each with its own named salt.

Every random choice of a run is a function of `config.seed` (or of a per-dataset constant, for
choices that must not depend on the run), mixed with a salt that keeps the streams apart:
numpy streams are `np.random.default_rng([seed, SALT, ...])`, JAX keys `jax.random.key(seed)`
folded with the step. Changing a value here changes the results of every run that uses it.
"""

# Which cases are held out for validation (`data.pipeline.seeded_split`).
SPLIT = 1013
# Which foreground points a case keeps when it has more than `data.sampling.MAX_FG_POINTS`
# (a per-dataset constant in the preprocessed cache; the run's seed in `PatchSampler`).
FOREGROUND_SUBSAMPLE = 7919
# Incremental learning: the training cases' division into stages, the replay buffer's choice
# of cases per stage, and the low-dose domain's noise per case.
STAGE_GROUPS = 3571
REPLAY = 4241
LOW_DOSE_NOISE = 99
# Self-supervised learning: which labelled cases a fraction keeps.
LABELLED_SUBSET = 4099
# Offset of the held-out streams from the training ones (`seed + HELD_OUT`): the validation
# cases' domain transforms, the pretext evaluation's patches and key, the extra unlabelled
# phantoms.
HELD_OUT = 1
# Incremental stage i trains with seed `seed * STAGE_STRIDE + i` (init, sampling, augmentation).
STAGE_STRIDE = 1000
